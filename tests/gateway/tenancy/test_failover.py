"""Redis killed, stalled and restarted under a gateway, in both failure modes: the documented
answers (503 in closed mode, per-process limits in open mode), no hang, recovery by itself, no
leaked concurrency slot, usage replayed: exactly the tokens the clients were told of."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import MakeGateway
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.replicas.test_cluster import sse_events
from tests.gateway.tenancy.helpers import Gateway, bearer
from tests.tenants.conftest import FakeClock, RedisServer

COOLDOWN_S = 1.0  # the store breaker's default cooldown, in seconds of the fake clock


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of our own (append-only file in tmp_path: a restart keeps the data)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None:
        server.resume()
    server.kill()


async def until_admitted(gw: Gateway, key: str, clock: FakeClock) -> httpx.Response:
    """Retry until Redis is back: each try after the breaker's cooldown on the fake clock.
    The first answer once it is back may be a 429, until the replay of a queued settlement has
    given the tenant's concurrency slot back."""
    while True:
        clock.advance(COOLDOWN_S)
        r = await gw.chat(key, max_tokens=1)
        if r.status_code == 200:
            return r
        assert r.status_code in (429, 503), r.text
        await asyncio.sleep(0.05)


async def tenant_when_store_answers(gw: Gateway, tenant_id: str, clock: FakeClock) -> str:
    """Create the tenant and a key, retrying while the store refuses: with a short deadline a
    loaded 2-core machine can miss the first round trips (loading the scripts at startup), and
    the breaker then answers 503 until its cooldown has passed on the fake clock."""

    async def created(path: str, body: dict[str, object]) -> httpx.Response:
        while True:
            r = await gw.admin("POST", path, body)
            if r.status_code == 201:
                return r
            assert r.status_code == 503, r.text
            clock.advance(COOLDOWN_S)
            await asyncio.sleep(0.05)

    await created("/admin/tenants", {"id": tenant_id, "quota": {}})
    key: str = (await created(f"/admin/tenants/{tenant_id}/keys", {})).json()["key"]
    return key


def store_calls(gw: Gateway) -> tuple[int, int]:
    """(calls that reached the store and failed, calls the open breaker refused at once)."""
    stats = gw.state.tenants.stats
    return stats.errors_total, stats.fast_failures_total


def assert_store_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "store_unavailable"
    assert r.json()["error"]["message"] == "The quota store is unavailable; please retry shortly."
    assert r.headers["retry-after"] == "1"


async def test_closed_mode_redis_killed_then_restarted(
    make_gateway: MakeGateway, server: RedisServer
) -> None:
    clock = FakeClock()
    gw = await make_gateway(redis_url=server.url, clock=clock)
    key = await gw.tenant("acme", max_concurrent_requests=1)
    assert (await gw.chat(key, max_tokens=1)).status_code == 200

    server.kill()
    errors, fast = store_calls(gw)
    for _ in range(3):
        assert_store_unavailable(await gw.chat(key, max_tokens=1))
    # No hang: one refused connection, then the open breaker fails the others without trying.
    assert store_calls(gw)[0] == errors + 1 and store_calls(gw)[1] >= fast + 2
    assert_store_unavailable(await gw.client.get("/v1/usage", headers=bearer(key)))
    assert_store_unavailable(await gw.admin("GET", "/admin/tenants"))
    ready = await gw.client.get("/ready")
    assert ready.status_code == 503
    assert (ready.json()["status"], ready.json()["tenant_store"]) == ("unavailable", "unavailable")

    server.start()
    await until_admitted(gw, key, clock)
    assert (await gw.client.get("/ready")).json()["tenant_store"] == "ok"
    usage = await gw.usage(key)
    assert usage["in_flight"] == 0 and usage["today"]["requests"] == 2  # no leaked slot
    stats = gw.state.tenants.stats
    assert stats.errors_total > 0 and stats.available


async def test_settlement_during_an_outage_is_replayed(
    make_gateway: MakeGateway, server: RedisServer
) -> None:
    """A stream admitted before Redis dies finishes; its settlement waits and is replayed, and
    the tenant's only concurrency slot comes back."""
    clock = FakeClock()
    engine = FakeEngine(token_delay=0.01)
    gw = await make_gateway(engine, redis_url=server.url, clock=clock)
    key = await gw.tenant("acme", max_concurrent_requests=1)
    streaming = asyncio.create_task(gw.chat(key, max_tokens=40, stream=True))
    while not engine.requests:
        await asyncio.sleep(0.005)
    server.kill()
    r = await streaming
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert gw.state.tenants.stats.pending_settlements == 1

    server.start()
    await until_admitted(gw, key, clock)
    await gw.state.tenants.flush_pending()
    usage = await gw.usage(key)
    assert usage["in_flight"] == 0 and usage["today"]["requests"] == 2
    assert usage["today"]["completion_tokens"] == 41 and usage["today"]["reserved_tokens"] == 0
    assert gw.state.tenants.stats.settlements_replayed_total == 1


