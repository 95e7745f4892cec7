"""Soak: many concurrent streaming clients against two gateways and two engine replicas on one
Redis, for a bounded time, then exact checks that nothing leaked and every token was accounted.

    python bench/soak.py                                  # 200 clients, 10 min, bundled SmolLM2
    python bench/soak.py --clients 40 --duration 60 --gateways 1 --replicas 1

Starts a throwaway `redis-server` on a free port, `--replicas` `prefixgate engine --discovery`
processes and `--gateways` `prefixgate serve --discovery` processes on it; creates three tenants
with tight quotas (concurrency slots, tokens per minute), each with a registered pinned prefix and
an unpinned one, plus a pinned public prefix. Then `--clients` clients stream requests until
`--duration` has passed: chat completions using a prefix by reference (`"prefix": name`), text
completions continuing one, every one with `stream_options.include_usage`. A fraction
(`--disconnect`) closes the connection after a few chunks, another (`--abort`) gives up at a
random moment (while queued for admission or mid-stream). Refused clients back off
`--backoff` seconds (uniform +-50%) and try again.

Checks at the end (printed; any failure exits 1):
- statuses: only 200, 429 and 503, each refusal with OpenAI's error body; no stream error event,
  no client timeout, no ERROR line or traceback in any server's log;
- KV blocks: on every replica nothing running or waiting, every block free except the pinned ones
  (`GET /engine/stats`);
- leases: every tenant's concurrency-lease set in Redis empty, nothing reserved;
- tokens: each tenant's day counters in Redis equal exactly the tokens of its settled requests:
  a completed stream's `usage` as the client received it (which must equal the gateway's access
  log line of that request id), a disconnected or aborted one's as the gateway settled it (its
  access log line: every request carries a client-made `x-request-id`); `requests` equals the
  requests settled, `charged` equals prompt + completion tokens;
- memory: the RSS of every server process, sampled every `--sample` seconds, flat after warm-up:
  the mean of the last third of the samples within `--rss-tolerance` (10%) above the middle
  third's (`--no-rss-check` prints it without failing: short runs have no steady state).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import _record
import httpx
import redis
from _server import wait_ready

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "soak-admin-key"
MODEL_NAME = "soak"
ERROR_FIELDS = {"message", "type", "param", "code"}
KV_FIGURES = ("num_blocks", "num_free_blocks", "num_pinned_blocks", "num_preemptions")
WORKLOAD = ("clients", "duration_s", "gateways", "replicas", "model", "num_blocks",
            "max_model_len", "max_tokens", "disconnect", "abort", "backoff_s",
            "lease_ttl_s")  # fmt: skip

# Tight quotas: the clients of each tenant outnumber its concurrency slots, and its tokens per
# minute are a few dozen requests' reservations, so both limits refuse (429) throughout.
QUOTAS: dict[str, dict[str, int]] = {
    "alpha": {"max_concurrent_requests": 8, "tokens_per_minute": 40_000},
    "beta": {"max_concurrent_requests": 4, "tokens_per_minute": 12_000},
    "gamma": {"max_concurrent_requests": 2, "tokens_per_minute": 6_000},
}
SYSTEM = (
    "You are the support assistant of {tenant}. Answer in one short, careful sentence, "
    "quote the order number when there is one, and never promise a delivery date. "
)
QUESTIONS = (
    "Where is my order?", "Can I change the delivery address?", "How do I return a parcel?",
    "Why was I charged twice?", "Do you ship to Iceland?", "What is your refund policy?",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SoakConfig:
    clients: int = 200
    duration_s: float = 600.0
    gateways: int = 2
    replicas: int = 2
    model: str | None = None  # default: the bundled SmolLM2
    dtype: str | None = None
    num_blocks: int = 512  # per replica
    # Context length of the replicas: pins may take at most the pool minus one request of this
    # length, so the bundled model's 8,192 would leave no room for pins in 512 blocks.
    max_model_len: int = 1024
    max_tokens: int = 32
    disconnect: float = 0.15  # fraction of requests closed after a few chunks
    abort: float = 0.15  # fraction given up at a random moment
    backoff_s: float = 1.0  # after a refusal
    sample_s: float = 5.0  # RSS sampling period
    rss_tolerance: float = 0.10
    check_rss: bool = True
    request_timeout_s: float = 300.0  # a request longer than this is a hang
    # Redis deadline of the servers (PREFIXGATE_REDIS_TIMEOUT_S, 0.5 s by default): a machine
    # shared with other jobs stalls event loops past 0.5 s, and the store then reads as down.
    redis_timeout_s: float = 2.0
    # Concurrency lease TTL of the gateways (PREFIXGATE_LEASE_TTL_S); None: the default, 300 s.
    # A short one renews every stream's lease many times (renewals every third of it).
    lease_ttl_s: float | None = None
    seed: int = 0
    log_dir: Path | None = None  # default: a new temporary directory


@dataclass(slots=True)
class Record:
    """One client request as the client saw it."""

    request_id: str
    tenant: str
    behaviour: str  # "complete", "disconnect" or "abort"
    status: int | None = None  # None: given up before the response started
    outcome: str = "pending"  # complete, refused, disconnected, aborted, timeout, broken
    error_body_ok: bool = True  # a refusal's body has OpenAI's error shape
    error: str | None = None  # a refusal's body
    stream_error: Any = None
    usage: dict[str, Any] | None = None


@dataclass(slots=True)
class Result:
    figures: dict[str, Any]
    failures: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Service:
    name: str  # "redis", "engine-0", "gateway-1", ...
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


# ---- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    """redis-server on PATH, else the one `make install` links into the venv."""
    found = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
    if not Path(found).exists():
        raise RuntimeError("redis-server is not installed (make install links one into .venv)")
    return found


def start_redis(log_dir: Path) -> Service:
    port = free_port()
    log = log_dir / "redis.log"
    argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(log_dir)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_timeout=1)
    while proc.poll() is None:
        with contextlib.suppress(redis.RedisError):
            if client.ping():
                client.close()
                return Service("redis", proc, f"redis://127.0.0.1:{port}/0", log)
        time.sleep(0.05)
    raise RuntimeError(f"redis-server exited ({proc.returncode}); log: {log}")


def start_server(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Service:
    port = free_port()
    log = log_dir / f"{name}.log"
    cli = [sys.executable, "-m", "gateway.cli", *argv, "--port", str(port)]
    proc = subprocess.Popen(
        cli, stdout=subprocess.DEVNULL, stderr=log.open("ab"), env=env, cwd=ROOT
    )
    return Service(name, proc, f"http://127.0.0.1:{port}", log)


def server_env(config: SoakConfig, redis_url: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PREFIXGATE_REDIS_URL": redis_url, "PREFIXGATE_DISCOVERY": "true",
           "PREFIXGATE_SERVED_MODEL_NAME": MODEL_NAME,
           "PREFIXGATE_REDIS_TIMEOUT_S": str(config.redis_timeout_s)}  # fmt: skip
    if config.model:
        env["PREFIXGATE_MODEL"] = config.model
    if config.dtype:
        env["PREFIXGATE_DTYPE"] = config.dtype
    if config.lease_ttl_s:
        env["PREFIXGATE_LEASE_TTL_S"] = str(config.lease_ttl_s)
    return env


@contextlib.contextmanager
def cluster(config: SoakConfig, log_dir: Path) -> Iterator[list[Service]]:
    """Redis, then the engine replicas and the gateways all at once (their start-up overlaps);
    yields once every gateway sees every replica. All stopped on exit (`stop`)."""
    services: list[Service] = []
    try:
        services.append(start_redis(log_dir))
        env = server_env(config, services[0].url)
        engine_env = env | {"PREFIXGATE_LOG_LEVEL": "warning"}
        for i in range(config.replicas):
            argv = ["engine", "--num-blocks", str(config.num_blocks),
                    "--max-model-len", str(config.max_model_len)]  # fmt: skip
            services.append(start_server(f"engine-{i}", argv, engine_env, log_dir))
        gateway_env = env | {"PREFIXGATE_ADMIN_KEY": ADMIN_KEY, "PREFIXGATE_LOG_LEVEL": "info"}
        for i in range(config.gateways):
            services.append(start_server(f"gateway-{i}", ["serve"], gateway_env, log_dir))
        for s in services[1:]:
            wait_ready(s.proc, s.url, s.log)
        for s in services[1 + config.replicas :]:
            wait_for_replicas(s, config)
        yield services
    finally:
        stop(services)


def wait_for_replicas(gateway: Service, config: SoakConfig, timeout_s: float = 120.0) -> None:
    """Until the gateway counts every replica's KV blocks (`prefixgate_kv_cache_blocks`, the sum
    over the live replicas it routes to)."""
    want = config.replicas * config.num_blocks
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
        found = re.search(r"^prefixgate_kv_cache_blocks ([0-9.e+]+)$", text, re.M)
        if found and float(found.group(1)) >= want:
            return
        time.sleep(0.25)
    raise RuntimeError(f"{gateway.name} does not see the {config.replicas} replicas")


def stop(services: list[Service]) -> None:
    """Gateways first, then the replicas, then Redis (each group SIGTERM, then SIGKILL after
    60 s), so nobody outlives what it depends on."""
    for kind in ("gateway", "engine", "redis"):
        group = [s for s in services if s.name.startswith(kind) and s.proc.poll() is None]
        for s in group:
            s.proc.terminate()
        for s in group:
            try:
                s.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()


# ---- tenants and prefixes -------------------------------------------------------------------


def admin(url: str, method: str, path: str, body: Any = None) -> Any:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    return checked(httpx.request(method, url + path, json=body, headers=headers, timeout=300))


def checked(r: httpx.Response) -> Any:
    """The JSON of a successful answer; raises with the body otherwise."""
    if r.status_code >= 400:
        raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text}")
    return r.json()


def setup_tenants(url: str) -> dict[str, str]:
    """The three tenants, a key each, their pinned and unpinned prefixes and a public one;
    returns {tenant: key}."""
    keys = {}
    for tenant, quota in QUOTAS.items():
        admin(url, "POST", "/admin/tenants", {"id": tenant, "quota": quota})
        keys[tenant] = admin(url, "POST", f"/admin/tenants/{tenant}/keys", {})["key"]
        for name, pin in (("pinned", True), ("unpinned", False)):
            content = SYSTEM.format(tenant=tenant) + f"This is the {name} edition."
            body = {"name": name, "pin": pin,
                    "messages": [{"role": "system", "content": content}]}  # fmt: skip
            checked(httpx.post(f"{url}/v1/prefixes", json=body, timeout=300,
                               headers={"authorization": f"Bearer {keys[tenant]}"}))  # fmt: skip
    style = "Write plain English; no lists, no markdown. " * 4
    public = {
        "name": "house-style",
        "pin": True,
        "messages": [{"role": "system", "content": style}],
    }
    admin(url, "POST", "/admin/prefixes", public)
    return keys


# ---- clients --------------------------------------------------------------------------------


def request_body(rng: random.Random, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """A streamed request using one of the prefixes by reference: (route, body)."""
    common = {"model": MODEL_NAME, "stream": True, "stream_options": {"include_usage": True},
              "max_tokens": rng.randint(max(1, max_tokens // 4), max_tokens),
              "temperature": 0.8, "seed": rng.randrange(2**31)}  # fmt: skip
    prefix = rng.choice(("pinned", "pinned", "unpinned", "house-style"))
    if rng.random() < 0.25:
        return "/v1/completions", common | {"prefix": prefix, "prompt": " Order 4471: "}
    messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    return "/v1/chat/completions", common | {"prefix": prefix, "messages": messages}


def is_error_body(raw: bytes) -> bool:
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and set(body.get("error") or {}) == ERROR_FIELDS


async def stream_one(
    client: httpx.AsyncClient, route: str, body: dict[str, Any], key: str, rec: Record, cut: int
) -> None:
    """Send one request and read its stream into `rec`; with `cut` > 0, leave after that many
    content chunks (closing the connection)."""
    headers = {"authorization": f"Bearer {key}", "x-request-id": rec.request_id}
    async with client.stream("POST", route, json=body, headers=headers) as r:
        rec.status = r.status_code
        if r.status_code != 200:
            raw = await r.aread()
            rec.error_body_ok = is_error_body(raw)
            rec.error = raw.decode(errors="replace")[:500]
            rec.outcome = "refused"
            return
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                rec.outcome = "complete" if rec.usage and not rec.stream_error else "broken"
                return
            event = json.loads(line[6:])
            if "error" in event:
                rec.stream_error = event["error"]
            rec.usage = event.get("usage") or rec.usage
            chunks += bool(event.get("choices"))
            if cut and chunks >= cut:
                rec.outcome = "disconnected"
                return
    rec.outcome = "broken"  # the stream ended without [DONE]


async def one_request(
    client: httpx.AsyncClient, rng: random.Random, rec: Record, key: str, config: SoakConfig
) -> None:
    route, body = request_body(rng, config.max_tokens)
    cut = rng.randint(1, 4) if rec.behaviour == "disconnect" else 0
    work = stream_one(client, route, body, key, rec, cut)
    try:
        if rec.behaviour == "abort":
            await asyncio.wait_for(work, timeout=rng.uniform(0.0, 2.0))
        else:
            await asyncio.wait_for(work, timeout=config.request_timeout_s)
    except asyncio.TimeoutError:
        rec.outcome = "aborted" if rec.behaviour == "abort" else "timeout"
    except httpx.HTTPError as exc:
        rec.outcome = "broken"
        rec.stream_error = repr(exc)


async def client_loop(
    i: int, gateways: list[httpx.AsyncClient], keys: dict[str, str], config: SoakConfig,
    deadline: float, records: list[Record],
) -> None:  # fmt: skip
    rng = random.Random(config.seed * 100_003 + i)
    tenant = list(QUOTAS)[i % len(QUOTAS)]
    await asyncio.sleep(rng.uniform(0, min(5.0, config.duration_s / 10)))  # no thundering herd
    n = 0
    while time.monotonic() < deadline:
        roll = rng.random()
        behaviour = ("abort" if roll < config.abort
                     else "disconnect" if roll < config.abort + config.disconnect
                     else "complete")  # fmt: skip
        rec = Record(f"soak-{i}-{n}", tenant, behaviour)
        records.append(rec)
        n += 1
        await one_request(rng.choice(gateways), rng, rec, keys[tenant], config)
        if rec.outcome == "refused":
            await asyncio.sleep(config.backoff_s * rng.uniform(0.5, 1.5))


async def drive(urls: list[str], keys: dict[str, str], config: SoakConfig) -> list[Record]:
    records: list[Record] = []
    # Idle connections are dropped after 2 s, before uvicorn closes them (5 s): reusing one the
    # server is closing fails the request with a ReadError before it reaches the gateway.
    limits = httpx.Limits(
        max_connections=None, max_keepalive_connections=config.clients, keepalive_expiry=2.0
    )
    clients = [httpx.AsyncClient(base_url=u, limits=limits, timeout=None) for u in urls]
    deadline = time.monotonic() + config.duration_s
    try:
        loops = [client_loop(i, clients, keys, config, deadline, records)
                 for i in range(config.clients)]  # fmt: skip
        await asyncio.gather(*loops)
    finally:
        for c in clients:
            await c.aclose()
    return records


# ---- memory ---------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples every service's RSS every `period_s` seconds in a thread."""

    def __init__(self, services: list[Service], period_s: float) -> None:
        self.services = services
        self.period_s = period_s
        self.samples: dict[str, list[float]] = {s.name: [] for s in services}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for s in self.services:
                value = rss_mib(s.proc.pid)
                if value is not None:
                    self.samples[s.name].append(value)
            self._stop.wait(self.period_s)


