"""Where an idle request's time to first token goes: gateway + `prefixgate engine` replica, against
the embedded `prefixgate serve`.

    python bench/remote_trace.py [--probes 40] [--gap-ms 300] [--prompt-tokens 32]

Starts three processes, each with timestamps patched in (this script re-runs itself with
`--child`: it wraps a few functions by name, then runs `gateway.cli`): a replica, a gateway over
it, and an embedded server. Then sends `--probes` streamed completions (fresh prompts, 8 output
tokens, greedy) to the gateway and to the embedded server alternately (ABBA), one at a time,
`--gap-ms` apart, and prints the median gap between consecutive points of each request's path
(every process stamps `time.monotonic_ns()`, one clock for all), the first token's time in each
mode and their paired difference. The points:

    client POST -> gateway `add_request` -> the add written on the channel (its task started)
    -> the replica has its line
    -> engine `add_request` -> step begins -> step ends -> replica writes the channel line
    -> gateway reads it -> client has the first token

and for the embedded server: client POST -> `add_request` -> step begins -> step ends -> first
token. It also times each add the gateway writes on its channel and each SSE head the gateway
and the embedded server send: wall time, the thread's CPU time, and whether an involuntary
context switch happened meanwhile (the woken reader preempting the writer on its core).
docs/deployment.md has a run's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import itertools
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _record
import httpx
from _server import wait_ready

ROOT = Path(__file__).resolve().parents[1]

# Each mode's points in path order, named `process.point` as the processes stamp them
POINTS = {
    "remote": [
        "client.send",
        "gateway.add_request",
        "gateway.post",
        "replica.handler",
        "replica.add_request",
        "replica.step",
        "replica.step_end",
        "replica.channel_write",
        "gateway.channel_read",
        "client.first",
    ],
    "embedded": [
        "client.send",
        "embedded.add_request",
        "embedded.step",
        "embedded.step_end",
        "client.first",
    ],
}


# ---- the child processes: hooks, then the CLI -------------------------------------------------


def child(tag: str, events: Path, cli_args: list[str]) -> None:
    """Run `gateway.cli` with a stamp written to `events` at each point (first call per point
    and request is what the parent keeps)."""
    out = events.open("a", buffering=1)

    def stamp(point: str) -> None:
        out.write(f"{time.monotonic_ns()} {tag}.{point}\n")

    def before(owner: Any, name: str, point: str, after: str | None = None) -> None:
        """Stamp `point` when `owner.name` is called (and `after` when a plain function
        returns)."""
        original = getattr(owner, name)
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                stamp(point)
                return await original(*args, **kwargs)

            setattr(owner, name, async_wrapper)
        else:

            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                stamp(point)
                result = original(*args, **kwargs)
                if after is not None:
                    stamp(after)
                return result

            setattr(owner, name, wrapper)

    from engine import async_engine, llm_engine
    from engine.service import app as service
    from gateway import cli
    from gateway.replicas import remote

    before(llm_engine.LLMEngine, "step", "step", after="step_end")
    before(async_engine.AsyncEngine, "add_request", "add_request")
    before(service.EngineService, "add", "handler")
    before(remote.RemoteEngine, "add_request", "add_request")
    before(remote.RemoteEngine, "_on_line", "channel_read")
    before(remote.RemoteStream, "_add", "post")
    pump = service.Channel.pump

    async def traced_pump(self: Any, send: Callable[..., Any]) -> None:
        async def traced_send(message: Any) -> None:
            stamp("channel_write")
            await send(message)

        await pump(self, traced_send)

    service.Channel.pump = traced_pump  # type: ignore[method-assign]
    if tag == "gateway":
        time_channel_writes(events.with_suffix(".gateway-writes").open("a", buffering=1))
    if tag in ("gateway", "embedded"):
        time_sse_heads(events.with_suffix(f".{tag}-heads").open("a", buffering=1))
    sys.exit(cli.main(cli_args))


def timed(out: Any) -> Callable[[], Callable[[], None]]:
    """`start()` returns `stop()`, which logs the wall time, the thread's CPU time and the
    involuntary context switches between the two calls (a woken reader preempting the writer
    on its core shows as wall time without CPU time, and a switch: docs/deployment.md)."""

    def start() -> Callable[[], None]:
        switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()

        def stop() -> None:
            now = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
            out.write(f"{time.perf_counter_ns() - wall} {time.thread_time_ns() - cpu}"
                      f" {now - switches}\n")  # fmt: skip

        return stop

    return start


def time_channel_writes(out: Any) -> None:
    """Time each write on a gateway's channel (an add)."""
    from gateway.replicas import wire

    start = timed(out)
    duplex = wire.StreamClient.duplex

    @contextlib.asynccontextmanager
    async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        async with duplex(self, *args, **kwargs) as (response, write):

            def timed_write(data: bytes) -> None:
                stop = start()
                write(data)
                stop()

            yield response, timed_write

    wire.StreamClient.duplex = traced  # type: ignore[method-assign]


def time_sse_heads(out: Any) -> None:
    """Time each streamed response's head, sent before its first token."""
    from gateway.openai import responses

    start = timed(out)
    call = responses.StreamingGenerationResponse.__call__

    async def traced(self: Any, scope: Any, receive: Any, send: Any) -> None:
        async def timed_send(message: Any) -> None:
            if message["type"] != "http.response.start":
                return await send(message)
            stop = start()
            await send(message)
            stop()

        await call(self, scope, receive, timed_send)

    responses.StreamingGenerationResponse.__call__ = traced  # type: ignore[method-assign]


