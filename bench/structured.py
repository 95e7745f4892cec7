"""Structured outputs: the cost of grammar-constrained decoding, and of compiling a new schema.

With the bundled model (or --model) in the engine's asyncio front (`AsyncEngine`, the gateway's
engine), 16 concurrent requests of one chat prompt shape:
  1. unconstrained, then the same requests constrained by one JSON schema (compiled before the
     timed run, as the gateway compiles before it adds a request); every request generates
     exactly --max-tokens tokens (ignore_eos: a finished grammar allows only end-of-sequence
     tokens, so the work per step stays the same); prints output tok/s, time per output token
     (wall time / tokens per request) and the slowdown, target at most 10%;
  2. unconstrained requests again while --new-schemas distinct schemas compile in worker
     threads (the gateway's path): the longest gap between two tokens of one request, with and
     without the compiles, shows whether a new schema pauses the others.
The figures go to a JSON record under bench/results/ (see bench/_record.py).

Usage: python bench/structured.py [--requests 16] [--max-tokens 64] [--new-schemas 8]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import _record

from engine import GrammarSpec, SamplingParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}


def new_schema(k: int) -> GrammarSpec:
    props = {f"field_{k}_{j}": {"type": "string", "maxLength": 16} for j in range(24)}
    return GrammarSpec.json_schema({"type": "object", "properties": props, "required": [*props]})


async def run_batch(
    engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams]
) -> dict[str, float]:
    """Run the requests concurrently; wall time, tokens and the longest inter-token gap."""
    gaps: list[float] = []

    async def one(i: int) -> int:
        last = time.perf_counter()
        tokens = 0
        async for out in engine.add_request(prompts[i], params[i]):
            now = time.perf_counter()
            if out.deltas and tokens:
                gaps.append(now - last)
            last = now
            tokens = out.completion_tokens
        return tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    wall = time.perf_counter() - start
    per_request = sum(tokens) / len(tokens)
    return {
        "wall_s": round(wall, 3),
        "output_tokens": sum(tokens),
        "output_tok_s": round(sum(tokens) / wall, 1),
        "ms_per_output_token": round(1000 * wall / per_request, 2),
        "max_gap_ms": round(1000 * max(gaps), 1),
    }


async def measure(args: argparse.Namespace, engine: AsyncEngine) -> dict[str, Any]:
    tok = engine.tokenizer
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": f"Describe user number {i} of our site as JSON."}],
                add_generation_prompt=True,
                tokenize=False,
            ),
            add_special_tokens=False,
        )
        for i in range(args.requests)
    ]
    spec = GrammarSpec.json_schema(SCHEMA)
    await engine.compile_grammar(spec)

    def params(grammar: GrammarSpec | None) -> list[SamplingParams]:
        return [
            SamplingParams(
                temperature=0.8,
                seed=i,
                max_tokens=args.max_tokens,
                ignore_eos=True,
                grammar=grammar,
            )
            for i in range(args.requests)
        ]

    await run_batch(engine, prompts[:2], params(None)[:2])  # warm-up
    figures: dict[str, Any] = {}
    for name, grammar in (("unconstrained", None), ("json_schema", spec)):
        figures[name] = await run_batch(engine, prompts, params(grammar))
        print(name, figures[name], flush=True)
    slowdown = (
        figures["json_schema"]["ms_per_output_token"]
        / figures["unconstrained"]["ms_per_output_token"]
    )
    figures["slowdown"] = round(slowdown - 1, 4)
    print(f"constrained / unconstrained time per output token: {slowdown:.3f} (target <= 1.10)")

    async def compile_new() -> float:
        await asyncio.sleep(0.05)  # let the requests start streaming
        start = time.perf_counter()
        for k in range(args.new_schemas):
            await engine.compile_grammar(new_schema(k))
        return time.perf_counter() - start

    batch = asyncio.create_task(run_batch(engine, prompts, params(None)))
    compile_s = await compile_new()
    figures["unconstrained_while_compiling"] = await batch
    figures["new_schemas"] = args.new_schemas
    figures["compile_ms_per_schema"] = round(1000 * compile_s / max(args.new_schemas, 1), 1)
    print("while compiling", figures["unconstrained_while_compiling"], flush=True)
    print(f"compile per new schema: {figures['compile_ms_per_schema']} ms")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--new-schemas", type=int, default=8)
    _record.add_arguments(ap)
    args = ap.parse_args()
    config = EngineConfig(dtype=args.dtype, **({"model": args.model} if args.model else {}))
    engine = AsyncEngine.from_config(config)
    engine.start()
    try:
        figures = asyncio.run(measure(args, engine))
    finally:
        engine.shutdown()
    figures |= {"model": engine.model_name, "requests": args.requests}
    _record.write(args, __file__, figures)


if __name__ == "__main__":
    main()