def rss_drift(samples: list[float]) -> dict[str, Any]:
    """Mean RSS (MiB) of the middle and last thirds of the samples, and the last's drift."""
    third = len(samples) // 3
    if third == 0:
        return {"samples": len(samples), "middle_mib": None, "last_mib": None, "drift": None}
    middle = sum(samples[third : 2 * third]) / third
    last = sum(samples[2 * third :]) / len(samples[2 * third :])
    return {"samples": len(samples), "start_mib": round(samples[0], 1),
            "middle_mib": round(middle, 1), "last_mib": round(last, 1),
            "drift": round(last / middle - 1, 4)}  # fmt: skip


# ---- end-state checks -----------------------------------------------------------------------


def access_lines(services: list[Service]) -> dict[str, dict[str, Any]]:
    """The gateways' access-log lines of the soak's requests, by request id."""
    out = {}
    for s in services:
        if not s.name.startswith("gateway"):
            continue
        for line in s.log.read_text(errors="replace").splitlines():
            if '"event":"access"' not in line:
                continue
            entry = json.loads(line)
            if str(entry.get("request_id", "")).startswith("soak-"):
                out[entry["request_id"]] = entry
    return out


def quiesce(services: list[Service], r: redis.Redis, timeout_s: float = 120.0) -> list[str]:
    """Wait until the replicas are idle, every lease is released and every gateway has logged
    each request it settled; the failures if that never comes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [s.name for s in services if s.name.startswith("engine") and busy_replica(s)]
        held = {t: n for t in QUOTAS if (n := int(r.zcard(f"pg:{{{t}}}:leases")))}
        if not busy and not held and log_settled(services):
            return []
        time.sleep(0.5)
    return [f"not quiescent after {timeout_s:.0f} s: replicas busy {busy}, leases held {held}"]


def busy_replica(s: Service) -> bool:
    stats = httpx.get(f"{s.url}/engine/stats", timeout=10).json()
    return bool(stats["num_running"] or stats["num_waiting"])


def log_settled(services: list[Service]) -> bool:
    """True when two reads of the access logs 0.5 s apart agree (the last lines are out)."""
    first = len(access_lines(services))
    time.sleep(0.5)
    return len(access_lines(services)) == first


def check_statuses(records: list[Record], lines: dict[str, dict[str, Any]]) -> list[str]:
    failures = []
    statuses = Counter(rec.status for rec in records if rec.status is not None)
    if bad := {s: n for s, n in statuses.items() if s not in (200, 429, 503)}:
        example = next(r for r in records if r.status in bad)
        failures.append(f"statuses other than 200/429/503 reached clients: {bad}, e.g. {example}")
    # A client that gives up before its body has arrived is answered 400 ("The client
    # disconnected while sending the body.") or nothing (0): nobody reads it.
    gone = {rec.request_id for rec in records if rec.status is None}
    unexpected = [
        e
        for rid, e in lines.items()
        if e["status"] not in (200, 429, 503) and not (rid in gone and e["status"] in (0, 400))
    ]
    if unexpected:
        bad = Counter(e["status"] for e in unexpected)
        failures.append(f"gateways answered {dict(bad)} beyond 200/429/503, e.g. {unexpected[0]}")
    if n := sum(not rec.error_body_ok for rec in records):
        failures.append(f"{n} refusals without OpenAI's error body")
    for outcome in ("timeout", "broken"):
        if n := sum(rec.outcome == outcome for rec in records):
            example = next(r for r in records if r.outcome == outcome)
            failures.append(f"{n} requests {outcome}, e.g. {example}")
    if n := sum(rec.stream_error is not None for rec in records):
        failures.append(f"{n} streams carried an error event")
    return failures


def check_logs(services: list[Service]) -> list[str]:
    failures = []
    for s in services:
        text = s.log.read_text(errors="replace")
        errors = [line for line in text.splitlines()
                  if '"level":"error"' in line or "Traceback" in line]  # fmt: skip
        if errors:
            failures.append(f"{s.name}: {len(errors)} error lines, first: {errors[0][:300]}")
    return failures


def check_kv(services: list[Service], r: redis.Redis) -> tuple[dict[str, Any], list[str]]:
    """Every replica idle with every KV block free but the pinned ones, and each owner's pins
    (a tenant, or `(public)`) as registered: the full set on some replica, never more."""
    figures, failures = {}, []
    held: dict[str, list[int]] = {}
    for s in services:
        if not s.name.startswith("engine"):
            continue
        st = httpx.get(f"{s.url}/engine/stats", timeout=10).json()
        leaked = st["num_blocks"] - st["num_free_blocks"] - st["num_pinned_blocks"]
        figures[s.name] = {k: st[k] for k in KV_FIGURES} | {"leaked": leaked}
        if leaked or st["num_running"] or st["num_waiting"]:
            failures.append(f"{s.name}: {leaked} KV blocks held beyond pins: {st}")
        for owner, blocks in st["pinned_blocks_by_tenant"].items():
            held.setdefault(owner, []).append(blocks)
    for owner, key in [*((t, f"pg:{{{t}}}:prefix_state") for t in QUOTAS),
                       ("(public)", "pg:public:prefix_state")]:  # fmt: skip
        state = {k.decode(): int(v) for k, v in r.hgetall(key).items()}
        want = sum(v for k, v in state.items() if k.endswith(":pinned"))
        if max(held.get(owner, [0])) != want:
            failures.append(f"{owner}: {want} blocks registered pinned, replicas hold {held}")
    return figures, failures


def expected_usage(
    records: list[Record], lines: dict[str, dict[str, Any]]
) -> tuple[dict[str, Counter[str]], list[str]]:
    """Per tenant, the tokens and requests its settled requests must have charged: a completed
    stream's usage as the client received it (checked against the gateway's line), any other
    request's as the gateway's access line recorded its settlement."""
    expected: dict[str, Counter[str]] = {t: Counter() for t in QUOTAS}
    failures = []
    for rec in records:
        line = lines.get(rec.request_id)
        if line is None or "outcome" not in line:  # refused, or never reached a gateway
            if rec.outcome == "complete":
                failures.append(f"{rec.request_id}: completed but no settled access line")
            continue
        prompt, completion = line["prompt_tokens"], line["completion_tokens"]
        if rec.outcome == "complete":
            assert rec.usage is not None
            seen = (rec.usage["prompt_tokens"], rec.usage["completion_tokens"])
            if seen != (prompt, completion):
                failures.append(f"{rec.request_id}: client usage {seen} != gateway's "
                                f"{(prompt, completion)}")  # fmt: skip
            prompt, completion = seen
        e = expected[rec.tenant]
        e["requests"] += 1
        e["prompt_tokens"] += prompt
        e["completion_tokens"] += completion
        e["received_by_clients"] += prompt + completion if rec.outcome == "complete" else 0
        e["settled_after_disconnect"] += prompt + completion if rec.outcome != "complete" else 0
    return expected, failures


def redis_usage(r: redis.Redis, tenant: str) -> Counter[str]:
    """The tenant's day counters, summed over the days the run touched."""
    total: Counter[str] = Counter()
    for key in r.scan_iter(match=f"pg:{{{tenant}}}:day:*"):
        for name, value in r.hgetall(key).items():
            total[name.decode()] += int(value)
    return total


