"""Two engine replicas on this machine (one core each) behind a gateway, routing policies
compared in one run: prefix-aware vs round-robin vs least-loaded.

    python bench/cluster.py                              # bundled SmolLM2, 8 tenants
    python bench/cluster.py --tenants 12 --requests 96 --rate 2

For each policy, starts two `prefixgate engine` processes pinned to cores 0 and 1 (`taskset`,
OMP_NUM_THREADS=1) and a `prefixgate serve --engine-urls ... --routing <policy>` gateway, and sends
`--requests` streamed completions with Poisson arrivals (`--rate` per second): each from one of
`--tenants` tenants, whose distinct system prompt (`--system-tokens` random token ids) precedes a
fresh question. Each policy gets its own system prompts and fresh replicas, so no policy
starts from another's cache. Each replica's KV pool holds `--cache-fraction` (default 0.6) of
one set of the tenants' system prompts, plus room for the requests in flight (`--num-blocks` sets it
outright): the platform case prefix routing is for, where the tenants' prompts together are
more than one replica caches. Routed by prefix, each replica needs only the prompts of the
tenants sent to it (about half of them); spread over both, every replica needs all of them
and evicts. Printed per policy: prompt-cache hit rate, prompt tokens computed, output tok/s,
TTFT p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _record
import httpx
from _server import wait_ready
from _stats import percentile

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("prefix", "round-robin", "least-loaded")


def start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stderr=log.open("ab"), stdout=subprocess.DEVNULL, env=env)


async def one(
    client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int
) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices") and ttft is None:
                ttft = time.perf_counter() - start
            usage = event.get("usage") or usage
    return {"ttft": ttft or 0.0, **usage}


async def drive(url: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    systems = [[rng.randrange(1000, 20000) for _ in range(args.system_tokens)]
               for _ in range(args.tenants)]  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        tasks = []
        began = time.perf_counter()
        for _ in range(args.requests):
            await asyncio.sleep(rng.expovariate(args.rate))
            prompt = rng.choice(systems) + [rng.randrange(1000, 20000) for _ in range(32)]
            tasks.append(asyncio.create_task(one(client, model, prompt, args.max_tokens)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - began
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    cached = sum(r["prompt_tokens_details"]["cached_tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return {
        "hit_rate": round(cached / prompt_tokens, 3),
        "prompt_tokens_computed": prompt_tokens - cached,
        "output_tok_s": round(sum(r["completion_tokens"] for r in results) / wall, 1),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=1.5, help="arrivals per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--cache-fraction", type=float, default=0.6,
        help="per replica: this share of one set of the system prompts' blocks, plus room for"
        " the requests in flight",
    )  # fmt: skip
    p.add_argument("--num-blocks", type=int, help="per replica (overrides --cache-fraction)")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--seed", type=int, default=0)
    _record.add_arguments(p)
    args = p.parse_args(argv)
    per_prompt = -(-args.system_tokens // 16)
    in_flight = 8 * -(-(32 + args.max_tokens) // 16)  # 8 requests' own blocks past the prompt
    blocks = args.num_blocks or int(args.cache_fraction * args.tenants * per_prompt) + in_flight
    log = Path(tempfile.mkstemp(prefix="prefixgate-cluster-", suffix=".log")[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    model = ["--model", args.model] if args.model else []
    cli = [sys.executable, "-m", "gateway.cli"]
    rows = []
    for i, policy in enumerate(POLICIES):
        # fresh replicas for each policy: no policy's cache starts with another's prompts
        engines, urls = [], []
        try:
            for core in (0, 1):
                port = args.port + 1 + core
                argv_ = ["taskset", "-c", str(core), *cli, "engine", "--port", str(port),
                         "--num-blocks", str(blocks), *model]  # fmt: skip
                engines.append(start(argv_, log, env))
                urls.append(f"http://127.0.0.1:{port}")
            for proc, url in zip(engines, urls, strict=True):
                wait_ready(proc, url, log)
            argv_ = [*cli, "serve", "--port", str(args.port), "--engine-urls", ",".join(urls),
                     "--routing", policy, "--no-access-log", *model]  # fmt: skip
            gateway = start(argv_, log, env)
            try:
                wait_ready(gateway, f"http://127.0.0.1:{args.port}", log)
                row = {"policy": policy, **asyncio.run(
                    drive(f"http://127.0.0.1:{args.port}", args, args.seed + i))}  # fmt: skip
            finally:
                gateway.terminate()
                gateway.wait(timeout=60)
        finally:
            for proc in engines:
                proc.terminate()
                proc.wait(timeout=60)
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    workload = {k: getattr(args, k) for k in ("tenants", "system_tokens", "requests", "rate",
                                               "max_tokens", "cache_fraction")} | {
        "num_blocks": blocks}  # fmt: skip
    _record.write(args, __file__, {"workload": workload, "rows": rows})


if __name__ == "__main__":
    main()
