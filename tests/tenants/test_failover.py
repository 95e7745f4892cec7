"""Redis stopped or stalled mid-test, in both failure modes: documented behaviour, no hang,
recovery by itself, no leaked slots, usage replayed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tenants import (
    AuthenticationError,
    FailureMode,
    MemoryStore,
    RedisStore,
    StoreUnavailable,
    Tenant,
    TenantService,
    Ticket,
)
from tenants.failover import Breaker, StoreGuard
from tenants.periods import Periods
from tenants.store import Consumption

from .conftest import NOW, START, FakeClock, RedisServer

QUOTA = {"requests_per_minute": 3, "max_concurrent_requests": 2}


COOLDOWN_S = 1.0  # of the fake clock: the breaker stays open until the test moves the clock


@pytest.fixture
async def make_service(redis_server: RedisServer, clock: FakeClock) -> AsyncIterator[object]:
    made: list[TenantService] = []

    async def make(mode: str) -> TenantService:
        """A service on the fake clock (the breaker's cooldown passes only when the test says
        so), with 1 s socket deadlines: a stalled Redis fails a call after one deadline,
        while a loaded machine still answers within it. It has reached Redis and loaded the
        scripts before the test proper."""
        store = RedisStore.from_url(
            redis_server.url, socket_timeout=1.0, connect_timeout=1.0, op_timeout=3.0
        )
        svc = TenantService(
            store, clock=clock, failure_mode=mode, breaker_cooldown_s=COOLDOWN_S, lease_ttl_s=30
        )
        made.append(svc)
        await wait_until_available(svc, clock)
        await svc.start()  # loads the scripts
        assert await svc.check()
        return svc

    yield make
    for svc in made:
        await svc.aclose()


async def wait_until_available(svc: TenantService, clock: FakeClock) -> None:
    """Probe until the store answers (each probe after the breaker's cooldown on the fake
    clock), then replay what was queued."""
    while True:
        clock.advance(COOLDOWN_S)
        if await svc.check():
            await svc.flush_pending()  # waits for the replay that check() started
            return
        await asyncio.sleep(0.01)


async def test_closed_mode_kill_and_restart(
    make_service, redis_server: RedisServer, clock: FakeClock
) -> None:
    svc: TenantService = await make_service("closed")
    await svc.create_tenant({"id": "acme", "quota": QUOTA})
    key = (await svc.issue_key("acme")).key
    a = await svc.admit("acme", prompt_tokens=10, max_tokens=10)
    b = await svc.admit("acme", prompt_tokens=10, max_tokens=10)
    assert a.ticket is not None and b.ticket is not None

    redis_server.kill()
    with pytest.raises(StoreUnavailable) as exc:
        await svc.authenticate(key)
    assert exc.value.code == "store_unavailable"
    with pytest.raises(StoreUnavailable):
        await svc.admit("acme", prompt_tokens=1, max_tokens=1)
    await svc.settle(a.ticket, prompt_tokens=10, completion_tokens=2)  # queued, no raise
    assert not svc.stats.available and svc.stats.errors_total >= 1
    assert svc.stats.fast_failures_total >= 1 and svc.stats.pending_settlements == 1
    with pytest.raises(StoreUnavailable):  # admin calls fail the same way
        await svc.get_usage("acme")
    await svc.start()  # a gateway starting during the outage does not crash
    assert not await svc.check()

    redis_server.start()  # same data (append-only file), scripts gone from the script cache
    await wait_until_available(svc, clock)
    assert svc.stats.available and svc.stats.settlements_replayed_total == 1
    assert (await svc.authenticate(key)).tenant_id == "acme"
    usage = await svc.get_usage("acme")
    assert usage.in_flight == 1  # b still holds its slot
    assert usage.today.total_tokens == 12 and usage.today.reserved_tokens == 20
    await svc.settle(b.ticket, prompt_tokens=10, completion_tokens=0)
    assert (await svc.get_usage("acme")).in_flight == 0  # no leaked slot
    c = await svc.admit("acme", prompt_tokens=1, max_tokens=1)
    assert c.admitted and c.headers["x-ratelimit-remaining-requests"] == "0"


async def test_closed_mode_stalled_redis_times_out(
    make_service, redis_server: RedisServer, clock: FakeClock
) -> None:
    svc: TenantService = await make_service("closed")
    await svc.create_tenant({"id": "acme", "quota": QUOTA})
    redis_server.pause()
    with pytest.raises(StoreUnavailable):
        await svc.admit("acme", prompt_tokens=1, max_tokens=1)
    errors, fast = svc.stats.errors_total, svc.stats.fast_failures_total
    with pytest.raises(StoreUnavailable):  # breaker open: fails at once, no second timeout
        await svc.admit("acme", prompt_tokens=1, max_tokens=1)
    assert (svc.stats.errors_total, svc.stats.fast_failures_total) == (errors, fast + 1)
    redis_server.resume()
    await wait_until_available(svc, clock)
    assert (await svc.admit("acme", prompt_tokens=1, max_tokens=1)).admitted


async def test_open_mode_admits_locally_and_replays_usage(
    make_service, redis_server: RedisServer, clock: FakeClock
) -> None:
    svc: TenantService = await make_service("open")
    await svc.create_tenant({"id": "acme", "quota": QUOTA})
    await svc.create_tenant({"id": "unseen"})
    known = (await svc.issue_key("acme")).key
    never_used = (await svc.issue_key("unseen")).key
    await svc.authenticate(known)

    redis_server.kill()
    caller = await svc.authenticate(known)
    assert caller.degraded and caller.tenant_id == "acme"
    with pytest.raises(StoreUnavailable):
        await svc.authenticate(never_used)  # cannot tell: 503, not 401
    with pytest.raises(StoreUnavailable):
        await svc.authenticate("pg-wrong")
    decisions = [await svc.admit("acme", prompt_tokens=5, max_tokens=5) for _ in range(3)]
    assert all(d.admitted and d.degraded for d in decisions[:2])
    assert not decisions[2].admitted  # local max_concurrent_requests=2
    for d in decisions[:2]:
        assert d.ticket is not None and d.ticket.local
        await svc.settle(d.ticket, prompt_tokens=5, completion_tokens=1, cached_tokens=2)
    d = await svc.admit("acme", prompt_tokens=5, max_tokens=5)
    assert d.admitted and d.headers["x-ratelimit-remaining-requests"] == "0"  # local rpm=3
    assert d.ticket is not None
    assert not (await svc.admit("acme", prompt_tokens=5, max_tokens=5)).admitted
    await svc.settle(d.ticket, prompt_tokens=5, completion_tokens=0)
    with pytest.raises(StoreUnavailable):
        await svc.admit("unseen", prompt_tokens=1, max_tokens=1)  # no last-known quota
    assert svc.stats.fallback_admissions_total == 5 and svc.stats.pending_settlements == 3
    assert svc.stats.fallback_authentications_total == 1

    redis_server.start()
    await wait_until_available(svc, clock)
    assert svc.stats.pending_settlements == 0 and svc.stats.settlements_replayed_total == 3
    usage = await svc.get_usage("acme")
    assert usage.today.requests == 3 and usage.today.total_tokens == 17
    assert usage.today.cached_tokens == 4 and usage.in_flight == 0
    caller = await svc.authenticate(known)
    assert not caller.degraded


async def test_open_mode_refuses_revoked_key_seen_before(
    make_service, redis_server: RedisServer, clock: FakeClock
) -> None:
    svc: TenantService = await make_service("open")
    await svc.create_tenant({"id": "acme"})
    issued = await svc.issue_key("acme")
    await svc.authenticate(issued.key)
    await svc.revoke_key("acme", issued.api_key.key_id)  # this process forgets the key
    redis_server.kill()
    with pytest.raises(StoreUnavailable):
        await svc.authenticate(issued.key)
    redis_server.start()
    await wait_until_available(svc, clock)
    with pytest.raises(AuthenticationError):
        await svc.authenticate(issued.key)


def test_breaker_probes_one_call_at_a_time() -> None:
    clock = FakeClock()
    breaker = Breaker(1.0, clock)
    assert breaker.allow() and not breaker.is_open
    breaker.failure()
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # others wait for it
    breaker.failure()
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.allow() and not breaker.is_open


class FlakyStore(MemoryStore):
    """Settlement fails with an outage `outages` times, then with a bug for one lease id."""

    def __init__(self, outages: int) -> None:
        super().__init__()
        self.outages = outages

    async def settle(self, ticket: Ticket, used: Consumption, periods: Periods) -> bool:
        if self.outages:
            self.outages -= 1
            raise StoreUnavailable("down")
        if ticket.lease_id == "bug":
            raise RuntimeError("not an outage")
        return await super().settle(ticket, used, periods)


async def test_replay_keeps_order_and_drops_what_cannot_succeed() -> None:
    store, clock = FlakyStore(outages=1), FakeClock()
    guard = StoreGuard(store, clock=clock, failure_mode=FailureMode.CLOSED, cooldown_s=0)
    await store.create_tenant(Tenant(id="t", created_at=NOW, updated_at=NOW))
    for lease in ("a", "bug", "c"):
        guard.defer(Ticket("t", lease, "", 0, "2025-03-14", "2025-03", -1, 0),
                    Consumption(1, 1), Periods.at(START))  # fmt: skip
    assert await guard.flush() == 0 and len(guard.pending) == 3  # outage: stop, keep all
    assert await guard.flush() == 2 and len(guard.pending) == 0
    assert guard.stats.settlements_replayed_total == 2
    assert guard.stats.settlements_dropped_total == 1
    raw = await store.read_usage("t", Periods.at(START))
    assert raw.day["requests"] == 2
