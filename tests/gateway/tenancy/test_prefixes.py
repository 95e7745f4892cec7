"""The prefix registry through the gateway (fake engine, real Redis): the API, isolation between
tenants, use by reference, limits (also across two gateways), the engine's pin cap, public
prefixes, leases on a fake clock, warm-up at startup, tenant deletion, metrics."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from tenants import RedisStore, TenantService
from tests.gateway.conftest import MakeGateway, make_settings
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.tenancy.helpers import ADMIN, ADMIN_KEY, MODEL, Gateway, bearer
from tests.tenants.conftest import FakeClock, drop_keys, unique_prefix

SYSTEM = "You are the support assistant of Acme. Answer briefly and politely. " * 2


def prefix_body(name: str = "support", **fields: Any) -> dict[str, Any]:
    body = {"name": name, "messages": [{"role": "system", "content": SYSTEM}]}
    return body | fields


def chat_body(content: str = "Where is my order?", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]} | fields


async def post(gw: Gateway, key: str, path: str, body: Any) -> httpx.Response:
    return await gw.client.post(path, json=body, headers=bearer(key))


async def get(gw: Gateway, key: str, path: str) -> httpx.Response:
    return await gw.client.get(path, headers=bearer(key))


async def cached(gw: Gateway, key: str, body: dict[str, Any]) -> int:
    r = await post(gw, key, "/v1/chat/completions", body | {"max_tokens": 1})
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


async def test_register_use_list_and_delete(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    engine: FakeEngine = gw.engine
    key = await gw.tenant("acme")
    r = await post(gw, key, "/v1/prefixes", prefix_body(pin=True, ttl_seconds=3600))
    assert r.status_code == 201, r.text
    created = r.json()
    tokens = engine.warmed[-1][1]
    assert created["token_count"] == len(tokens) and created["num_blocks"] == len(tokens) // 16
    assert created["pinned"] and created["expires_at"] is not None and not created["public"]
    assert engine.pins["acme/support"].num_blocks == created["num_blocks"]
    # By reference: the registered messages come first; the prefix's full blocks hit.
    hit = await cached(gw, key, chat_body(prefix="support"))
    assert hit == created["num_blocks"] * 16
    assert engine.requests[-1][1][: len(tokens)] == tokens
    # The same system message sent without the reference hits the same blocks.
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}]
    assert await cached(gw, key, {"model": MODEL, "messages": messages}) == hit
    # prompt_cache_key naming it does the same; an unknown one is an ordinary request.
    assert await cached(gw, key, chat_body("Refund?", prompt_cache_key="support")) == hit
    assert await cached(gw, key, chat_body("Refund?", prompt_cache_key="no such")) == 0
    got = (await get(gw, key, "/v1/prefixes/support")).json()
    assert (got["requests"], got["cached_tokens"]) == (2, 2 * hit)
    assert [p["name"] for p in (await get(gw, key, "/v1/prefixes")).json()["data"]] == ["support"]
    r = await gw.client.delete("/v1/prefixes/support", headers=bearer(key))
    assert r.json() == {"name": "support", "object": "prefix", "deleted": True}
    assert "acme/support" not in engine.pins
    missing = await get(gw, key, "/v1/prefixes/support")
    assert missing.status_code == 404
    assert missing.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "prefix",
        "code": "prefix_not_found",
    }  # fmt: skip


async def test_another_tenants_prefix_is_invisible(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    a, b = await gw.tenant("acme"), await gw.tenant("beta")
    assert (await post(gw, a, "/v1/prefixes", prefix_body())).status_code == 201
    for r in (
        await get(gw, b, "/v1/prefixes/support"),
        await gw.client.delete("/v1/prefixes/support", headers=bearer(b)),
        await post(gw, b, "/v1/chat/completions", chat_body(prefix="support")),
    ):
        assert r.status_code == 404 and r.json()["error"]["param"] == "prefix"
    assert (await get(gw, b, "/v1/prefixes")).json()["data"] == []
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    body = {"model": MODEL, "messages": messages}
    assert await cached(gw, b, body) == 0  # B's identical messages: no hit on A's blocks
    assert await cached(gw, a, body) > 0


async def test_bad_bodies_and_uses(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    key = await gw.tenant("acme")
    for body, param in (
        ({"name": "a b", "text": "x"}, "name"),
        ({"name": "a", "text": "x", "messages": [{"role": "user", "content": "y"}]}, "body"),
        ({"name": "a"}, "body"),
        ({"name": "a", "messages": [{"role": "robot", "content": "y"}]}, "messages[0].role"),
        ({"name": "a", "text": "x" * 600}, "text"),  # longer than the context
        ({"name": "a", "text": "x", "ttl_seconds": 0}, "ttl_seconds"),
    ):
        r = await post(gw, key, "/v1/prefixes", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    await post(gw, key, "/v1/prefixes", {"name": "doc", "text": "Once upon a time"})
    r = await post(gw, key, "/v1/chat/completions", chat_body(prefix="doc"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prefix"
    completion = {"model": MODEL, "prompt": ", there", "prefix": "doc", "max_tokens": 1}
    r = await post(gw, key, "/v1/completions", completion)
    assert r.status_code == 200
    assert gw.engine.requests[-1][1] == gw.engine.tokenizer.encode("Once upon a time, there")


async def test_limits_and_the_engine_pin_cap(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(FakeEngine(num_blocks=40))  # pin cap: 20 blocks
    key = await gw.tenant("acme", max_prefixes=2, max_pinned_blocks=12)
    r = await post(gw, key, "/v1/prefixes", prefix_body("a", pin=True))
    assert r.status_code == 201, r.text
    r = await post(gw, key, "/v1/prefixes", prefix_body("b", pin=True))  # 2 * 9 blocks > 12
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "prefix_limit_exceeded"
    assert (
        "max_pinned_blocks of tenant 'acme' by 6 (Limit 12, Pinned 9, Requested 9)"
        in (r.json()["error"]["message"])
    )
    assert (await post(gw, key, "/v1/prefixes", prefix_body("b"))).status_code == 201
    r = await post(gw, key, "/v1/prefixes", prefix_body("c"))
    assert r.status_code == 409 and "max_prefixes" in r.json()["error"]["message"]
    # The engine refuses a pin past its cap (409) and the registry stays as it was.
    await gw.admin("PATCH", "/admin/tenants/acme", {"quota": {"max_pinned_blocks": None}})
    long = prefix_body("a", pin=True, messages=[{"role": "system", "content": SYSTEM * 3}])
    r = await post(gw, key, "/v1/prefixes", long)
    assert r.status_code == 409 and r.json()["error"]["code"] == "pin_refused", r.text
    kept = (await get(gw, key, "/v1/prefixes/a")).json()
    assert kept["num_blocks"] == 9 and kept["pinned"]
    assert gw.engine.pins["acme/a"].num_blocks == 9


async def test_limits_hold_across_two_gateways(make_gateway: MakeGateway) -> None:
    a = await make_gateway()
    b = await make_gateway()
    key = await a.tenant("acme", max_prefixes=5)
    responses = await asyncio.gather(
        *[post((a, b)[i % 2], key, "/v1/prefixes", prefix_body(f"p{i}")) for i in range(20)]
    )
    assert Counter(r.status_code for r in responses) == {201: 5, 409: 15}
    assert len((await get(b, key, "/v1/prefixes")).json()["data"]) == 5


async def test_public_prefixes(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    engine: FakeEngine = gw.engine
    a, b = await gw.tenant("acme"), await gw.tenant("beta")
    r = await gw.admin("POST", "/admin/prefixes", prefix_body("house", pin=True))
    assert r.status_code == 201 and r.json()["public"]
    shared = r.json()["num_blocks"] * 16
    assert "*/house" in engine.pins
    # Both tenants use it by name and hit its blocks...
    assert await cached(gw, a, chat_body("Same question", prefix="house")) == shared
    assert await cached(gw, b, chat_body("Same question", prefix="house")) == shared
    # ...and hit it without naming it; what follows it is not shared between them.
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "x" * 40}]
    body = {"model": MODEL, "messages": messages}
    first_a, second_a = await cached(gw, a, body), await cached(gw, a, body)
    first_b = await cached(gw, b, body)
    assert first_a == first_b == shared and second_a > shared
    # A tenant's own name shadows the public one.
    await post(gw, a, "/v1/prefixes", prefix_body("house", text="Private text", messages=None))
    completion = {"model": MODEL, "prompt": "!", "prefix": "house", "max_tokens": 1}
    await post(gw, a, "/v1/completions", completion)
    assert engine.requests[-1][1] == engine.tokenizer.encode("Private text!")
    listed = (await gw.client.get("/admin/prefixes", headers=ADMIN)).json()["data"]
    assert [(p["name"], p["requests"]) for p in listed] == [("house", 2)]
    assert (await gw.client.get("/v1/prefixes/house", headers=bearer(b))).status_code == 404
    r = await gw.client.delete("/admin/prefixes/house", headers=ADMIN)
    assert r.status_code == 200 and "*/house" not in engine.pins
    assert (await gw.client.delete("/admin/prefixes/house", headers=ADMIN)).status_code == 404
    r = await gw.client.post("/admin/prefixes", json=prefix_body(), headers=bearer(a))
    assert r.status_code == 403


async def test_leases_on_a_fake_clock(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore.from_url(redis_url, prefix=unique_prefix())
    tenants = TenantService(store, clock=clock)
    engine = FakeEngine()
    engine.clock = clock
    settings = make_settings(redis_url=redis_url, admin_key=ADMIN_KEY)
    app = create_app(settings, engine, tenants=tenants)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            gw = Gateway(app, http, engine)
            key = await gw.tenant("acme")
            await post(gw, key, "/v1/prefixes", prefix_body(pin=True, ttl_seconds=60))
            assert engine.pins["acme/support"].expires_at == clock.now + 60
            clock.advance(59)
            assert await cached(gw, key, chat_body(prefix="support")) > 0
            assert engine.pins["acme/support"].expires_at == clock.now + 60  # a use extends it
            clock.advance(60)
            assert (await get(gw, key, "/v1/prefixes/support")).status_code == 404
            assert engine.stats().pinned_blocks_by_tenant == {}  # the engine's lease ended too
    await drop_keys(store)
    await tenants.aclose()


async def test_startup_quota_change_and_tenant_deletion(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    key = await gw.tenant("acme")
    await post(gw, key, "/v1/prefixes", prefix_body("a", pin=True))
    await post(gw, key, "/v1/prefixes", prefix_body("b", text="Plain text prefix", messages=None))
    await gw.admin("POST", "/admin/prefixes", prefix_body("house", pin=True))
    # Another gateway on the same Redis warms everything before it serves.
    fresh = FakeEngine()
    await make_gateway(fresh)
    assert set(fresh.pins) == {"acme/a", "*/house"}
    assert {k for k, _, _ in fresh.warmed} == {"acme/a", None, "*/house"}
    before = len(gw.engine.warmed)
    r = await gw.admin("PUT", "/admin/tenants/acme/quota", {"max_pinned_blocks": 100})
    assert r.status_code == 200 and len(gw.engine.warmed) == before + 2  # re-warmed
    assert (await gw.admin("DELETE", "/admin/tenants/acme")).status_code == 200
    assert set(gw.engine.pins) == {"*/house"}
    await gw.tenant("acme")  # re-created: none of the old prefixes
    r = await gw.admin("GET", "/admin/prefixes")
    assert [p["name"] for p in r.json()["data"]] == ["house"]


async def test_prefix_metrics(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    key = await gw.tenant("acme")
    await post(gw, key, "/v1/prefixes", prefix_body(pin=True))
    hit = await cached(gw, key, chat_body(prefix="support"))
    text = (await gw.client.get("/metrics")).text
    s = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for family in text_string_to_metric_families(text)
        for x in family.samples
    }
    assert s[("prefixgate_pinned_blocks", (("tenant", "acme"),))] == hit // 16
    assert s[("prefixgate_prefix_requests_total", (("scope", "private"), ("tenant", "acme")))] == 1
    assert s[("prefixgate_prefix_cached_tokens_total", (("tenant", "acme"),))] == hit
