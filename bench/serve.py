"""Serving benchmark: one seeded streaming workload through HTTP, then straight into AsyncEngine.

    python bench/serve.py                          # starts `prefixgate serve` (bundled SmolLM2)
    python bench/serve.py --url http://host:8000   # drives a running server instead
    python bench/serve.py --num-requests 128 --concurrency 32 --model path/to/model
    python bench/serve.py --remote                 # the gateway drives a `prefixgate engine`
                                                   # replica process (docs/deployment.md)
    python bench/serve.py --remote --vs-embedded   # that stack against `prefixgate serve`'s
                                                   # embedded engine, both over HTTP

The workload: `--num-requests` prompts of `--prompt-tokens` random token ids (seeded), each
asking for a seeded number of output tokens up to `--max-tokens` (greedy, ignore_eos, so both
modes produce exactly the same tokens), `--concurrency` in flight at a time. The HTTP mode sends
them to `/v1/completions` with `stream: true` from this process while the server runs in its own
process (as in production); the engine mode adds the same requests to an in-process `AsyncEngine`
with the same configuration. The two modes alternate for `--rounds` rounds in ABBA order
(machine load that drifts hits both alike), each round with fresh prompts that both modes run
(a repeated round would be served from the prefix cache), and each mode's rounds are pooled;
the throughput overhead is also printed round by round (a round's two modes ran the same
requests back to back): their spread shows what one run can resolve.
Printed: requests/s, output tokens/s, time to first token and inter-token latency percentiles
per mode, and the HTTP overhead (targets: under 5% of throughput, under 2 ms of TTFT p50), also
as CPU time per output token (server process vs engine alone; it includes OpenMP workers
spinning while a step waits, so it moves with machine load too).

Under concurrency, TTFT is mostly queueing behind other prompts' prefills, and it depends on how
the requests arrive: straight into the engine all 16 land before its first step, over HTTP they
trickle in while it already runs. A latency probe then isolates the gateway's own share:
`--probe` requests of fresh short prompts (8 output tokens), one at a time, HTTP and engine
alternating in ABBA order, on an otherwise idle server: each waits `--probe-gap-ms` first, so
that neither process's OpenMP workers still spin from the previous probe (they burn ~8 ms of
CPU after the last parallel region before they sleep; on 2 cores that slowed the next probe's
prefill in either mode and added +-1.5 ms of noise to the paired differences).
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _record
import httpx
from _server import wait_ready
from _stats import percentile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.sampling_params import SamplingParams
from gateway.replicas.wire import StreamClient
from gateway.settings import Settings

# Token ids drawn for prompts: a band of ordinary vocabulary (no special tokens).
TOKEN_ID_RANGE = (1000, 20000)


@dataclass(slots=True)
class Request:
    prompt: list[int]
    max_tokens: int


@dataclass(slots=True)
class Timing:
    """One request as the client saw it (seconds)."""

    ttft: float
    itls: list[float]
    latency: float
    tokens: int
    prompt_tokens: int


@dataclass
class Run:
    name: str
    wall: float = 0.0
    timings: list[Timing] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the run
    round_rates: list[float] = field(default_factory=list)  # merged: each round's output tok/s

    def summary(self) -> dict[str, float]:
        ttfts = [t.ttft for t in self.timings]
        itls = [x for t in self.timings for x in t.itls]
        tokens = sum(t.tokens for t in self.timings)
        prompt_tokens = sum(t.prompt_tokens for t in self.timings)
        return {
            "requests_per_s": len(self.timings) / self.wall,
            "output_tokens_per_s": tokens / self.wall,
            "total_tokens_per_s": (tokens + prompt_tokens) / self.wall,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50),
            "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "itl_p50_ms": 1000 * percentile(itls, 50),
            "itl_p99_ms": 1000 * percentile(itls, 99),
            "output_tokens": tokens,
            "wall_s": self.wall,
            **{f"cpu_ms_per_token_{k}": 1000 * v / tokens for k, v in self.cpu.items()},
        }


def make_workload(args: argparse.Namespace, round_index: int = 0) -> list[Request]:
    """The round's requests: fresh prompts each round (a rerun would hit the prefix cache).

    With `--shared-prefixes K`, request i's prompt starts with shared prefix i % K of
    `--shared-prefix-tokens` tokens (fresh each round too), then its own `--prompt-tokens`:
    tenants' system prompts, as a prefix-caching server meets them.
    """
    rng = random.Random(args.seed + 1000 * round_index)
    lo, hi = TOKEN_ID_RANGE

    def tokens(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    prefixes = [tokens(args.shared_prefix_tokens) for _ in range(args.shared_prefixes)] or [[]]
    return [
        Request(
            prompt=prefixes[i % len(prefixes)] + tokens(args.prompt_tokens),
            max_tokens=rng.randint(max(1, args.max_tokens // 4), args.max_tokens),
        )
        for i in range(args.num_requests)
    ]


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system, all threads) of a process; None: this one."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_all(
    name: str,
    workload: list[Request],
    concurrency: int,
    one: Any,
    processes: dict[str, int | None] | None = None,
) -> Run:
    """Run the workload; `processes` names the processes whose CPU time to record."""
    run = Run(name)
    gate = asyncio.Semaphore(concurrency)
    processes = processes or {}

    async def limited(req: Request) -> None:
        async with gate:
            run.timings.append(await one(req))

    cpu = {k: cpu_seconds(pid) for k, pid in processes.items()}
    start = time.perf_counter()
    await asyncio.gather(*(limited(r) for r in workload))
    run.wall = time.perf_counter() - start
    run.cpu = {k: cpu_seconds(pid) - cpu[k] for k, pid in processes.items()}
    return run


# ---- HTTP -------------------------------------------------------------------------------------


async def post_stream(client: StreamClient, path: str, payload: bytes) -> AsyncIterator[bytes]:
    """POST `payload` (JSON) and yield the response body's pieces; raises on a non-200."""
    async with client.post(path, payload) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:300]!r}")
        async for data in response.chunks():
            yield data


