"""Registered prefixes under a flood: pinned vs unpinned vs prefix caching off.

    python bench/prefix.py                  # starts `prefixgate serve` per mode (Redis at --redis)
    python bench/prefix.py --url http://127.0.0.1:8000 --admin-key KEY --modes pinned

The workload, the same in every mode (seeded): `--tenants` tenants (default 4), each with a
registered system prompt of about `--prefix-tokens` tokens (chat messages), asking short
questions by reference (`"prefix": name`) with Poisson arrivals of `--rate` requests/s each,
streamed, `--max-tokens` output tokens; beside them a flood tenant keeps `--flood-concurrency`
unique prompts of `--flood-tokens` token ids in flight, which overflows the KV pool
(`--num-blocks`) and evicts whatever is not pinned. Each mode runs `--duration` seconds on a
fresh server:

- pinned:   the prefixes registered with `"pin": true`
- unpinned: the same prefixes registered without a pin (ordinary LRU-cached blocks)
- off:      the server started with `--no-prefix-caching` (every prompt computed in full)

Printed per mode: TTFT p50 / p99 of the registered tenants' requests (to the first streamed
token: they ask for logprobs, since the model often opens its answer to these prompts with
`<|im_end|>` `<|im_start|>`, which `ignore_eos` runs past and whose text is empty, so that the
first chunk with text would come two decode steps after the first token), output tokens/s (all
tenants, flood included), prompt tokens computed (prompt minus cached, all requests), and each
registered tenant's block hit rate (cached tokens / the prefix's full-block tokens, mean over
its requests). Targets on a 2-core CPU: pinned keeps a 100% hit rate under the flood, and its
TTFT p50 is at least 5x lower than with caching off and at least 3x lower than unpinned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _record
import httpx
from _server import wait_ready
from _stats import percentile

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "order refund shipping warehouse invoice customer policy product return account delivery "
    "payment address support manual warranty replacement carrier tracking discount receipt "
    "always never politely briefly answer question explain check confirm verify escalate"
).split()
FLOOD_IDS = (1000, 20000)  # token ids of the flood's prompts: ordinary vocabulary


@dataclass
class Sample:
    ttft: float
    cached: int
    completion: int
    prompt: int


@dataclass
class ModeResult:
    mode: str
    wall: float = 0.0
    by_tenant: dict[str, list[Sample]] = field(default_factory=dict)
    flood: list[Sample] = field(default_factory=list)
    prefix_tokens: dict[str, int] = field(default_factory=dict)  # tenant -> full-block tokens
    errors: int = 0
    server_ttfts: list[float] = field(default_factory=list)  # the gateway's, of chat requests

    def figures(self) -> dict[str, Any]:
        out = self._client_figures()
        if self.server_ttfts:
            ttfts = sorted(self.server_ttfts)
            out["server_ttft_p50_ms"] = round(percentile(ttfts, 50), 1)
            out["server_ttft_p99_ms"] = round(percentile(ttfts, 99), 1)
        return out

    def _client_figures(self) -> dict[str, Any]:
        samples = [s for ss in self.by_tenant.values() for s in ss]
        ttfts = sorted(s.ttft for s in samples)
        everything = samples + self.flood
        hit = {
            t: round(statistics.fmean(min(s.cached / self.prefix_tokens[t], 1.0) for s in ss), 4)
            for t, ss in self.by_tenant.items()
            if ss
        }
        return {
            "requests": len(samples),
            "flood_requests": len(self.flood),
            "errors": self.errors,
            "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
            "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
            "output_tok_s": round(sum(s.completion for s in everything) / self.wall, 1),
            "prefill_tokens_computed": sum(s.prompt - s.cached for s in everything),
            "hit_rate": hit,
        }


def system_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


# -- one mode ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, admin_key: str, mode: str) -> None:
        self.args = args
        self.url = url
        self.mode = mode
        self.admin = {"authorization": f"Bearer {admin_key}"}
        self.result = ModeResult(mode)
        self.model = ""

    async def run(self) -> ModeResult:
        # idle connections dropped before the server's keep-alive timeout (5 s): else a request
        # can be written into a connection the server is closing (httpx.ReadError)
        limits = httpx.Limits(
            max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0
        )
        async with httpx.AsyncClient(base_url=self.url, timeout=600, limits=limits) as http:
            self.http = http
            keys = await self.setup()
            flood_key = keys.pop("flood")
            models = (await http.get("/v1/models", headers=bearer(flood_key))).json()
            self.model = models["data"][0]["id"]
            stop = time.monotonic() + self.args.duration
            started = time.perf_counter()
            tasks = [asyncio.create_task(self.tenant(t, k, stop)) for t, k in keys.items()]
            tasks += [
                asyncio.create_task(self.flood(flood_key, stop, i))
                for i in range(self.args.flood_concurrency)
            ]
            await asyncio.gather(*tasks)
            self.result.wall = time.perf_counter() - started
        return self.result

    async def setup(self) -> dict[str, str]:
        """Tenants (and their keys) under a fresh id per run; each registers its prefix."""
        run = f"{self.mode}-{os.getpid()}-{int(time.time())}"
        keys = {}
        for name in [*(f"t{i}" for i in range(self.args.tenants)), "flood"]:
            tenant_id = f"bench-{name}-{run}"
            r = await self.http.post("/admin/tenants", json={"id": tenant_id}, headers=self.admin)
            r.raise_for_status()
            r = await self.http.post(f"/admin/tenants/{tenant_id}/keys", headers=self.admin)
            r.raise_for_status()
            keys[name] = r.json()["key"]
        rng = random.Random(self.args.seed)
        pin = self.mode == "pinned"
        for i in range(self.args.tenants):
            text = system_prompt(rng, int(self.args.prefix_tokens * 0.9))
            body = {"name": "system", "pin": pin,
                    "messages": [{"role": "system", "content": text}]}  # fmt: skip
            r = await self.http.post("/v1/prefixes", json=body, headers=bearer(keys[f"t{i}"]))
            r.raise_for_status()
            made = r.json()
            self.result.prefix_tokens[f"t{i}"] = made["num_blocks"] * self.args.block_size
            self.result.by_tenant[f"t{i}"] = []
            line = f"{made['token_count']} tokens, {made['num_blocks']} blocks"
            print(f"  {self.mode}: t{i} prefix {line}, pinned={made['pinned']}", file=sys.stderr)
        return keys

    async def tenant(self, name: str, key: str, stop: float) -> None:
        rng = random.Random(f"{self.args.seed}-{name}")
        pending: list[asyncio.Task[None]] = []
        while True:
            await asyncio.sleep(rng.expovariate(self.args.rate))
            if time.monotonic() >= stop:
                break
            question = " ".join(rng.choice(WORDS) for _ in range(8)) + "?"
            pending.append(asyncio.create_task(self.ask(name, key, question)))
        await asyncio.gather(*pending)

    async def ask(self, name: str, key: str, question: str) -> None:
        body = {
            "model": self.model, "prefix": "system", "max_tokens": self.args.max_tokens,
            "messages": [{"role": "user", "content": question}], "temperature": 0,
            "logprobs": True, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        sample = await self.stream("/v1/chat/completions", body, key)
        if sample is not None:
            self.result.by_tenant[name].append(sample)

    async def flood(self, key: str, stop: float, lane: int) -> None:
        rng = random.Random(f"{self.args.seed}-flood-{lane}")
        while time.monotonic() < stop:
            prompt = [rng.randrange(*FLOOD_IDS) for _ in range(self.args.flood_tokens)]
            body = {"model": self.model, "prompt": prompt, "max_tokens": 4, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            sample = await self.stream("/v1/completions", body, key)
            if sample is not None:
                self.result.flood.append(sample)

    async def stream(self, path: str, body: dict[str, Any], key: str) -> Sample | None:
        t0 = time.perf_counter()
        ttft = None
        usage: dict[str, Any] = {}
        async with self.http.stream("POST", path, json=body, headers=bearer(key)) as r:
            if r.status_code != 200:
                await r.aread()
                self.result.errors += 1
                print(f"  {self.mode}: {r.status_code} {r.text[:200]}", file=sys.stderr)
                return None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and any(_has_token(c) for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    usage = chunk["usage"]
        details = usage.get("prompt_tokens_details") or {}
        return Sample(
            ttft=ttft if ttft is not None else time.perf_counter() - t0,
            cached=int(details.get("cached_tokens", 0)),
            completion=int(usage.get("completion_tokens", 0)),
            prompt=int(usage.get("prompt_tokens", 0)),
        )


def _has_token(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice carries a generated token: text, or (a special token, whose
    text is empty) a logprobs entry."""
    if (choice.get("delta") or {}).get("content") or choice.get("text"):
        return True
    return bool((choice.get("logprobs") or {}).get("content"))


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- servers -------------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, mode: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """The server for `mode`, its URL and its log (JSON access lines: `server_ttfts`)."""
    cmd = [
        sys.executable, "-m", "gateway.cli", "serve", "--port", str(args.port),
        "--num-blocks", str(args.num_blocks), "--max-model-len", str(args.max_model_len),
    ]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    if mode == "off":
        cmd.append("--no-prefix-caching")
    if args.scheduling_policy:
        cmd += ["--scheduling-policy", args.scheduling_policy]
    if args.max_batched_tokens:
        cmd += ["--max-batched-tokens", str(args.max_batched_tokens)]
    if args.long_prefill_tokens:
        cmd += ["--long-prefill-tokens", str(args.long_prefill_tokens)]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFIXGATE_REDIS_URL": args.redis,
        "PREFIXGATE_ADMIN_KEY": args.admin_key,
        "PREFIXGATE_REDIS_KEY_PREFIX": f"pgbench-{os.getpid()}-{mode}",
    }
    log = Path(tempfile.mkstemp(prefix=f"prefixgate-bench-{mode}-", suffix=".log")[1])
    proc = subprocess.Popen(cmd, stderr=log.open("wb"), stdout=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{args.port}"
    wait_ready(proc, url, log)
    return proc, url, log


def server_ttfts(log: Path) -> list[float]:
    """TTFT of each chat request as the gateway measured it (its access lines' `ttft_ms`: from
    the handler to the engine's first token), without the load generator's own latency."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("route") == "/v1/chat/completions" and entry.get("ttft_ms") is not None:
            out.append(float(entry["ttft_ms"]))
    return out


def drop_keys(redis_url: str, mode: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    names = list(client.scan_iter(match=f"pgbench-{os.getpid()}-{mode}:*", count=1000))
    if names:
        client.delete(*names)
    client.close()


def run_mode(args: argparse.Namespace, mode: str) -> ModeResult:
    if args.url:
        return asyncio.run(Bench(args, args.url, args.admin_key, mode).run())
    proc, url, log = start_server(args, mode)
    try:
        result = asyncio.run(Bench(args, url, args.admin_key, mode).run())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        drop_keys(args.redis, mode)
    result.server_ttfts = server_ttfts(log)
    return result


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="a running server (its admin key in --admin-key)")
    p.add_argument("--admin-key", default=os.environ.get("PREFIXGATE_ADMIN_KEY", "bench-admin"))
    p.add_argument("--redis", default="redis://127.0.0.1:6379/11", help="for started servers")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--model", help="default: the bundled SmolLM2-135M")
    p.add_argument("--modes", default="pinned,unpinned,off")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.1, help="requests/s per registered tenant")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--flood-tokens", type=int, default=1000)
    p.add_argument("--flood-concurrency", type=int, default=2)
    p.add_argument("--duration", type=float, default=90.0, help="seconds per mode")
    # 480 blocks: the 4 pinned prefixes (~56 blocks each) fit the pin cap (240 blocks), and the
    # flood cycles the other ~256 blocks every few of its prompts.
    p.add_argument("--num-blocks", type=int, default=480, help="KV pool of started servers")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scheduling-policy",
        choices=("fcfs", "priority", "fair"),
        help="of started servers (default: the server's, fcfs); under fcfs a registered\n"
        "tenant's short request queues behind the flood's prompts whatever it has cached",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        help="of started servers (default: the server's, 2048): a smaller step budget splits the\n"
        "flood's prefills into shorter steps that a cached request's few tokens ride in",
    )
    p.add_argument(
        "--long-prefill-tokens",
        type=int,
        help="of started servers (default: the server's, no cap): while requests wait, a flood\n"
        "prompt being computed takes at most this many tokens of a step",
    )
    _record.add_arguments(p)
    args = p.parse_args()
    results = {}
    for mode in args.modes.split(","):
        print(f"mode {mode}: {args.duration:.0f} s", file=sys.stderr)
        results[mode] = run_mode(args, mode).figures()
    print_table(results)
    ratios = {}
    if {"pinned", "off"} <= results.keys():
        ratios["ttft_p50_off_over_pinned"] = _ratio(results["off"], results["pinned"])
    if {"pinned", "unpinned"} <= results.keys():
        ratios["ttft_p50_unpinned_over_pinned"] = _ratio(results["unpinned"], results["pinned"])
    if all("server_ttft_p50_ms" in results.get(m, {}) for m in ("pinned", "off", "unpinned")):
        for slow in ("off", "unpinned"):
            ratios[f"server_ttft_p50_{slow}_over_pinned"] = _ratio(
                results[slow], results["pinned"], "server_ttft_p50_ms"
            )
    for name, value in ratios.items():
        print(f"{name}: {value}x")
    _record.write(args, __file__, {"modes": results, **ratios})


def _ratio(slow: dict[str, Any], fast: dict[str, Any], key: str = "ttft_p50_ms") -> float:
    return round(slow[key] / fast[key], 2)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = f"{'mode':<9} {'reqs':>5} {'flood':>5} {'err':>4} {'TTFT p50':>10} {'TTFT p99':>10} "
    head += f"{'out tok/s':>9} {'prefill computed':>16}  hit rate per tenant  (server TTFT p50/p99)"
    print(head)
    for mode, f in results.items():
        hits = " ".join(f"{t}={100 * h:.0f}%" for t, h in f["hit_rate"].items())
        print(f"{mode:<9} {f['requests']:>5} {f['flood_requests']:>5} {f['errors']:>4} "
              f"{f['ttft_p50_ms']:>8.1f}ms {f['ttft_p99_ms']:>8.1f}ms {f['output_tok_s']:>9.1f} "
              f"{f['prefill_tokens_computed']:>16}  {hits}  ({f.get('server_ttft_p50_ms')} / "
              f"{f.get('server_ttft_p99_ms')} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
