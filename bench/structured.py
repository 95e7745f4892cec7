"""Structured outputs: the cost of grammar-constrained decoding, and of compiling a new schema.

With the bundled model (or --model) in the engine's asyncio front (`AsyncEngine`, the gateway's
engine), 16 concurrent requests of one chat prompt shape:
  1. unconstrained vs the same requests constrained by one JSON schema (compiled before the
     timed runs, as the gateway compiles before it adds a request), interleaved ABBA... for
     --rounds rounds, medians: output tok/s, time per output token (wall time / tokens per
     request) and TPOT (each request's time from its first token to its last / the tokens after
     the first, averaged), and the slowdown of both (target: at most 10%). Every request
     generates exactly --max-tokens tokens (ignore_eos: a finished grammar allows only
     end-of-sequence tokens, so the mask still runs every step and the work per step stays the
     same);
  2. the compile probe: unconstrained requests, and once all have their first token,
     --new-schemas distinct schemas compile one after the other in worker threads (the
     gateway's path; a remote replica's too); then the same batch again with a wait as long as
     those compiles instead. The inter-token gaps that overlap that window, with and without
     the compiles (max and p99), show whether a new schema pauses the others' tokens; the
     compile time per schema and whether the window ended inside the batch are recorded.
The figures go to a JSON record under bench/results/ (see bench/_record.py).

Usage: python bench/structured.py [--requests 16] [--max-tokens 64] [--rounds 3]
                                  [--new-schemas 8]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
    """A schema no earlier run compiled (24 bounded string fields named after `k`)."""
    stamp = time.time_ns()
    props = {f"f{stamp}_{k}_{j}": {"type": "string", "maxLength": 16} for j in range(24)}
    return GrammarSpec.json_schema({"type": "object", "properties": props, "required": [*props]})


@dataclass
class Batch:
    """One concurrent run: each request's token arrival times (one per delta that added any)."""

    start: float
    end: float
    arrivals: list[list[tuple[float, int]]]  # per request: (time, completion tokens so far)

    def figures(self) -> dict[str, float]:
        tokens = [a[-1][1] for a in self.arrivals]
        wall = self.end - self.start
        per_request = sum(tokens) / len(tokens)
        tpots = [
            (a[-1][0] - a[0][0]) / (a[-1][1] - a[0][1]) for a in self.arrivals if a[-1][1] > a[0][1]
        ]
        return {
            "wall_s": round(wall, 3),
            "output_tokens": sum(tokens),
            "output_tok_s": round(sum(tokens) / wall, 1),
            "ms_per_output_token": round(1000 * wall / per_request, 2),
            "tpot_ms": round(1000 * statistics.mean(tpots), 2),
            "max_gap_ms": round(1000 * max(self.gaps(self.start, self.end)), 1),
        }

    def gaps(self, t0: float, t1: float) -> list[float]:
        """Every gap between two of a request's deltas that overlaps [t0, t1]."""
        return [
            b[0] - a[0]
            for times in self.arrivals
            for a, b in itertools.pairwise(times)
            if b[0] > t0 and a[0] < t1
        ]


async def run_batch(
    engine: AsyncEngine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    started: asyncio.Event | None = None,
) -> Batch:
    """Run the requests concurrently; `started` is set once every one has a token."""
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        async for out in engine.add_request(prompts[i], params[i]):
            if out.deltas and out.completion_tokens:
                arrivals[i].append((time.perf_counter(), out.completion_tokens))
                if started is not None and all(arrivals):
                    started.set()

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return Batch(start, time.perf_counter(), arrivals)


async def constrained_cost(
    engine: AsyncEngine, prompts: list[list[int]], params: Callable[..., list[SamplingParams]],
    rounds: int,
) -> dict[str, Any]:  # fmt: skip
    """Unconstrained vs one JSON schema, interleaved (ABBA...), medians."""
    spec = GrammarSpec.json_schema(SCHEMA)
    await engine.compile_grammar(spec)
    runs: dict[str, list[dict[str, float]]] = {"unconstrained": [], "json_schema": []}
    order = [("unconstrained", None), ("json_schema", spec)]
    for r in range(rounds):
        for name, grammar in order if r % 2 == 0 else order[::-1]:
            figures = (await run_batch(engine, prompts, params(grammar))).figures()
            runs[name].append(figures)
            print(name, figures, flush=True)
    out: dict[str, Any] = {
        name: {key: statistics.median(f[key] for f in found) for key in found[0]}
        for name, found in runs.items()
    }
    for key in ("ms_per_output_token", "tpot_ms"):
        ratio = out["json_schema"][key] / out["unconstrained"][key]
        out[f"slowdown_{key}"] = round(ratio - 1, 4)
        print(f"constrained / unconstrained {key} (medians): {ratio:.3f} (target <= 1.10)")
    out["slowdown"] = out["slowdown_ms_per_output_token"]
    out["runs"] = runs
    return out


async def compile_probe(
    engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams], schemas: int
) -> dict[str, Any]:
    """Inter-token gaps while new schemas compile, and over as long a wait without them."""

    async def window(during: Callable[[], Awaitable[None]]) -> tuple[Batch, float, float]:
        started = asyncio.Event()
        batch = asyncio.create_task(run_batch(engine, prompts, params, started))
        await started.wait()
        t0 = time.perf_counter()
        await during()
        t1 = time.perf_counter()
        return await batch, t0, t1

    async def compile_new() -> None:
        for k in range(schemas):
            await engine.compile_grammar(new_schema(k))

    compiling, c0, c1 = await window(compile_new)
    idle, i0, i1 = await window(lambda: asyncio.sleep(c1 - c0))
    out: dict[str, Any] = {"new_schemas": schemas}
    out["compile_ms_per_schema"] = round(1000 * (c1 - c0) / max(schemas, 1), 1)
    for name, (batch, t0, t1) in {"compiling": (compiling, c0, c1), "idle": (idle, i0, i1)}.items():
        gaps = sorted(batch.gaps(t0, t1))
        out[name] = {
            "window_ms": round(1000 * (t1 - t0), 1),
            "window_inside_batch": t1 < batch.end,
            "gaps": len(gaps),
            "max_gap_ms": round(1000 * gaps[-1], 1) if gaps else None,
            "p99_gap_ms": round(1000 * gaps[int(0.99 * (len(gaps) - 1))], 1) if gaps else None,
            "p50_gap_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        }
        print(f"gaps while {name}", out[name], flush=True)
    print(f"compile per new schema: {out['compile_ms_per_schema']} ms")
    return out


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

    def params(grammar: GrammarSpec | None = None) -> list[SamplingParams]:
        return [
            SamplingParams(
                temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True,
                grammar=grammar,
            )
            for i in range(args.requests)
        ]  # fmt: skip

    await run_batch(engine, prompts[:2], params()[:2])  # warm-up
    figures = await constrained_cost(engine, prompts, params, args.rounds)
    figures["compile_probe"] = await compile_probe(engine, prompts, params(), args.new_schemas)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="unconstrained / schema runs of each")
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