async def http_request(client: StreamClient, model: str, req: Request) -> Timing:
    """One streamed completion; events are split by hand and only the usage one is parsed,
    so the load generator (sharing the machine with the server) stays cheap."""
    body = {
        "model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    first = last = None
    itls: list[float] = []
    tokens = 0
    buffer = b""
    async for data in post_stream(client, "/v1/completions", json.dumps(body).encode()):
        now = time.perf_counter()
        *events, buffer = (buffer + data).split(b"\n\n")
        for event in events:
            if event.startswith(b'data: {"id"') and b'"choices":[]' in event:
                tokens = json.loads(event[6:])["usage"]["completion_tokens"]
            elif event.startswith(b"data: {") and b'"text":""' not in event:
                if first is None:
                    first = now
                else:
                    itls.append(now - last)  # type: ignore[operator]
                last = now
    end = time.perf_counter()
    return Timing((first or end) - start, itls, end - start, tokens, len(req.prompt))


async def run_http(
    client: StreamClient,
    model: str,
    workload: list[Request],
    concurrency: int,
    pids: dict[str, int],
    name: str = "HTTP (gateway)",
) -> Run:
    """`pids`: the server's processes whose CPU time is counted (gateway, replica)."""
    processes: dict[str, int | None] = {"client": None, **pids}
    return await run_all(
        name, workload, concurrency, lambda r: http_request(client, model, r), processes
    )


def start_server(
    args: argparse.Namespace, remote: bool, port: int
) -> tuple[list[subprocess.Popen[bytes]], str, Path]:
    """`prefixgate serve` (embedded engine), or when `remote` a `prefixgate engine` replica on
    the next port and a `serve` gateway over it; returns the processes, the URL and the log."""
    log = Path(tempfile.mkstemp(prefix="prefixgate-bench-", suffix=".log")[1])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = []
    serve = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)]
    if remote:
        replica = [sys.executable, "-m", "gateway.cli", "engine", "--port", str(port + 1)]
        replica += [f for f in server_flags(args) if f != "--no-access-log"]
        procs.append(subprocess.Popen(replica, stderr=log.open("ab"), env=env))
        wait_ready(procs[0], f"http://127.0.0.1:{port + 1}", log)
        serve += ["--engine-urls", f"http://127.0.0.1:{port + 1}"]
        serve += ["--no-access-log"] if not args.access_log else []
        if args.model:
            serve += ["--model", args.model]
    else:
        serve += server_flags(args)
    procs.append(subprocess.Popen(serve, stderr=log.open("ab"), stdout=subprocess.DEVNULL, env=env))
    url = f"http://127.0.0.1:{port}"
    wait_ready(procs[-1], url, log)
    return procs, url, log