def check_accounting(
    r: redis.Redis, records: list[Record], lines: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], list[str]]:
    expected, failures = expected_usage(records, lines)
    figures = {}
    for tenant, e in expected.items():
        got = redis_usage(r, tenant)
        figures[tenant] = {"expected": dict(e), "redis": dict(got)}
        for name in ("requests", "prompt_tokens", "completion_tokens"):
            if got[name] != e[name]:
                failures.append(f"{tenant}: Redis {name} {got[name]} != expected {e[name]}")
        if got["reserved"] != 0:
            failures.append(f"{tenant}: {got['reserved']} tokens still reserved")
        if got["charged"] != e["prompt_tokens"] + e["completion_tokens"]:
            failures.append(f"{tenant}: charged {got['charged']} != prompt + completion")
        if leases := int(r.zcard(f"pg:{{{tenant}}}:leases")):
            failures.append(f"{tenant}: {leases} concurrency leases held")
    return figures, failures


def check_rss(samples: dict[str, list[float]], config: SoakConfig) -> tuple[Any, list[str]]:
    figures = {name: rss_drift(values) for name, values in samples.items()}
    failures = []
    for name, f in figures.items():
        if config.check_rss and (f["drift"] is None or f["drift"] > config.rss_tolerance):
            failures.append(f"{name}: RSS not flat after warm-up: {f}")
    return figures, failures


