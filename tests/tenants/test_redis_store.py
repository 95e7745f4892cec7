"""RedisStore specifics: only key hashes in Redis, script (re)loading, exactness under
concurrency across two store instances (admissions, prefix registrations), and one round trip
per admission and settlement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tenants import PrefixLimitExceeded, RedisStore, TenantService

from .conftest import REDIS_URL, FakeClock, close_redis_store, fresh_redis_store


async def dump_redis(store: RedisStore) -> str:
    """Every key name and value under the store's prefix, as one string."""
    parts: list[str] = []
    async for name in store.client.scan_iter(match=f"{store.keys.prefix}:*", count=500):
        kind = await store.client.type(name)
        parts.append(name)
        if kind == "string":
            parts.append(await store.client.get(name))
        elif kind == "hash":
            parts.extend(f"{k}={v}" for k, v in (await store.client.hgetall(name)).items())
        elif kind == "set":
            parts.extend(await store.client.smembers(name))
        elif kind == "zset":
            parts.extend(await store.client.zrange(name, 0, -1))
        else:
            raise AssertionError(f"unexpected type {kind} for {name}")
    return "\n".join(parts)


async def test_only_key_hashes_are_stored(redis_store: RedisStore, clock: FakeClock) -> None:
    svc = TenantService(redis_store, clock=clock)
    await svc.create_tenant({"id": "acme", "quota": {"requests_per_minute": 10}})
    issued = [await svc.issue_key("acme", {"name": f"k{i}"}) for i in range(3)]
    rotated = await svc.rotate_key("acme", issued[0].api_key.key_id)
    await svc.revoke_key("acme", issued[1].api_key.key_id)
    for k in (issued[2], rotated):
        caller = await svc.authenticate(k.key)
        d = await svc.admit(caller.tenant_id, prompt_tokens=5, max_tokens=5)
        assert d.ticket is not None
        await svc.settle(d.ticket, prompt_tokens=5, completion_tokens=1)
    dump = await dump_redis(redis_store)
    for k in [*issued, rotated]:
        secret = k.key[3:]
        # no 12-character piece of the random part appears anywhere (the display prefix has 4)
        assert not any(secret[i : i + 12] in dump for i in range(len(secret) - 11))
        assert k.api_key.key_hash in dump


async def test_scripts_reload_after_script_flush(redis_store: RedisStore, clock: FakeClock) -> None:
    svc = TenantService(redis_store, clock=clock)
    await svc.create_tenant({"id": "acme", "quota": {"requests_per_minute": 2}})
    await redis_store.client.script_flush()
    d = await svc.admit("acme", prompt_tokens=1, max_tokens=1)
    assert d.admitted and d.ticket is not None
    await svc.settle(d.ticket, prompt_tokens=1, completion_tokens=1)
    assert (await svc.get_usage("acme")).today.total_tokens == 2


PATIENT: dict[str, float] = dict(
    socket_timeout=5.0, connect_timeout=5.0, pool_timeout=5.0, op_timeout=10.0
)


@pytest.fixture
async def two_services() -> AsyncIterator[tuple[TenantService, TenantService]]:
    """Two services with their own RedisStore (own pool), as two gateway processes. Generous
    timeouts: a burst on a loaded machine starves the event loop past the 0.5 s defaults, and
    these tests are about exactness, not timeouts."""
    a = await fresh_redis_store(**PATIENT)
    b = RedisStore.from_url(REDIS_URL, prefix=a.keys.prefix, **PATIENT)  # same keys, own pool
    yield TenantService(a), TenantService(b)
    await close_redis_store(a)
    await b.aclose()


async def test_exactly_the_limit_is_admitted_under_concurrency(
    two_services: tuple[TenantService, TenantService],
) -> None:
    a, b = two_services
    await a.create_tenant({"id": "acme", "quota": {"requests_per_minute": 50}})
    calls = [(a if i % 2 else b).admit("acme", prompt_tokens=3, max_tokens=3) for i in range(200)]
    decisions = await asyncio.gather(*calls)
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 50
    assert all(d.limit is not None for d in decisions if not d.admitted)
    remaining = sorted(int(d.headers["x-ratelimit-remaining-requests"]) for d in admitted)
    assert remaining == list(range(50))  # each admission saw a distinct state


async def test_concurrency_slots_are_exact(
    two_services: tuple[TenantService, TenantService],
) -> None:
    a, b = two_services
    await a.create_tenant({"id": "acme", "quota": {"max_concurrent_requests": 7}})
    decisions = await asyncio.gather(
        *[(a if i % 2 else b).admit("acme", prompt_tokens=1, max_tokens=1) for i in range(100)]
    )
    tickets = [d.ticket for d in decisions if d.ticket is not None]
    assert len(tickets) == 7
    await asyncio.gather(*[a.settle(t, prompt_tokens=1, completion_tokens=0) for t in tickets])
    assert (await b.get_usage("acme")).in_flight == 0


async def test_prefix_limits_are_exact_under_concurrency(
    two_services: tuple[TenantService, TenantService],
) -> None:
    a, b = two_services
    await a.create_tenant({"id": "acme", "quota": {"max_prefixes": 7}})
    await a.create_tenant({"id": "pins", "quota": {"max_pinned_blocks": 20}})

    async def register(tenant: str, i: int, pin: bool) -> bool:
        svc = a if i % 2 else b
        spec = {"name": f"p{i}", "text": "x", "pin": pin}
        try:
            await svc.register_prefix(tenant, spec, token_ids=[1] * 50, block_size=16, model="m")
        except PrefixLimitExceeded:
            return False
        return True

    counts = await asyncio.gather(
        *[register("acme", i, False) for i in range(40)],
        *[register("pins", i, True) for i in range(40)],
    )
    assert sum(counts[:40]) == 7  # max_prefixes
    assert sum(counts[40:]) == 6  # 3 blocks each: 6 * 3 <= 20 < 7 * 3
    assert len(await b.list_prefixes("acme")) == 7
    assert sum(p.pinned_blocks for p in await b.list_prefixes("pins")) == 18


class CallCounter:
    """Counts client round trips (each `execute_command` is one request and one reply)."""

    def __init__(self, store: RedisStore) -> None:
        self.calls: list[str] = []
        inner = store.client.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(str(args[0]))
            return await inner(*args, **kwargs)

        store.client.execute_command = counted  # type: ignore[method-assign]

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


async def test_one_round_trip_per_step(redis_store: RedisStore, clock: FakeClock) -> None:
    svc = TenantService(redis_store, clock=clock)
    await svc.create_tenant(
        {"id": "acme", "quota": {"requests_per_minute": 100, "tokens_per_minute": 10_000,
                                 "max_concurrent_requests": 5, "tokens_per_day": 10**6,
                                 "tokens_per_month": 10**7, "max_tokens_per_request": 100}}
    )  # fmt: skip
    key = (await svc.issue_key("acme")).key
    await redis_store.load_scripts()
    counter = CallCounter(redis_store)
    caller = await svc.authenticate(key)
    assert counter.take() == ["EVALSHA"]
    d = await svc.admit(caller.tenant_id, prompt_tokens=10, max_tokens=20)
    assert counter.take() == ["EVALSHA"] and d.ticket is not None
    await svc.settle(d.ticket, prompt_tokens=10, completion_tokens=5)
    assert counter.take() == ["EVALSHA"]
    await redis_store.client.script_flush()
    counter.take()
    await svc.admit(caller.tenant_id, prompt_tokens=1, max_tokens=1)
    assert counter.take() == ["EVALSHA", "SCRIPT", "EVALSHA"]  # NOSCRIPT, load, retry