ENGINE_FLAGS = ("model", "dtype", "device", "num_blocks", "max_num_seqs", "max_batched_tokens")


def server_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    if not args.access_log:
        flags.append("--no-access-log")
    return flags


# ---- engine -----------------------------------------------------------------------------------


async def engine_request(engine: Any, req: Request) -> Timing:
    params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    first = last = None
    itls: list[float] = []
    tokens = 0
    stream = engine.add_request(req.prompt, params)
    async for out in stream:
        now = time.perf_counter()
        if out.completion_tokens > tokens:
            if first is None:
                first = now
            else:
                itls.append(now - last)  # type: ignore[operator]
            last = now
        tokens = out.completion_tokens
    end = time.perf_counter()
    return Timing((first or end) - start, itls, end - start, tokens, len(req.prompt))


async def build_engine(args: argparse.Namespace) -> Any:
    from engine.async_engine import AsyncEngine

    overrides = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    config = Settings(**overrides).engine_config()
    engine = await asyncio.to_thread(AsyncEngine.from_config, config)
    engine.start()
    warm = [Request(list(reversed(range(1000, 1000 + args.prompt_tokens))), 4)]
    await run_all("warmup", warm, 1, lambda r: engine_request(engine, r))
    return engine


async def run_engine(engine: Any, workload: list[Request], concurrency: int) -> Run:
    return await run_all(
        "engine (no HTTP)", workload, concurrency, lambda r: engine_request(engine, r),
        {"engine": None},
    )  # fmt: skip


# ---- report -----------------------------------------------------------------------------------


