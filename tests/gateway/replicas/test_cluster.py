"""Two engine replicas (`prefixgate engine` processes, the tiny model) and two gateways on
loopback, discovering each other through real Redis: prefix affinity, a replica killed
mid-stream, and exact quotas across both gateways."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.replicas import replicas_loader
from gateway.replicas.pool import ReplicaPool
from tests.gateway.conftest import make_settings, running_server, wait_until
from tests.gateway.replicas.helpers import cli_process, is_ready
from tests.gateway.tenancy.helpers import ADMIN_KEY, bearer, tenant_key_sync

MODEL = "tiny"
TTL_S = 5.0
SYSTEM = "You answer questions about the solar system in one careful sentence. " * 3


@contextmanager
def engine_process(model_dir: str, replica_id: str, env: dict[str, str]) -> Iterator[Any]:
    """`prefixgate engine` in its own process, registered in Redis; yields the process once
    it answers on its port."""
    args = ["--model", model_dir, "--dtype", "float32", "--num-blocks", "256"]
    with cli_process("engine", args, env | {"PREFIXGATE_REPLICA_ID": replica_id}) as engine:
        yield engine.proc


def pool_of(app: Any) -> ReplicaPool:
    pool: ReplicaPool = app.state.gateway.engine
    return pool


def sse_events(text: str) -> list[Any]:
    data = [b.removeprefix("data: ") for b in text.split("\n\n") if b.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


@pytest.fixture
def cluster(tiny_model_dir: str, redis_url: str) -> Iterator[tuple[dict[str, Any], list[Any]]]:
    """({replica id: process}, [(gateway URL, app)] * 2), everyone seeing both replicas."""
    env = {
        "PREFIXGATE_REDIS_URL": redis_url,
        "PREFIXGATE_DISCOVERY": "true",
        "PREFIXGATE_REPLICA_TTL_S": str(TTL_S),
        "PREFIXGATE_SERVED_MODEL_NAME": MODEL,
        "PREFIXGATE_LOG_LEVEL": "warning",
    }
    with ExitStack() as stack:
        procs = {r: stack.enter_context(engine_process(tiny_model_dir, r, env)) for r in "ab"}
        gateways = []
        for _ in range(2):
            settings = make_settings(
                redis_url=redis_url, admin_key=ADMIN_KEY, discovery=True,
                served_model_name=MODEL, replica_ttl_s=TTL_S,
            )  # fmt: skip
            app = create_app(settings, engine_loader=replicas_loader(settings))
            url = stack.enter_context(running_server(app))
            assert wait_until(lambda u=url: is_ready(u))
            assert wait_until(lambda a=app: len(pool_of(a).live()) == 2)
            gateways.append((url, app))
        yield procs, gateways


def chat(url: str, key: str, question: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": question}]} | fields  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key), timeout=120)


def test_two_replicas_two_gateways(cluster: tuple[dict[str, Any], list[Any]]) -> None:
    procs, [(url_a, app_a), (url_b, app_b)] = cluster
    key = tenant_key_sync(url_a, "acme", tokens_per_day=1_000_000)

    # A pinned, registered prefix is warmed on one replica; its requests, through either
    # gateway, land there (gateway B learns where from the KV events in Redis).
    r = httpx.post(f"{url_a}/v1/prefixes", headers=bearer(key), timeout=120,
                   json={"name": "solar", "messages": [{"role": "system", "content": SYSTEM}],
                         "pin": True})  # fmt: skip
    assert r.status_code in (200, 201), r.text
    [holder] = [
        e.replica_id for e in pool_of(app_a).live() if pool_of(app_a).index.blocks_of(e.replica_id)
    ]
    assert wait_until(lambda: pool_of(app_b).index.blocks_of(holder) > 0)
    before = {u: dict(pool_of(a).routed) for u, a in ((url_a, app_a), (url_b, app_b))}
    usage = []
    for i, url in enumerate([url_a, url_b, url_a, url_b]):
        r = chat(url, key, f"Question {i}: which planet is largest?", prefix="solar")
        assert r.status_code == 200, r.text
        usage.append(r.json()["usage"])
        routed = [pool_of(a).routed for a in (app_a, app_b)]
        assert usage[-1]["prompt_tokens_details"]["cached_tokens"] > 0, (i, holder, routed)
    for url, app in ((url_a, app_a), (url_b, app_b)):
        routed = pool_of(app).routed
        assert routed.get(holder, 0) - before[url].get(holder, 0) == 2

    # The holder is killed mid-stream: the stream ends with an OpenAI-shaped error event.
    body = {"model": MODEL, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True, "prefix": "solar",
            "messages": [{"role": "user", "content": "Tell me everything."}]}  # fmt: skip
    with httpx.stream("POST", f"{url_b}/v1/chat/completions", json=body, headers=bearer(key),
                      timeout=120) as response:  # fmt: skip
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        procs[holder].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        rest = "\n\n".join(line for line in lines if line)
    events = sse_events(rest)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert set(events[-2]["error"]) == {"message", "type", "param", "code"}

    # The gateway whose stream broke routes at once to the other replica, even the requests
    # whose prefix the dead one held (no wait for the heartbeat TTL), also once its discovery
    # has read the dead replica's last heartbeat record again (still there until the TTL).
    [other] = [r for r in procs if r != holder]
    replicas_b = pool_of(app_b).replicas
    assert wait_until(lambda: holder not in replicas_b or replicas_b[holder].last_seen > killed_at)
    before_other = pool_of(app_b).routed.get(other, 0)
    r = chat(url_b, key, "Which planet is smallest?", prefix="solar")
    assert r.status_code == 200, r.text
    usage.append(r.json()["usage"])
    assert pool_of(app_b).routed.get(other, 0) == before_other + 1
    # Both gateways drop it (heartbeat TTL); later requests succeed on the other replica.
    for app in (app_a, app_b):
        assert wait_until(lambda a=app: holder not in pool_of(a).replicas)
    for url in (url_a, url_b):
        r = chat(url, key, "And the smallest?")
        assert r.status_code == 200, r.text
        usage.append(r.json()["usage"])

    # Quotas stay exact across both gateways: every response's tokens settled once, the killed
    # stream's slot released.
    r = httpx.get(f"{url_a}/v1/usage", headers=bearer(key))
    today = r.json()["today"]
    assert r.json()["in_flight"] == 0 and today["reserved_tokens"] == 0
    assert today["requests"] == len(usage) + 1
    answered = sum(u["total_tokens"] for u in usage)
    assert today["total_tokens"] > answered  # plus what the killed stream had computed
