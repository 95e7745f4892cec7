"""Contract suite of the `Store` primitives, run on MemoryStore and RedisStore alike, plus a
differential test that drives both with the same random operations and compares every answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenants import MemoryStore, Prefix, Quota, RedisStore, Store, Tenant
from tenants.keys import new_api_key
from tenants.periods import UTC, Periods, to_ms, utc
from tenants.store import AdmitRequest, AdmitResult, Consumption, PrefixPut, Refusal, Ticket

from .conftest import NOW, START, close_redis_store, fresh_redis_store


def tenant(tid: str = "acme", **quota: int) -> Tenant:
    return Tenant(id=tid, quota=Quota(**quota), created_at=NOW, updated_at=NOW)


def request(
    now: float, lease: str = "l1", prompt: int = 10, max_tokens: int = 5, ttl_ms: int = 60_000
) -> AdmitRequest:
    return AdmitRequest("acme", lease, prompt, max_tokens, ttl_ms, Periods.at(now))


async def admit(store: Store, req: AdmitRequest) -> AdmitResult:
    result = await store.admit(req)
    assert result is not None
    return result


async def test_tenant_crud(store: Store) -> None:
    assert await store.create_tenant(tenant("b"))
    assert await store.create_tenant(tenant("a", requests_per_minute=5))
    assert not await store.create_tenant(tenant("a"))
    got = await store.get_tenant("a")
    assert got is not None and got.quota.requests_per_minute == 5
    assert [t.id for t in await store.list_tenants()] == ["a", "b"]
    assert await store.replace_tenant(tenant("a", requests_per_minute=7))
    assert not await store.replace_tenant(tenant("zzz"))
    got = await store.get_tenant("a")
    assert got is not None and got.quota.requests_per_minute == 7
    assert await store.delete_tenant("a")
    assert not await store.delete_tenant("a")
    assert await store.get_tenant("a") is None
    assert [t.id for t in await store.list_tenants()] == ["b"]


async def test_keys(store: Store) -> None:
    await store.create_tenant(tenant())
    _, k1 = new_api_key("acme", NOW, "ci", None)
    _, k2 = new_api_key("acme", NOW + timedelta(seconds=1), None, None)
    _, orphan = new_api_key("nobody", NOW, None, None)
    assert await store.add_key(k1) and await store.add_key(k2)
    assert not await store.add_key(orphan)
    assert [k.key_id for k in await store.list_keys("acme")] == [k1.key_id, k2.key_id]
    found = await store.find_key(k1.key_hash)
    assert found is not None and found.key == k1 and found.tenant is not None
    assert found.tenant.id == "acme"
    assert await store.find_key("0" * 64) is None
    assert await store.get_key("acme", k2.key_id) == k2
    assert await store.get_key("acme", "key_missing") is None
    revoked = k1.model_copy(update={"revoked": True})
    assert await store.replace_key(revoked)
    assert not await store.replace_key(orphan)
    found = await store.find_key(k1.key_hash)
    assert found is not None and found.key.revoked
    await store.delete_tenant("acme")
    assert await store.find_key(k2.key_hash) is None
    assert await store.list_keys("acme") == []


async def test_admit_unknown_tenant(store: Store) -> None:
    assert await store.admit(request(START)) is None


async def test_unlimited_tenant_takes_a_lease_and_no_windows(store: Store) -> None:
    await store.create_tenant(tenant())
    r = await admit(store, request(START))
    assert r.admitted and r.requests is None and r.tokens is None and r.in_flight == 1
    assert r.ticket is not None and r.ticket.reserved == 15 and r.ticket.tpm_bucket == -1
    assert r.ticket.expires_ms == to_ms(START) + 60_000


async def test_resent_admission_is_charged_once(store: Store) -> None:
    await store.create_tenant(tenant(requests_per_minute=2, tokens_per_minute=100))
    first = await admit(store, request(START))
    again = await admit(store, request(START))  # same lease: its first reply was lost
    assert again.admitted and again.ticket == first.ticket
    assert again.requests == first.requests and again.in_flight == 1
    raw = await store.read_usage("acme", Periods.at(START))
    assert raw.day["charged"] == 15 and raw.in_flight == 1


async def test_refusal_reports_every_limit_it_breaks(store: Store) -> None:
    await store.create_tenant(tenant(requests_per_minute=1, tokens_per_minute=20))
    assert (await admit(store, request(START, "a"))).admitted
    r = await admit(store, request(START + 0.5, "b"))
    assert not r.admitted and r.ticket is None and r.in_flight == 1
    assert [x.limit for x in r.refusals] == ["requests_per_minute", "tokens_per_minute"]
    rpm, tpm = r.refusals
    assert (rpm.value, rpm.used, rpm.requested, rpm.retry_ms) == (1, 1, 1, 59_500)
    assert (tpm.value, tpm.used, tpm.requested, tpm.retry_ms) == (20, 15, 15, 59_500)


async def test_buckets_written_out_of_order(store: Store) -> None:
    """Two gateways whose clocks disagree by seconds write buckets out of time order."""
    await store.create_tenant(tenant(requests_per_minute=3))
    for offset, lease in ((10, "a"), (5, "b"), (8, "c")):
        assert (await admit(store, request(START + offset, lease))).admitted
    r = await admit(store, request(START + 9, "d"))
    assert r.requests is not None and r.requests.reset_ms == 61_000  # newest bucket: t=10
    assert r.refusals[0].retry_ms == 56_000  # oldest bucket: t=5, leaves at t=65


async def test_settle_releases_lease_and_charges_real_usage(store: Store) -> None:
    await store.create_tenant(tenant(tokens_per_minute=100, max_concurrent_requests=1))
    r = await admit(store, request(START, prompt=10, max_tokens=50))
    assert r.ticket is not None and r.tokens is not None and r.tokens.used == 60
    assert await store.settle(r.ticket, Consumption(10, 3, 4), Periods.at(START + 1))
    raw = await store.read_usage("acme", Periods.at(START + 1))
    assert raw.in_flight == 0
    assert raw.day["charged"] == 13 and raw.day["reserved"] == 0
    assert raw.day["cached_tokens"] == 4 and raw.month["requests"] == 1
    r2 = await admit(store, request(START + 2, "l2", prompt=1, max_tokens=1))
    assert r2.admitted and r2.tokens is not None and r2.tokens.used == 13 + 2


async def test_lease_expiry_frees_slot_and_keeps_charge(store: Store) -> None:
    await store.create_tenant(tenant(max_concurrent_requests=1))
    r = await admit(store, request(START, "a", ttl_ms=5_000))
    assert r.ticket is not None
    assert not (await admit(store, request(START + 4.999, "b"))).admitted
    assert (await admit(store, request(START + 5, "c"))).admitted
    raw = await store.read_usage("acme", Periods.at(START + 5))
    assert raw.in_flight == 1
    assert raw.day["charged"] == 30 and raw.day["reserved"] == 15  # a's 15 stay charged
    # a late settlement still replaces a's reservation with its real usage
    assert not await store.settle(r.ticket, Consumption(10, 1), Periods.at(START + 6))
    raw = await store.read_usage("acme", Periods.at(START + 6))
    assert raw.day["charged"] == 11 + 15 and raw.day["reserved"] == 15


async def test_renew(store: Store) -> None:
    await store.create_tenant(tenant(max_concurrent_requests=1))
    r = await admit(store, request(START, ttl_ms=5_000))
    assert r.ticket is not None
    assert await store.renew(r.ticket, to_ms(START) + 20_000, to_ms(START + 4))
    assert not (await admit(store, request(START + 10, "b"))).admitted
    assert not await store.renew(r.ticket, to_ms(START) + 60_000, to_ms(START + 20))
    assert (await admit(store, request(START + 20, "c"))).admitted


async def test_zero_token_request(store: Store) -> None:
    await store.create_tenant(tenant(tokens_per_minute=10, max_concurrent_requests=1))
    r = await admit(store, request(START, prompt=0, max_tokens=0))
    assert r.admitted and r.ticket is not None and r.ticket.reserved == 0
    assert await store.settle(r.ticket, Consumption(0, 0), Periods.at(START))
    raw = await store.read_usage("acme", Periods.at(START))
    assert raw.in_flight == 0 and raw.day["requests"] == 1 and raw.day["charged"] == 0


async def test_usage_only_settlement(store: Store) -> None:
    await store.create_tenant(tenant())
    ticket = Ticket("acme", "x", "", 0, "2025-03-14", "2025-03", -1, 0)
    assert not await store.settle(ticket, Consumption(7, 2), Periods.at(START))
    raw = await store.read_usage("acme", Periods.at(START))
    assert raw.day["charged"] == 9 and raw.day["requests"] == 1
    assert raw.minutes == {to_ms(START) // 60_000: raw.minutes[to_ms(START) // 60_000]}


async def test_reset_usage_keeps_reservations_in_flight(store: Store) -> None:
    await store.create_tenant(tenant(requests_per_minute=1))
    a = await admit(store, request(START, "a"))
    assert a.ticket is not None
    await store.settle(Ticket("acme", "u", "", 0, "2025-03-14", "2025-03", -1, 0),
                       Consumption(100, 0), Periods.at(START))  # fmt: skip
    await store.reset_usage("acme", Periods.at(START + 1))
    raw = await store.read_usage("acme", Periods.at(START + 1))
    assert raw.day == {"charged": 15, "reserved": 15} and raw.minutes == {}
    assert (await admit(store, request(START + 1, "b"))).admitted  # window cleared
    await store.settle(a.ticket, Consumption(10, 0), Periods.at(START + 2))
    raw = await store.read_usage("acme", Periods.at(START + 2))
    assert raw.day["charged"] == 10 + 15 and raw.day["reserved"] == 15


async def test_settle_after_tenant_deleted_is_a_no_op(store: Store) -> None:
    await store.create_tenant(tenant())
    r = await admit(store, request(START))
    assert r.ticket is not None
    await store.delete_tenant("acme")
    assert not await store.settle(r.ticket, Consumption(1, 1), Periods.at(START))
    assert await store.get_tenant("acme") is None


async def test_delete_tenant_leaves_no_redis_keys(redis_store: RedisStore) -> None:
    await redis_store.create_tenant(tenant(requests_per_minute=5, tokens_per_minute=100))
    await redis_store.create_tenant(tenant("other"))
    _, key = new_api_key("acme", NOW, None, None)
    await redis_store.add_key(key)
    r = await admit(redis_store, request(START))
    assert r.ticket is not None
    await redis_store.settle(r.ticket, Consumption(1, 1), Periods.at(START))
    assert await redis_store.delete_tenant("acme")
    p = redis_store.keys.prefix
    left = sorted(await redis_store.client.keys(f"{p}:*"))
    assert left == [f"{p}:tenants", f"{p}:{{other}}:tenant"]


# -- prefixes -------------------------------------------------------------------------------

MS = to_ms(START)


def prefix(
    name: str,
    owner: str | None = "acme",
    blocks: int = 2,
    pin: bool = False,
    ttl: int | None = None,
) -> Prefix:
    return Prefix(
        name=name,
        owner=owner,
        text=f"You are {name}.",
        token_ids=list(range(blocks * 16 + 3)),
        num_blocks=blocks,
        model="m",
        pinned=pin,
        ttl_seconds=ttl,
        created_at=NOW,
    )


async def put(store: Store, p: Prefix, now_ms: int = MS) -> PrefixPut:
    result = await store.put_prefix(p, now_ms)
    assert result is not None
    return result


async def test_prefix_registry(store: Store) -> None:
    await store.create_tenant(tenant())
    await store.create_tenant(tenant("other"))
    assert await store.put_prefix(prefix("a", owner="nobody"), MS) is None
    assert (await put(store, prefix("b", pin=True))).replaced is None
    await put(store, prefix("a"))
    got = await store.get_prefix("acme", "b", MS)
    assert got is not None and got.pinned and got.token_ids == list(range(35))
    assert (got.requests, got.cached_tokens, got.expires_at) == (0, 0, None)
    assert [p.name for p in await store.list_prefixes("acme", MS)] == ["a", "b"]
    # Another tenant's names are invisible to it.
    assert await store.get_prefix("other", "b", MS) is None
    assert await store.list_prefixes("other", MS) == []
    assert await store.use_prefix(["other", None], "b", MS) is None
    used = await store.use_prefix(["acme", None], "b", MS)
    assert used is not None and used.requests == 1 and used.owner == "acme"
    await store.count_prefix_tokens("acme", "b", 32)
    await store.count_prefix_tokens("acme", "missing", 32)  # no counter appears for it
    got = await store.get_prefix("acme", "b", MS)
    assert got is not None and (got.requests, got.cached_tokens) == (1, 32)
    # Registering the name again replaces it; its counters start again.
    replaced = (await put(store, prefix("b", blocks=3))).replaced
    assert replaced is not None and replaced.pinned and replaced.num_blocks == 2
    got = await store.get_prefix("acme", "b", MS)
    assert got is not None and (got.num_blocks, got.pinned, got.requests) == (3, False, 0)
    deleted = await store.delete_prefix("acme", "b", MS)
    assert deleted is not None and deleted.num_blocks == 3
    assert await store.delete_prefix("acme", "b", MS) is None
    assert [p.name for p in await store.list_prefixes("acme", MS)] == ["a"]


async def test_public_prefixes_are_shadowed_by_a_tenants_own(store: Store) -> None:
    await store.create_tenant(tenant())
    await store.create_tenant(tenant("other"))
    assert (await put(store, prefix("sys", owner=None, blocks=4))).stored
    await put(store, prefix("sys", blocks=1))
    own = await store.use_prefix(["acme", None], "sys", MS)
    shared = await store.use_prefix(["other", None], "sys", MS)
    assert own is not None and (own.owner, own.num_blocks) == ("acme", 1)
    assert shared is not None and (shared.owner, shared.num_blocks) == (None, 4)
    assert [p.name for p in await store.list_prefixes(None, MS)] == ["sys"]
    public = await store.get_prefix(None, "sys", MS)
    assert public is not None and public.requests == 1
    await store.delete_tenant("acme")  # a tenant's prefixes go with it, the public ones stay
    assert await store.list_prefixes("acme", MS) == []
    await store.create_tenant(tenant())
    assert await store.get_prefix("acme", "sys", MS) is None
    assert await store.get_prefix(None, "sys", MS) is not None


async def test_prefix_leases_end_unless_used(store: Store) -> None:
    await store.create_tenant(tenant(max_prefixes=1))
    await put(store, prefix("a", pin=True, ttl=10))
    got = await store.get_prefix("acme", "a", MS + 9_999)
    assert got is not None and got.expires_at == utc(MS + 10_000)
    used = await store.use_prefix(["acme"], "a", MS + 5_000)  # a use moves the lease end
    assert used is not None and used.expires_at == utc(MS + 15_000)
    assert await store.get_prefix("acme", "a", MS + 14_999) is not None
    assert await store.get_prefix("acme", "a", MS + 15_000) is None
    assert await store.list_prefixes("acme", MS + 15_000) == []
    assert await store.use_prefix(["acme"], "a", MS + 15_000) is None
    assert (await put(store, prefix("b"), MS + 15_000)).stored  # no longer counted
    assert await store.delete_prefix("acme", "a", MS + 15_000) is None


async def test_prefix_limits_are_exact(store: Store) -> None:
    await store.create_tenant(tenant(max_prefixes=2, max_pinned_blocks=10))
    assert (await put(store, prefix("a", blocks=6, pin=True))).stored
    assert (await put(store, prefix("b", blocks=4, pin=True))).stored
    refused = await put(store, prefix("c"))
    assert not refused.stored
    assert refused.refusals == (Refusal("max_prefixes", None, False, 2, 2, 1),)
    refused = await put(store, prefix("a", blocks=7, pin=True))  # replaces: 4 + 7 > 10
    assert refused.refusals == (Refusal("max_pinned_blocks", None, False, 10, 4, 7),)
    refused = await put(store, prefix("c", blocks=7, pin=True))
    assert [r.limit for r in refused.refusals] == ["max_prefixes", "max_pinned_blocks"]
    assert (await put(store, prefix("a", blocks=6, pin=True))).stored  # same size: fits
    assert (await put(store, prefix("a", blocks=9))).stored  # unpinned blocks do not count
    assert (await put(store, prefix("b", blocks=10, pin=True))).stored
    got = await store.get_prefix("acme", "b", MS)
    assert got is not None and got.pinned_blocks == 10
    # A lowered quota refuses growth only: re-registering within the old counts still works.
    await store.replace_tenant(tenant(max_prefixes=1, max_pinned_blocks=5))
    assert (await put(store, prefix("a", blocks=9))).stored
    assert not (await put(store, prefix("a", blocks=6, pin=True))).stored
    # Public prefixes have no limits.
    for i in range(3):
        assert (await put(store, prefix(f"p{i}", owner=None, blocks=50, pin=True))).stored


async def test_delete_tenant_deletes_its_prefix_keys(redis_store: RedisStore) -> None:
    await redis_store.create_tenant(tenant())
    await put(redis_store, prefix("a", pin=True, ttl=60))
    await redis_store.use_prefix(["acme"], "a", MS)
    await put(redis_store, prefix("pub", owner=None))
    assert await redis_store.delete_tenant("acme")
    p = redis_store.keys.prefix
    left = sorted(await redis_store.client.keys(f"{p}:*"))
    assert left == [f"{p}:public:prefixes"]  # (the emptied tenant index went too)


# -- differential: both stores, same operations, same answers ---------------------------------

QUOTAS = st.fixed_dictionaries(
    {
        "requests_per_minute": st.none() | st.integers(1, 4),
        "tokens_per_minute": st.none() | st.integers(5, 120),
        "max_concurrent_requests": st.none() | st.integers(1, 3),
        "tokens_per_day": st.none() | st.integers(10, 300),
        "tokens_per_month": st.none() | st.integers(10, 600),
        "max_tokens_per_request": st.none() | st.integers(1, 40),
    }
)
STEPS_MS = [1, 400, 999, 1_000, 4_999, 5_000, 30_000, 59_000, 60_000, 3_600_000, 86_400_000]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 30), st.integers(0, 40)),
        st.tuples(st.just("settle"), st.integers(0, 20), st.integers(0, 40)),
        st.tuples(st.just("advance"), st.sampled_from(STEPS_MS), st.just(0)),
        st.tuples(st.just("renew"), st.integers(0, 20), st.just(0)),
    ),
    max_size=40,
)
# 23:59:50 on the last day of a month: sequences cross a minute, a day and a month.
DIFF_START = datetime(2025, 1, 31, 23, 59, 50, tzinfo=UTC).timestamp()


Quotas = dict[str, int | None]
Ops = list[tuple[str, int, int]]


async def _drive(store: Store, quota: Quotas, ops: Ops) -> list[object]:
    await store.create_tenant(
        Tenant(id="acme", quota=Quota(**quota), created_at=NOW, updated_at=NOW)
    )
    now, trace, tickets = DIFF_START, [], []
    for i, (op, a, b) in enumerate(ops):
        if op == "admit":
            r = await store.admit(AdmitRequest("acme", f"l{i}", a, b, 5_000, Periods.at(now)))
            trace.append(r)
            if r is not None and r.ticket is not None:
                tickets.append(r.ticket)
        elif op == "advance":
            now += a / 1000
        elif tickets:
            t = tickets[a % len(tickets)]
            if op == "settle":
                used = Consumption(t.reserved // 2, b % 20, 1)
                done = await store.settle(t, used, Periods.at(now))
                trace.append(("settled", done))
            else:
                trace.append(("renewed", await store.renew(t, to_ms(now) + 5_000, to_ms(now))))
    raw = await store.read_usage("acme", Periods.at(now))
    trace.append((raw.day, raw.month, raw.minutes, raw.in_flight))
    return trace


async def _both(
    drive: Callable[[Store, Quotas, Any], Awaitable[object]], quota: Quotas, ops: Any
) -> None:
    """Run the same operations on a MemoryStore and a RedisStore: the traces must be equal."""
    redis = await fresh_redis_store()
    try:
        expected = await drive(MemoryStore(), quota, ops)
        got = await drive(redis, quota, ops)
    finally:
        await close_redis_store(redis)
    assert got == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quota=QUOTAS, ops=OPS)
def test_memory_and_redis_agree(quota: Quotas, ops: Ops) -> None:
    asyncio.run(_both(_drive, quota, ops))


PREFIX_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["acme", None]),
            st.integers(0, 5),
            st.booleans(),
            st.sampled_from([None, 1, 2]),
        ),
        st.tuples(st.just("use"), st.sampled_from(["a", "b", "c"]), st.booleans()),
        st.tuples(
            st.just("delete"), st.sampled_from(["a", "b", "c"]), st.sampled_from(["acme", None])
        ),
        st.tuples(st.just("count"), st.sampled_from(["a", "b", "c"]), st.integers(0, 64)),
        st.tuples(st.just("advance"), st.sampled_from([1, 999, 1_000, 2_000])),
    ),
    max_size=30,
)
PREFIX_QUOTAS = st.fixed_dictionaries(
    {
        "max_prefixes": st.none() | st.integers(1, 3),
        "max_pinned_blocks": st.none() | st.integers(1, 8),
    }
)


async def _drive_prefixes(store: Store, quota: Quotas, ops: list[tuple]) -> list[object]:
    await store.create_tenant(tenant(**{k: v for k, v in quota.items() if v is not None}))
    now, trace = MS, []
    for op, *args in ops:
        if op == "put":
            name, owner, blocks, pin, ttl = args
            trace.append(await store.put_prefix(prefix(name, owner, blocks, pin, ttl), now))
        elif op == "use":
            name, own_first = args
            trace.append(await store.use_prefix(["acme", None] if own_first else [None], name, now))
        elif op == "delete":
            trace.append(await store.delete_prefix(args[1], args[0], now))
        elif op == "count":
            await store.count_prefix_tokens("acme", args[0], args[1])
        else:
            now += args[0]
        trace.append([await store.list_prefixes(o, now) for o in ("acme", None)])
    return trace


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quota=PREFIX_QUOTAS, ops=PREFIX_OPS)
def test_memory_and_redis_prefix_registries_agree(quota: Quotas, ops: list[tuple]) -> None:
    asyncio.run(_both(_drive_prefixes, quota, ops))