def report(args: argparse.Namespace, runs: list[Run]) -> dict[str, Any]:
    shared = ""
    if args.shared_prefixes:
        k, n = args.shared_prefixes, args.shared_prefix_tokens
        shared = f" after one of {k} shared {n}-token prefixes"
    print(
        f"workload: {args.rounds} x {args.num_requests} streaming requests, "
        f"concurrency {args.concurrency}, "
        f"prompt {args.prompt_tokens} tokens{shared}, output {max(1, args.max_tokens // 4)}-"
        f"{args.max_tokens} tokens (seed {args.seed}), model {args.model or 'bundled SmolLM2'}"
    )
    header = f"{'':18} {'req/s':>7} {'out tok/s':>10} {'tot tok/s':>10} {'TTFT p50':>9}"
    header += f" {'TTFT p99':>9}"
    print(header + f" {'ITL p50':>8} {'ITL p99':>8}   (latencies in ms)")
    out: dict[str, Any] = {}
    load = [r for r in runs if not r.name.endswith("probe")]
    probes = [r for r in runs if r.name.endswith("probe")]
    for run in runs:
        if run in probes:
            ttfts = sorted(t.ttft for t in run.timings)
            itls = [x for t in run.timings for x in t.itls]
            s = out[run.name] = {
                "ttft_p50_ms": 1000 * percentile(ttfts, 50),
                "itl_p50_ms": 1000 * percentile(itls, 50),
            }
            print(
                f"{run.name:18} {len(run.timings):>4} requests one at a time: "
                f"TTFT p50 {s['ttft_p50_ms']:.1f} ms, ITL p50 {s['itl_p50_ms']:.1f} ms"
            )
            continue
        s = out[run.name] = run.summary()
        print(
            f"{run.name:18} {s['requests_per_s']:7.2f} {s['output_tokens_per_s']:10.1f} "
            f"{s['total_tokens_per_s']:10.1f} {s['ttft_p50_ms']:9.1f} {s['ttft_p99_ms']:9.1f} "
            f"{s['itl_p50_ms']:8.1f} {s['itl_p99_ms']:8.1f}"
        )
    if len(probes) == 2:
        # the i-th HTTP and engine probes ran the same prompt back to back: their difference is
        # free of the drift and of the prompt-to-prompt spread that a difference of p50s carries
        pairs = zip(probes[0].timings, probes[1].timings, strict=True)
        added = 1000 * percentile(sorted(h.ttft - e.ttft for h, e in pairs), 50)
        out["probe_ttft_p50_added_ms"] = added
        what = "remote path" if args.vs_embedded else "HTTP"
        target = "1 ms" if args.vs_embedded else "2 ms"
        print(
            f"{what} overhead on an idle server: TTFT {added:+.1f} ms (median of the paired "
            f"differences; target < {target})"
        )
    if len(load) == 2:
        http, direct = (out[r.name] for r in load)
        loss = 100 * (1 - http["output_tokens_per_s"] / direct["output_tokens_per_s"])
        ttft = http["ttft_p50_ms"] - direct["ttft_p50_ms"]
        out["overhead"] = {"throughput_loss_pct": loss, "ttft_p50_added_ms": ttft}
        what, target = ("remote path", "3%") if args.vs_embedded else ("HTTP", "5%")
        print(
            f"{what} overhead under load: throughput {loss:+.1f}% lost (target < {target}), TTFT "
            f"p50 {ttft:+.1f} ms (queueing behind other prefills: see the probe for the gateway's)"
        )
        http_rates, direct_rates = (r.round_rates for r in load)
        if len(http_rates) > 1 and len(http_rates) == len(direct_rates):
            # a round's two modes ran the same requests back to back: each round's loss is free
            # of the drift between rounds, and their spread shows what one run resolves
            by_round = zip(http_rates, direct_rates, strict=True)
            losses = [100 * (1 - h / d) for h, d in by_round]
            out["overhead"]["throughput_loss_pct_by_round"] = losses
            print(
                f"  by round: {', '.join(f'{x:+.1f}%' for x in losses)} "
                f"(median {percentile(losses, 50):+.1f}%)"
            )
        if "cpu_ms_per_token_replica" in http and "cpu_ms_per_token_server" in direct:
            remote = http["cpu_ms_per_token_server"] + http["cpu_ms_per_token_replica"]
            extra = remote - direct["cpu_ms_per_token_server"]
            out["overhead"]["server_cpu_ms_per_token_added"] = extra
            print(
                f"CPU per output token: gateway {http['cpu_ms_per_token_server']:.2f} ms + replica "
                f"{http['cpu_ms_per_token_replica']:.2f} ms, embedded "
                f"{direct['cpu_ms_per_token_server']:.2f} ms: the remote path adds {extra:+.2f} ms"
            )
            # an engine's OpenMP workers spin between parallel regions: its process keeps the
            # cores busy whatever the work, so its CPU per token follows its throughput
            replica_cores, embedded_cores = (
                run["cpu_ms_per_token_" + name] * run["output_tokens_per_s"] / 1000
                for run, name in ((http, "replica"), (direct, "server"))
            )
            out["overhead"]["cores_busy"] = {"replica": replica_cores, "embedded": embedded_cores}
            print(
                f"  cores busy: replica {replica_cores:.2f}, embedded server {embedded_cores:.2f} "
                "(an engine's OpenMP threads spin between its parallel regions)"
            )
        if "cpu_ms_per_token_server" in http and "cpu_ms_per_token_engine" in direct:
            extra = http["cpu_ms_per_token_server"] - direct["cpu_ms_per_token_engine"]
            out["overhead"]["server_cpu_ms_per_token_added"] = extra
            print(
                f"CPU per output token: server {http['cpu_ms_per_token_server']:.2f} ms "
                f"(+ load generator {http['cpu_ms_per_token_client']:.2f} ms), engine alone "
                f"{direct['cpu_ms_per_token_engine']:.2f} ms: the gateway adds {extra:+.2f} ms"
            )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="drive this running server instead of starting one")
    p.add_argument("--served-model-name", help="model name on --url (default: from /v1/models)")
    p.add_argument("--skip-engine", action="store_true", help="HTTP run only")
    p.add_argument("--skip-http", action="store_true", help="engine run only")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument(
        "--shared-prefixes",
        type=int,
        default=0,
        metavar="K",
        help="request i's prompt starts with shared prefix i %% K (0: no shared prefixes)",
    )
    p.add_argument("--shared-prefix-tokens", type=int, default=640, metavar="P")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="alternating HTTP / engine rounds")
    p.add_argument(
        "--probe",
        type=int,
        default=100,
        help="sequential latency-probe requests per mode (0: none)",
    )
    p.add_argument(
        "--probe-prompt-tokens",
        type=int,
        default=16,
        help="short, so that prefill time (and its noise) does not drown the gateway's share",
    )
    p.add_argument(
        "--probe-gap-ms",
        type=float,
        default=50.0,
        help="idle time before each probe request: after a step the engine's OpenMP workers\n"
        "spin for ~8 ms of CPU before they sleep, and the other mode's process (server or\n"
        "load generator) would otherwise still be spinning when a probe arrives",
    )
    p.add_argument("--port", type=int, default=8123, help="port for the server this starts")
    p.add_argument(
        "--remote",
        action="store_true",
        help="the HTTP mode goes through a gateway over a `prefixgate engine` replica process",
    )
    p.add_argument(
        "--vs-embedded",
        action="store_true",
        help="with --remote: compare with `prefixgate serve`'s embedded engine over HTTP (on\n"
        "--port + 2) instead of the in-process engine (the remote path's own cost)",
    )
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--model")
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--num-blocks", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-batched-tokens", type=int)
    _record.add_arguments(p)
    return p.parse_args(argv)