# ---- the parent: processes, probes, figures ---------------------------------------------------


def start(
    tag: str, events: Path, log: Path, cli_args: list[str], port: int
) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--child", tag, "--events", str(events), "--", *cli_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    wait_ready(proc, f"http://127.0.0.1:{port}", log)
    return proc


def probe(client: httpx.Client, url: str, prompt: list[int], stamp: Callable[[str], None]) -> None:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    stamp("send")
    first = False
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not first and line.startswith("data: {"):
                stamp("first")
                first = True


def figures(events: Path, warmup: int) -> dict[str, Any]:
    """Median gaps between consecutive points per mode, and the first token's times."""
    stamps = sorted(
        (int(ns), name) for ns, name in (line.split() for line in events.read_text().splitlines())
    )
    requests: list[tuple[str, dict[str, int]]] = []
    for ns, stamped in stamps:
        name, _, mode = stamped.partition("@")  # the client's stamps name their mode
        if name == "client.send":
            requests.append((mode, {name: ns}))
        elif requests:
            requests[-1][1].setdefault(name, ns)
    out: dict[str, Any] = {}
    firsts: dict[str, list[float]] = {}
    for mode, path in POINTS.items():
        runs = [p for m, p in requests if m == mode][warmup:]
        gaps = {}
        for a, b in itertools.pairwise(path):
            gaps[b] = statistics.median((p[b] - p[a]) / 1e6 for p in runs)
        firsts[mode] = [(p["client.first"] - p["client.send"]) / 1e6 for p in runs]
        out[mode] = {"gaps_ms": gaps, "first_token_p50_ms": statistics.median(firsts[mode])}
    pairs = zip(firsts["remote"], firsts["embedded"], strict=False)
    out["paired_difference_p50_ms"] = statistics.median(r - e for r, e in pairs)
    for name in ("gateway-writes", "gateway-heads", "embedded-heads"):
        log = events.with_suffix(f".{name}")
        lines = log.read_text().splitlines() if log.exists() else []
        rows = [[int(v) for v in line.split()] for line in lines]
        if rows[warmup:]:
            out[name.replace("-", "_")] = write_figures(rows[warmup:])
    return out


def write_figures(rows: list[list[int]]) -> dict[str, Any]:
    """Medians of timed writes (`timed`'s lines: wall ns, CPU ns, involuntary switches)."""
    return {
        "count": len(rows),
        "wall_ms_p50": statistics.median(r[0] for r in rows) / 1e6,
        "cpu_ms_p50": statistics.median(r[1] for r in rows) / 1e6,
        "over_0_3_ms": sum(1 for r in rows if r[0] > 300_000),
        "preempted": sum(1 for r in rows if r[2] > 0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--probes", type=int, default=40, help="requests per mode")
    p.add_argument("--gap-ms", type=float, default=300, help="idle time before each request")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8130, help="gateway; replica +1, embedded +2")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    p.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    _record.add_arguments(p)
    args = p.parse_args()
    if args.child:
        child(args.child, args.events, args.cli_args)
        return
    work = Path(tempfile.mkdtemp(prefix="prefixgate-trace-"))
    events, log = work / "events", work / "servers.log"
    gateway, replica, embedded = args.port, args.port + 1, args.port + 2
    procs = []
    try:
        procs.append(start("replica", events, log, ["engine", "--port", str(replica)], replica))
        serve = ["serve", "--no-access-log", "--port"]
        remote = [*serve, str(gateway), "--engine-urls", f"http://127.0.0.1:{replica}"]
        procs.append(start("gateway", events, log, remote, gateway))
        procs.append(start("embedded", events, log, [*serve, str(embedded)], embedded))
        urls = {"remote": f"http://127.0.0.1:{gateway}", "embedded": f"http://127.0.0.1:{embedded}"}
        rng = random.Random(args.seed)
        with events.open("a", buffering=1) as out, httpx.Client(timeout=60) as client:
            for i in range(args.probes):
                prompt = [rng.randrange(1000, 20000) for _ in range(args.prompt_tokens)]
                for mode in ("remote", "embedded") if i % 2 == 0 else ("embedded", "remote"):
                    time.sleep(args.gap_ms / 1000)

                    def stamp(point: str, mode: str = mode) -> None:
                        out.write(f"{time.monotonic_ns()} client.{point}@{mode}\n")

                    probe(client, urls[mode], prompt, stamp)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    result = figures(events, warmup=2)
    for mode in POINTS:
        print(f"{mode}: first token p50 {result[mode]['first_token_p50_ms']:.2f} ms")
        for point, gap in result[mode]["gaps_ms"].items():
            print(f"  +{gap:6.2f} ms  {point}")
    print(f"remote - embedded, paired, p50: {result['paired_difference_p50_ms']:+.2f} ms")
    what = {
        "gateway_writes": "gateway's adds on its channel",
        "gateway_heads": "gateway's SSE heads",
        "embedded_heads": "embedded's SSE heads",
    }
    for key, label in what.items():
        if key in result:
            w = result[key]
            print(
                f"{label}: {w['count']} writes, wall p50 {w['wall_ms_p50']:.3f} ms, CPU p50"
                f" {w['cpu_ms_p50']:.3f} ms; {w['over_0_3_ms']} over 0.3 ms, {w['preempted']}"
                " with an involuntary context switch"
            )
    _record.write(args, __file__, result)


if __name__ == "__main__":
    main()
