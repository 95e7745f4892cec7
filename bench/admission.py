"""Admission benchmark: admissions/s and latency of admit + settle against a real Redis.

    python bench/admission.py [--url redis://127.0.0.1:6379/14] [--requests 20000]
                              [--concurrency 32] [--tenants 1000]

Cases: one tenant (every request contends on the same keys), many tenants (round-robin), and
the in-process MemoryStore for comparison. Every quota field is set (high enough never to
refuse) so each admission runs every check. Round trips are counted on the client (each
`execute_command` is one request and one reply), split by phase, and checked against the
server's EVALSHA count (INFO commandstats). Keys live under the prefix `pgbench` and are deleted
at the end; nothing else in the database is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import _record
from _stats import percentile

from tenants import MemoryStore, RedisStore, Store, TenantService

PREFIX = "pgbench"
QUOTA = {
    "requests_per_minute": 10**9,
    "tokens_per_minute": 10**12,
    "max_concurrent_requests": 10**6,
    "tokens_per_day": 10**14,
    "tokens_per_month": 10**14,
    "max_tokens_per_request": 4096,
}
phase: contextvars.ContextVar[str] = contextvars.ContextVar("phase", default="other")


class RoundTrips:
    """Counts client round trips per phase on a RedisStore."""

    def __init__(self, store: RedisStore) -> None:
        self.by_phase: Counter[str] = Counter()
        inner = store.client.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.by_phase[phase.get()] += 1
            return await inner(*args, **kwargs)

        store.client.execute_command = counted  # type: ignore[method-assign]


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    admit_ms: list[float]
    settle_ms: list[float]
    rt_admit: float | None = None
    rt_settle: float | None = None
    evalsha_per_request: float | None = None
    server_us_per_script: float | None = None

    def figures(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "per_s": self.requests / self.seconds,
            "admit_p50_ms": percentile(self.admit_ms, 50),
            "admit_p99_ms": percentile(self.admit_ms, 99),
            "settle_p50_ms": percentile(self.settle_ms, 50),
            "settle_p99_ms": percentile(self.settle_ms, 99),
            "round_trips_admit": self.rt_admit,
            "round_trips_settle": self.rt_settle,
            "evalsha_per_request": self.evalsha_per_request,
            "server_us_per_script": self.server_us_per_script,
        }

    def row(self) -> str:
        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        f = self.figures()
        return (
            f"{self.name:<26} {self.requests:>7} {f['per_s']:>10.0f} "
            f"{f['admit_p50_ms']:>8.3f} {f['admit_p99_ms']:>8.3f} "
            f"{f['settle_p50_ms']:>8.3f} {f['settle_p99_ms']:>8.3f} "
            f"{fmt(self.rt_admit):>6} {fmt(self.rt_settle):>6} {fmt(self.evalsha_per_request):>8}"
            f" {fmt(self.server_us_per_script):>8}"
        )


HEADER = (
    f"{'case':<26} {'reqs':>7} {'admit+s/s':>10} {'adm p50':>8} {'adm p99':>8} "
    f"{'set p50':>8} {'set p99':>8} {'RT/adm':>6} {'RT/set':>6} {'EVALSHA':>8} {'srv':>8}\n"
    f"{'':<26} {'':>7} {'':>10} {'(ms)':>8} {'(ms)':>8} {'(ms)':>8} {'(ms)':>8} "
    f"{'':>6} {'':>6} {'per req':>8} {'us/call':>8}"
)


async def run_case(
    name: str, store: Store, tenants: int, requests: int, concurrency: int
) -> Result:
    svc = TenantService(store)
    ids = [f"bench-{i}" for i in range(tenants)]
    for tid in ids:
        await svc.ensure_tenant(tid)
        await svc.set_quota(tid, QUOTA)
    admit_ms: list[float] = []
    settle_ms: list[float] = []

    async def worker(first: int) -> None:
        for i in range(first, requests, concurrency):
            phase.set("admit")
            t0 = time.perf_counter()
            d = await svc.admit(ids[i % tenants], prompt_tokens=100, max_tokens=50)
            t1 = time.perf_counter()
            assert d.ticket is not None, d.message
            phase.set("settle")
            await svc.settle(d.ticket, prompt_tokens=100, completion_tokens=20, cached_tokens=64)
            t2 = time.perf_counter()
            admit_ms.append((t1 - t0) * 1000)
            settle_ms.append((t2 - t1) * 1000)

    counter = RoundTrips(store) if isinstance(store, RedisStore) else None
    calls_before, usec_before = await _evalsha_stats(store)
    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    result = Result(name, requests, seconds, admit_ms, settle_ms)
    if counter is not None:
        result.rt_admit = counter.by_phase["admit"] / requests
        result.rt_settle = counter.by_phase["settle"] / requests
        calls, usec = await _evalsha_stats(store)
        result.evalsha_per_request = (calls - calls_before) / requests
        result.server_us_per_script = (usec - usec_before) / max(calls - calls_before, 1)
    return result


async def _evalsha_stats(store: Store) -> tuple[int, int]:
    """(calls, total µs) of EVALSHA on the server, Lua time included (server-wide counters)."""
    if not isinstance(store, RedisStore):
        return 0, 0
    stats = (await store.client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=1000)
    _record.add_arguments(parser)
    args = parser.parse_args()

    print(f"redis {args.url}, {args.requests} requests per case, each admit + settle")
    print(HEADER)
    cases = [
        ("redis, 1 tenant, c=1", 1, 1, args.requests // 4),
        (f"redis, 1 tenant, c={args.concurrency}", 1, args.concurrency, args.requests),
        (f"redis, {args.tenants} tenants, c={args.concurrency}", args.tenants,
         args.concurrency, args.requests),
    ]  # fmt: skip
    figures: dict[str, Any] = {}
    for name, tenants, concurrency, requests in cases:
        store = RedisStore.from_url(args.url, prefix=PREFIX)
        try:
            await store.load_scripts()
            result = await run_case(name, store, tenants, requests, concurrency)
            print(result.row(), flush=True)
            figures[name] = result.figures()
        finally:
            await store._delete_matching(f"{PREFIX}:*")
            await store.aclose()
    memory = await run_case(
        f"memory, 1 tenant, c={args.concurrency}", MemoryStore(), 1, args.requests,
        args.concurrency,
    )  # fmt: skip
    print(memory.row())
    figures[memory.name] = memory.figures()
    print(
        "RT = client round trips per request (target 1 at admission, 1 at settlement); "
        "EVALSHA = server-side script calls per request (admit + settle = 2); srv = Redis CPU "
        "per script call, Lua included (server-wide counters: other clients can add to them)."
    )
    _record.write(args, __file__, figures)


if __name__ == "__main__":
    asyncio.run(main())