def merge(runs: list[Run]) -> Run:
    """All rounds of one mode as one run: summed wall and CPU time, pooled latencies."""
    cpu = {k: sum(r.cpu[k] for r in runs) for k in runs[0].cpu}
    timings = [t for r in runs for t in r.timings]
    rates = [r.summary()["output_tokens_per_s"] for r in runs]
    return Run(runs[0].name, sum(r.wall for r in runs), timings, cpu, rates)


async def bench(
    args: argparse.Namespace,
    url: str | None,
    pids: dict[str, int],
    baseline: tuple[str, int] | None = None,
) -> list[Run]:
    """Alternate HTTP and engine rounds in ABBA order, so drifting machine load hits both modes
    alike; both modes run the same fresh prompts in a round. With `baseline` (the URL and pid
    of an embedded `prefixgate serve`), the engine mode is that server over HTTP instead."""
    engine = None if args.skip_engine or baseline else await build_engine(args)
    base_client = StreamClient(baseline[0]) if baseline else None
    http_runs: list[Run] = []
    engine_runs: list[Run] = []
    names = ("remote", "embedded") if baseline else ("HTTP", "engine")
    probes: dict[str, Run] = {f"{n} probe": Run(f"{n} probe") for n in names}
    client = StreamClient(url or "http://127.0.0.1")
    try:
        model = ""
        if url is not None:
            listed = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            model = args.served_model_name or listed
            warm = [Request(list(range(1000, 1000 + args.prompt_tokens)), 4)]
            for c in (client, base_client) if base_client is not None else (client,):
                await run_all("warmup", warm, 1, lambda r, c=c: http_request(c, model, r))
        for i in range(args.rounds):
            workload = make_workload(args, i)
            for mode in ("HTTP", "engine") if i % 2 == 0 else ("engine", "HTTP"):
                if mode == "HTTP" and url is not None:
                    name = "HTTP (remote)" if baseline else "HTTP (gateway)"
                    run = await run_http(client, model, workload, args.concurrency, pids, name)
                    http_runs.append(run)
                elif mode == "engine" and base_client is not None and baseline is not None:
                    engine_runs.append(
                        await run_http(
                            base_client, model, workload, args.concurrency,
                            {"server": baseline[1]},
                            "HTTP (embedded)",
                        )
                    )  # fmt: skip
                elif mode == "engine" and engine is not None:
                    engine_runs.append(await run_engine(engine, workload, args.concurrency))
                else:
                    continue
                runs = http_runs if mode == "HTTP" else engine_runs
                print(f"round {i + 1}: {mode} {runs[-1].wall:.1f} s", file=sys.stderr)
        if url is not None and (engine is not None or base_client is not None):
            for i, req in enumerate(probe_workload(args)):  # ABBA: cancels order effects
                for mode in names if i % 2 == 0 else names[::-1]:
                    await asyncio.sleep(args.probe_gap_ms / 1000)  # let the machine go idle
                    if mode == names[0]:
                        timing = await http_request(client, model, req)
                    elif base_client is not None:
                        timing = await http_request(base_client, model, req)
                    else:
                        timing = await engine_request(engine, req)
                    probes[f"{mode} probe"].timings.append(timing)
    finally:
        client.close()
        if base_client is not None:
            base_client.close()
        if engine is not None:
            engine.shutdown()
    runs = [merge(runs) for runs in (http_runs, engine_runs) if runs]
    return runs + [p for p in probes.values() if p.timings]