# ---- the run --------------------------------------------------------------------------------


def run(config: SoakConfig) -> Result:
    """Start the cluster, drive the clients, check the end state. Never raises for a failed
    check: `Result.failures` lists them."""
    log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="prefixgate-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with cluster(config, log_dir) as services:
        startup = time.monotonic() - started
        gateways = [s.url for s in services if s.name.startswith("gateway")]
        keys = setup_tenants(gateways[0])
        began = time.monotonic()
        with RssSampler(services, config.sample_s) as sampler:
            records = asyncio.run(drive(gateways, keys, config))
        wall = time.monotonic() - began
        with (log_dir / "records.jsonl").open("w") as out:
            out.writelines(json.dumps(asdict(rec)) + "\n" for rec in records)
        r = redis.Redis.from_url(services[0].url)
        failures = quiesce(services, r)
        settle = time.monotonic() - began - wall
        lines = access_lines(services)
        failures += check_statuses(records, lines) + check_logs(services)
        kv, kv_failures = check_kv(services, r)
        tokens, token_failures = check_accounting(r, records, lines)
        rss, rss_failures = check_rss(sampler.samples, config)
        r.close()
    figures = {
        "workload": {k: getattr(config, k) for k in WORKLOAD} | {"quotas": QUOTAS},
        "seconds": {
            "startup": round(startup, 1),
            "load": round(wall, 1),
            "quiesce": round(settle, 1),
        },
        "requests": len(records),
        "by_status": dict(Counter(str(rec.status) for rec in records)),
        "by_outcome": dict(Counter(rec.outcome for rec in records)),
        "tokens": tokens,
        "kv": kv,
        "rss": rss,
        "log_dir": str(log_dir),
    }
    return Result(figures, failures + kv_failures + token_failures + rss_failures)