async def test_open_mode_admits_known_keys_with_local_limits(
    make_gateway: MakeGateway, server: RedisServer
) -> None:
    clock = FakeClock()
    gw = await make_gateway(redis_url=server.url, redis_failure_mode="open", clock=clock)
    key = await gw.tenant("acme", requests_per_minute=3)
    unseen = await gw.key("acme")  # never used through this gateway
    assert (await gw.chat(key, max_tokens=1)).status_code == 200

    server.kill()
    statuses = [(await gw.chat(key, max_tokens=1)).status_code for _ in range(4)]
    # Per-process limits, counting from the outage: 3 more admitted, then 429.
    assert statuses == [200, 200, 200, 429]
    assert_store_unavailable(await gw.chat(unseen, max_tokens=1))  # cannot be checked
    ready = await gw.client.get("/ready")
    assert ready.status_code == 200 and ready.json()["tenant_store"] == "unavailable"
    stats = gw.state.tenants.stats
    # Four admission decisions made locally (three admitted, one refused).
    assert stats.fallback_admissions_total == 4 and stats.fallback_authentications_total >= 4
    metrics = (await gw.client.get("/metrics")).text
    assert "prefixgate_tenant_store_fallback_admissions_total 4.0" in metrics
    assert "prefixgate_tenant_store_available 0.0" in metrics

    server.start()
    await until_admitted(gw, unseen, clock)
    await gw.state.tenants.flush_pending()
    usage = await gw.usage(key)
    assert usage["today"]["requests"] == 5 and usage["in_flight"] == 0  # local usage replayed


async def test_stalled_redis_gets_503_not_a_hang(
    make_gateway: MakeGateway, server: RedisServer
) -> None:
    clock = FakeClock()
    gw = await make_gateway(redis_url=server.url, redis_timeout_s=0.5, clock=clock)
    key = await tenant_when_store_answers(gw, "acme", clock)
    await until_admitted(gw, key, clock)
    server.pause()  # connections hang, as with a stalled server or a network partition
    errors, fast = store_calls(gw)
    assert_store_unavailable(await gw.chat(key, max_tokens=1))  # after the operation deadline
    assert_store_unavailable(await gw.chat(key, max_tokens=1))
    assert store_calls(gw) == (errors + 1, fast + 1)  # the second one without waiting
    server.resume()
    await until_admitted(gw, key, clock)
    assert gw.state.tenants.stats.available


def received(r: httpx.Response) -> tuple[int, int]:
    """(prompt, completion) tokens a client was told it used, streamed or not."""
    if r.headers["content-type"].startswith("text/event-stream"):
        last = [e for e in sse_events(r.text) if e != "[DONE]"][-1]
        usage = last["usage"]
    else:
        usage = r.json()["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_streams_across_an_outage_are_charged_exactly_once(
    make_gateway: MakeGateway, server: RedisServer, mode: str
) -> None:
    """Redis dies under four streams and comes back: the declared failure mode answers
    meanwhile, then each tenant's usage equals, token for token, what its clients were told
    they used: nothing lost, nothing charged twice, no slot or reservation left."""
    clock = FakeClock()
    engine = FakeEngine(token_delay=0.01)
    gw = await make_gateway(engine, redis_url=server.url, redis_failure_mode=mode, clock=clock)
    key = await gw.tenant("acme", max_concurrent_requests=8)
    include = {"stream": True, "stream_options": {"include_usage": True}}
    streams = [asyncio.create_task(gw.chat(key, max_tokens=30 + i, **include)) for i in range(4)]
    while len(engine.requests) < 4:
        await asyncio.sleep(0.005)
    server.kill()
    during = [await gw.chat(key, max_tokens=2 + i) for i in range(3)]
    answered = [await s for s in streams]
    assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r in answered)
    if mode == "closed":
        for r in during:
            assert_store_unavailable(r)
    else:  # admitted locally, with the last-known quota
        assert [r.status_code for r in during] == [200] * 3
        answered += during
    assert gw.state.tenants.stats.pending_settlements == len(answered)

    server.start()
    answered.append(await until_admitted(gw, key, clock))
    await gw.state.tenants.flush_pending()
    usage = await gw.usage(key)
    today = usage["today"]
    told = [received(r) for r in answered]
    assert today["requests"] == len(answered)
    assert today["prompt_tokens"] == sum(p for p, _ in told)
    assert today["completion_tokens"] == sum(c for _, c in told)
    assert usage["in_flight"] == 0 and today["reserved_tokens"] == 0
    assert gw.state.tenants.stats.settlements_dropped_total == 0