def probe_workload(args: argparse.Namespace) -> list[Request]:
    """Fresh prompts (no prefix-cache hits in either mode), 8 output tokens each."""
    rng = random.Random(args.seed + 1)
    lo, hi = TOKEN_ID_RANGE
    return [
        Request([rng.randrange(lo, hi) for _ in range(args.probe_prompt_tokens)], 8)
        for _ in range(args.probe)
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    procs: list[subprocess.Popen[bytes]] = []
    url = None if args.skip_http else args.url
    if args.vs_embedded and (not args.remote or args.url or args.skip_http):
        raise SystemExit("--vs-embedded needs --remote and the servers this starts")
    baseline: tuple[str, int] | None = None
    if url is None and not args.skip_http:
        procs, url, log = start_server(args, args.remote, args.port)
        print(f"server: {url} (log {log})", file=sys.stderr)
    if args.vs_embedded:
        base, base_url, log = start_server(args, False, args.port + 2)
        print(f"embedded server: {base_url} (log {log})", file=sys.stderr)
        baseline = (base_url, base[-1].pid)
    try:
        # The gateway's process (and a remote one's replica): their CPU time `report` shows.
        pids = {"server": procs[-1].pid} if procs else {}
        if args.remote and len(procs) > 1:
            pids["replica"] = procs[0].pid
        runs = asyncio.run(bench(args, url, pids, baseline))
    finally:
        if baseline is not None:
            procs += base
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=60)
    workload = {
        k: getattr(args, k)
        for k in (
            "url",
            "remote",
            "vs_embedded",
            "num_requests",
            "concurrency",
            "prompt_tokens",
            "max_tokens",
            "rounds",
        )
    }
    _record.write(args, __file__, {"workload": workload, **report(args, runs)})


if __name__ == "__main__":
    main()
