"""API-key authentication on /v1/*, the admin key on /admin/*, and the anonymous embedded mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from tenants import RedisStore, TenantService
from tests.gateway.conftest import MakeGateway, make_settings
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.tenancy.helpers import ADMIN, ADMIN_KEY, bearer, chat
from tests.tenants.conftest import FakeClock

INVALID = {
    "error": {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


class CountingStore(RedisStore):
    """Counts key lookups, to check that every refused key costs the same work."""

    lookups = 0

    async def find_key(self, key_hash: str) -> Any:
        self.lookups += 1
        return await super().find_key(key_hash)


@pytest.fixture
async def clocked(redis_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, TenantService]]:
    """An app over a tenant service with a fake clock (key expiry) and a counting store."""
    settings = make_settings(redis_url=redis_url, admin_key=ADMIN_KEY)
    store = CountingStore.from_url(redis_url, prefix=settings.redis_key_prefix)
    svc = TenantService(store, clock=FakeClock())
    app = create_app(settings, FakeEngine(), tenants=svc)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield client, svc
    await svc.aclose()


async def test_every_refused_key_gets_the_same_401_after_the_same_work(
    clocked: tuple[httpx.AsyncClient, TenantService],
) -> None:
    client, svc = clocked
    await svc.create_tenant({"id": "acme"})
    await svc.create_tenant({"id": "off", "disabled": True})
    good = (await svc.issue_key("acme")).key
    revoked = await svc.issue_key("acme")
    await svc.revoke_key("acme", revoked.api_key.key_id)
    expiring = (await svc.issue_key("acme", {"expires_in_s": 60})).key
    disabled = (await svc.issue_key("off")).key
    assert isinstance(svc.clock, FakeClock)
    svc.clock.advance(61)

    cases: dict[str, dict[str, str]] = {
        "missing": {},
        "not bearer": {"authorization": f"Basic {good}"},
        "empty": {"authorization": "Bearer "},
        "unknown": bearer("pg-" + "x" * 43),
        "revoked": bearer(revoked.key),
        "expired": bearer(expiring),
        "disabled tenant": bearer(disabled),
        "admin key": ADMIN,
    }
    store = svc.store
    assert isinstance(store, CountingStore)
    for case, headers in cases.items():
        before = store.lookups
        r = await client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert (r.status_code, r.json()) == (401, INVALID), case
        assert r.headers["www-authenticate"] == "Bearer"
        assert store.lookups == before + 1, case  # one lookup, whatever the key
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(good))
    assert r.status_code == 200


async def test_tenant_identity_and_namespace_reach_the_engine(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    acme, beta = await gw.tenant("acme"), await gw.tenant("beta")
    for key in (acme, beta, acme):
        assert (await gw.chat(key, max_tokens=1)).status_code == 200
    tenants = [(t, ns) for _, _, _, t, ns in gw.engine.requests]
    assert [t for t, _ in tenants] == ["acme", "beta", "acme"]
    namespaces = [ns for _, ns in tenants]
    assert namespaces[0] == namespaces[2] != namespaces[1]
    assert namespaces[0].startswith("t:acme:") and namespaces[1].startswith("t:beta:")


async def test_a_recreated_tenant_gets_a_new_namespace(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    await gw.chat(await gw.tenant("acme"), max_tokens=1)
    assert (await gw.admin("DELETE", "/admin/tenants/acme")).status_code == 200
    await gw.chat(await gw.tenant("acme"), max_tokens=1)
    first, second = (ns for *_, ns in gw.engine.requests)
    assert first != second


async def test_admin_api_needs_the_admin_key(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    key = await gw.tenant("acme")
    for headers, status, code in [
        ({}, 401, "invalid_api_key"),
        (bearer("wrong"), 401, "invalid_api_key"),
        (bearer(key), 403, "permission_denied"),
        (ADMIN, 200, None),
    ]:
        r = await gw.client.get("/admin/tenants", headers=headers)
        assert r.status_code == status
        if code is not None:
            assert r.json()["error"]["code"] == code


async def test_operations_routes_need_no_key(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert (await gw.client.get(path)).status_code == 200, path
    assert (await gw.client.get("/v1/models")).status_code == 401


async def test_redis_without_admin_key_needs_keys_and_has_no_admin_api(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(admin_key=None)
    assert (await gw.chat(None)).status_code == 401
    r = await gw.client.get("/admin/tenants", headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "admin_api_disabled"


async def test_anonymous_embedded_mode_is_tenant_default() -> None:
    """No Redis and no admin key (the README quick start): no key needed, any key ignored."""
    engine = FakeEngine()
    app = create_app(make_settings(), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for headers in ({}, bearer("unused")):
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=2), headers=headers)
            assert r.status_code == 200
        usage = (await c.get("/v1/usage")).json()
        assert (await c.get("/admin/tenants", headers=ADMIN)).status_code == 404
    assert [(t, ns) for *_, t, ns in engine.requests] == [("default", None)] * 2
    assert usage["tenant_id"] == "default" and usage["today"]["requests"] == 2


async def test_admin_key_without_redis_needs_tenant_keys() -> None:
    app = create_app(make_settings(admin_key=ADMIN_KEY), FakeEngine())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.post("/v1/chat/completions", json=chat())).status_code == 401
        r = await c.post("/admin/tenants", json={"id": "acme"}, headers=ADMIN)
        assert r.status_code == 201
        key = (await c.post("/admin/tenants/acme/keys", headers=ADMIN)).json()["key"]
        r = await c.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(key))
        assert r.status_code == 200