def summary(result: Result) -> str:
    f = result.figures
    lines = [
        f"requests {f['requests']}  by status {f['by_status']}  by outcome {f['by_outcome']}",
        f"  seconds: {f['seconds']}",
    ]
    for tenant, t in f["tokens"].items():
        e, got = t["expected"], t["redis"]
        lines.append(
            f"  {tenant}: settled {e.get('requests', 0)} requests, "
            f"{e.get('prompt_tokens', 0)} + {e.get('completion_tokens', 0)} tokens expected; "
            f"Redis {got.get('prompt_tokens', 0)} + {got.get('completion_tokens', 0)}, "
            f"reserved {got.get('reserved', 0)}"
        )
    for name, kv in f["kv"].items():
        lines.append(f"  {name}: {kv}")
    for name, rss in f["rss"].items():
        lines.append(f"  {name} RSS: {rss}")
    lines += [f"FAIL {x}" for x in result.failures] or ["all checks passed"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = SoakConfig()
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument(
        "--duration", dest="duration_s", type=float, default=d.duration_s, help="seconds of load"
    )
    p.add_argument("--gateways", type=int, default=d.gateways)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--model", help="default: the bundled SmolLM2-135M")
    p.add_argument("--dtype")
    p.add_argument("--num-blocks", type=int, default=d.num_blocks, help="KV blocks per replica")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help="of the replicas")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--disconnect", type=float, default=d.disconnect)
    p.add_argument("--abort", type=float, default=d.abort)
    p.add_argument("--backoff", dest="backoff_s", type=float, default=d.backoff_s, help="after 429")
    p.add_argument("--sample", dest="sample_s", type=float, default=d.sample_s, help="RSS period")
    p.add_argument("--lease-ttl", dest="lease_ttl_s", type=float, help="s (default 300)")
    p.add_argument("--rss-tolerance", type=float, default=d.rss_tolerance)
    p.add_argument("--no-rss-check", dest="check_rss", action="store_false")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-dir", type=Path, help="servers' logs (default: a temporary directory)")
    _record.add_arguments(p)
    args = p.parse_args(argv)
    given = vars(args)
    config = SoakConfig(**{f.name: given[f.name] for f in fields(SoakConfig) if f.name in given})
    result = run(config)
    print(summary(result), flush=True)
    _record.write(args, __file__, result.figures | {"failures": result.failures})
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
