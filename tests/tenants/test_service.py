"""TenantService on both stores: admin CRUD with typed errors, keys, authentication, usage."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tenants import (
    AuthenticationError,
    ConflictError,
    InvalidError,
    KeyNotFound,
    PrefixLimitExceeded,
    PrefixNotFound,
    PrefixRegistration,
    Quota,
    TenantNotFound,
    TenantService,
)
from tenants.periods import utc

from .conftest import START, FakeClock


async def test_tenant_crud(service: TenantService, clock: FakeClock) -> None:
    t = await service.create_tenant(
        {"id": "acme", "name": "Acme", "quota": {"requests_per_minute": 5}}
    )
    assert t.quota.requests_per_minute == 5 and t.created_at == utc(int(START * 1000))
    with pytest.raises(ConflictError) as exc:
        await service.create_tenant({"id": "acme"})
    assert exc.value.code == "tenant_exists"
    clock.advance(10)
    t2 = await service.update_tenant("acme", {"metadata": {"plan": "pro"}, "disabled": True})
    assert t2.name == "Acme" and t2.metadata == {"plan": "pro"} and t2.disabled
    assert t2.quota == t.quota and t2.updated_at > t.updated_at
    t3 = await service.set_quota("acme", {"tokens_per_day": 1000})
    assert t3.quota == Quota(tokens_per_day=1000)  # PUT replaces the whole quota
    assert (await service.update_tenant("acme", {"name": None})).name is None
    assert [x.id for x in await service.list_tenants()] == ["acme"]
    await service.delete_tenant("acme")
    with pytest.raises(TenantNotFound) as nf:
        await service.get_tenant("acme")
    assert nf.value.code == "tenant_not_found"
    with pytest.raises(TenantNotFound):
        await service.delete_tenant("acme")
    with pytest.raises(TenantNotFound):
        await service.set_quota("acme", {})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"id": "has space"}, "id"),
        ({"id": "a{b}"}, "id"),
        ({"id": "ok", "quota": {"requests_per_minute": 0}}, "quota.requests_per_minute"),
        ({"id": "ok", "quota": {"requests_per_minute": "5"}}, "quota.requests_per_minute"),
        ({"id": "ok", "quota": {"tokens_per_day": 1.5}}, "quota.tokens_per_day"),
        ({"id": "ok", "quota": {"no_such_limit": 1}}, "quota.no_such_limit"),
        ({"id": "ok", "surprise": 1}, "surprise"),
    ],
)
async def test_invalid_bodies_are_400(service: TenantService, body: dict, param: str) -> None:
    with pytest.raises(InvalidError) as exc:
        await service.create_tenant(body)
    assert exc.value.param == param


async def test_patch_merges_quota(service: TenantService) -> None:
    await service.create_tenant(
        {"id": "acme", "quota": {"requests_per_minute": 5, "tokens_per_day": 100}}
    )
    t = await service.update_tenant("acme", {"quota": {"tokens_per_day": 200}})
    assert t.quota == Quota(requests_per_minute=5, tokens_per_day=200)
    t = await service.update_tenant("acme", {"quota": {"requests_per_minute": None}})
    assert t.quota == Quota(tokens_per_day=200)
    with pytest.raises(InvalidError):
        await service.update_tenant("acme", {"quota": {"tokens_per_day": -1}})
    with pytest.raises(TenantNotFound):
        await service.update_tenant("nobody", {"quota": {"tokens_per_day": 1}})


async def test_default_caller_and_start(service: TenantService) -> None:
    await service.start()
    caller = await service.default_caller()
    assert caller.tenant_id == "default" and caller.tenant.quota == Quota()
    assert (await service.admit("default", prompt_tokens=1, max_tokens=1)).admitted
    assert await service.check()


async def test_ensure_tenant(service: TenantService) -> None:
    a = await service.ensure_tenant("default")
    b = await service.ensure_tenant("default", Quota(requests_per_minute=1))
    assert a == b and a.quota == Quota()


async def test_keys_issue_authenticate_revoke(service: TenantService, clock: FakeClock) -> None:
    await service.create_tenant({"id": "acme"})
    issued = await service.issue_key("acme", {"name": "ci"})
    clock.advance(1)  # keys are listed by creation time
    assert issued.key.startswith("pg-") and len(issued.key) == 46
    body = issued.response()
    assert body["key"] == issued.key and body["tenant_id"] == "acme" and "key_hash" not in body
    assert body["prefix"] == issued.key[:7]
    other = await service.issue_key("acme")
    caller = await service.authenticate(issued.key)
    assert caller.tenant_id == "acme" and caller.key_id == issued.api_key.key_id
    assert [k.key_id for k in await service.list_keys("acme")] == [
        issued.api_key.key_id,
        other.api_key.key_id,
    ]
    revoked = await service.revoke_key("acme", issued.api_key.key_id)
    assert revoked.revoked and revoked.revoked_at is not None
    with pytest.raises(AuthenticationError):  # refused at once
        await service.authenticate(issued.key)
    assert (await service.authenticate(other.key)).tenant_id == "acme"
    with pytest.raises(KeyNotFound):
        await service.revoke_key("acme", "key_nope")
    with pytest.raises(TenantNotFound):
        await service.issue_key("nobody")
    with pytest.raises(TenantNotFound):
        await service.list_keys("nobody")


async def test_every_auth_failure_looks_the_same(service: TenantService, clock: FakeClock) -> None:
    await service.create_tenant({"id": "acme"})
    await service.create_tenant({"id": "off"})
    revoked = await service.issue_key("acme")
    await service.revoke_key("acme", revoked.api_key.key_id)
    expiring = await service.issue_key("acme", {"expires_in_s": 60})
    disabled = await service.issue_key("off")
    await service.update_tenant("off", {"disabled": True})
    clock.advance(60)
    presented = [None, "", "garbage", "pg-" + "A" * 43, revoked.key, expiring.key, disabled.key]
    bodies = []
    for key in presented:
        with pytest.raises(AuthenticationError) as exc:
            await service.authenticate(key)
        bodies.append((exc.value.message, exc.value.code, exc.value.param))
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0][1] == "invalid_api_key"


async def test_key_expiry(service: TenantService, clock: FakeClock) -> None:
    await service.create_tenant({"id": "acme"})
    expires = utc(int(START * 1000)) + timedelta(seconds=30)
    issued = await service.issue_key("acme", {"expires_at": expires.isoformat()})
    assert issued.api_key.expires_at == expires
    clock.advance(29.999)
    await service.authenticate(issued.key)
    clock.advance(0.001)
    with pytest.raises(AuthenticationError):
        await service.authenticate(issued.key)
    with pytest.raises(InvalidError):
        await service.issue_key("acme", {"expires_at": expires.isoformat()})  # in the past now


async def test_rotate(service: TenantService, clock: FakeClock) -> None:
    await service.create_tenant({"id": "acme"})
    old = await service.issue_key("acme", {"name": "prod"})
    new = await service.rotate_key("acme", old.api_key.key_id)
    assert new.api_key.name == "prod" and new.key != old.key
    await service.authenticate(new.key)
    with pytest.raises(AuthenticationError):
        await service.authenticate(old.key)
    graceful = await service.rotate_key("acme", new.api_key.key_id, grace_s=60)
    await service.authenticate(new.key)  # still valid during the grace period
    await service.authenticate(graceful.key)
    clock.advance(60)
    with pytest.raises(AuthenticationError):
        await service.authenticate(new.key)


async def test_delete_tenant_refuses_its_keys(service: TenantService) -> None:
    await service.create_tenant({"id": "acme"})
    issued = await service.issue_key("acme")
    await service.authenticate(issued.key)
    await service.delete_tenant("acme")
    with pytest.raises(AuthenticationError):
        await service.authenticate(issued.key)


async def test_usage_read_and_reset(service: TenantService, clock: FakeClock) -> None:
    await service.create_tenant(
        {"id": "acme", "quota": {"tokens_per_day": 1000, "requests_per_minute": 2}}
    )
    for minute in range(3):
        d = await service.admit("acme", prompt_tokens=10, max_tokens=20)
        assert d.ticket is not None
        await service.settle(d.ticket, prompt_tokens=10, completion_tokens=minute, cached_tokens=4)
        clock.advance(60)
    usage = await service.get_usage("acme")
    assert usage.today.requests == 3 and usage.today.total_tokens == 33
    assert usage.today.prompt_tokens == 30 and usage.today.cached_tokens == 12
    assert usage.today.limit == 1000 and usage.today.remaining == 967
    assert usage.today.resets_at.isoformat() == "2025-03-15T00:00:00+00:00"
    assert usage.this_month.period == "2025-03" and usage.this_month.limit is None
    assert [m.completion_tokens for m in usage.recent] == [0, 1, 2]
    assert [m.start.minute for m in usage.recent] == [0, 1, 2]
    assert usage.quota.requests_per_minute == 2
    await service.reset_usage("acme")
    usage = await service.get_usage("acme")
    assert usage.today.total_tokens == 0 and usage.recent == [] and usage.today.remaining == 1000
    with pytest.raises(TenantNotFound):
        await service.get_usage("nobody")
    with pytest.raises(TenantNotFound):
        await service.reset_usage("nobody")


async def test_recent_usage_is_the_last_hour(service: TenantService, clock: FakeClock) -> None:
    await service.create_tenant({"id": "acme"})
    for _ in range(2):
        d = await service.admit("acme", prompt_tokens=1, max_tokens=1)
        assert d.ticket is not None
        await service.settle(d.ticket, prompt_tokens=1, completion_tokens=1)
        clock.advance(3600)
    usage = await service.get_usage("acme")
    assert usage.recent == []
    assert usage.today.requests == 2


# -- prefixes ----------------------------------------------------------------------------------


async def register(
    service: TenantService, owner: str | None, name: str, blocks: int, **spec: object
) -> PrefixRegistration:
    body = {"name": name, "text": f"You are {name}.", **spec}
    ids = list(range(blocks * 16 + 5))
    return await service.register_prefix(owner, body, token_ids=ids, block_size=16, model="m")


async def test_prefix_lease_on_the_service_clock(service: TenantService, clock: FakeClock) -> None:
    await service.create_tenant({"id": "acme"})
    reg = await register(service, "acme", "support", 4, pin=True, ttl_seconds=60)
    p = reg.prefix
    assert (p.num_blocks, p.pinned_blocks, p.token_count, reg.replaced) == (4, 4, 69, None)
    assert p.expires_at == utc(int(START * 1000) + 60_000)
    clock.advance(59)
    used = await service.use_prefix("acme", "support")  # extends to 59 + 60
    assert used.requests == 1 and used.expires_at == utc(int((START + 119) * 1000))
    await service.count_prefix_tokens(used, 64)
    assert (await service.get_prefix("acme", "support")).cached_tokens == 64
    clock.advance(60)
    with pytest.raises(PrefixNotFound) as nf:
        await service.get_prefix("acme", "support")
    assert (nf.value.code, nf.value.param) == ("prefix_not_found", "prefix")
    assert await service.list_prefixes("acme") == []


async def test_prefix_errors(service: TenantService) -> None:
    await service.create_tenant(
        {"id": "acme", "quota": {"max_prefixes": 2, "max_pinned_blocks": 10}}
    )
    await service.create_tenant({"id": "other"})
    with pytest.raises(TenantNotFound):
        await register(service, "nobody", "a", 1)
    for bad in ({"name": "a/b", "text": "x"}, {"name": "a", "text": "x", "messages": [{}]},
                {"name": "a"}, {"name": "x" * 65, "text": "x"}):  # fmt: skip
        with pytest.raises(InvalidError):
            await service.register_prefix("acme", bad, token_ids=[1], block_size=16, model="m")
    await register(service, "acme", "a", 6, pin=True)
    await register(service, "acme", "b", 4, pin=True)
    with pytest.raises(PrefixLimitExceeded) as over:
        await register(service, "acme", "a", 8, pin=True)
    assert over.value.message == (
        "Registering prefix 'a' would exceed max_pinned_blocks of tenant 'acme' by 2 "
        "(Limit 10, Pinned 4, Requested 8)."
    )
    with pytest.raises(PrefixLimitExceeded, match="max_prefixes of tenant 'acme' by 1"):
        await register(service, "acme", "c", 1)
    # Another tenant's names: not found, never forbidden.
    for call in (service.get_prefix("other", "a"), service.delete_prefix("other", "a"),
                 service.use_prefix("other", "a")):  # fmt: skip
        with pytest.raises(PrefixNotFound):
            await call
    await register(service, None, "a", 1)  # public
    assert (await service.use_prefix("other", "a")).owner is None
    assert (await service.use_prefix("acme", "a")).owner == "acme"
    replaced = (await register(service, "acme", "a", 2)).replaced
    assert replaced is not None and replaced.pinned
    assert (await service.delete_prefix("acme", "a")).num_blocks == 2
    assert [p.name for p in await service.list_prefixes(None)] == ["a"]
