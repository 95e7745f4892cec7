"""The admin REST API over Redis: tenants, quotas, keys, usage, and its errors."""

from __future__ import annotations

import redis

from tests.gateway.conftest import MakeGateway
from tests.gateway.tenancy.helpers import ADMIN, bearer

JSON_ADMIN = ADMIN | {"content-type": "application/json"}


async def test_tenant_lifecycle(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    body = {"id": "acme", "name": "Acme", "metadata": {"plan": "pro"},
            "quota": {"requests_per_minute": 50, "tokens_per_day": 10_000}}  # fmt: skip
    r = await gw.admin("POST", "/admin/tenants", body)
    assert r.status_code == 201
    tenant = r.json()
    assert tenant["quota"]["requests_per_minute"] == 50
    assert tenant["quota"]["tokens_per_minute"] is None
    assert (await gw.admin("GET", "/admin/tenants/acme")).json() == tenant
    await gw.admin("POST", "/admin/tenants", {"id": "beta"})
    listed = (await gw.admin("GET", "/admin/tenants")).json()
    assert listed["object"] == "list" and {t["id"] for t in listed["data"]} == {"acme", "beta"}

    # PATCH is a merge patch: only the limits sent change; null makes one unlimited.
    patch = {"name": "Acme Corp", "quota": {"tokens_per_day": None, "max_concurrent_requests": 4}}
    r = await gw.admin("PATCH", "/admin/tenants/acme", patch)
    assert r.status_code == 200
    assert r.json()["name"] == "Acme Corp" and r.json()["metadata"] == {"plan": "pro"}
    assert {k: v for k, v in r.json()["quota"].items() if v is not None} == {
        "requests_per_minute": 50, "max_concurrent_requests": 4,
    }  # fmt: skip
    # PUT replaces the whole quota.
    r = await gw.admin("PUT", "/admin/tenants/acme/quota", {"tokens_per_minute": 900})
    assert {k: v for k, v in r.json()["quota"].items() if v is not None} == {
        "tokens_per_minute": 900
    }

    r = await gw.admin("DELETE", "/admin/tenants/acme")
    assert r.json() == {"id": "acme", "object": "tenant", "deleted": True}
    r = await gw.admin("GET", "/admin/tenants/acme")
    assert r.status_code == 404 and r.json()["error"]["code"] == "tenant_not_found"


async def test_admin_errors(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    await gw.admin("POST", "/admin/tenants", {"id": "acme"})
    cases = [
        ("POST", "/admin/tenants", {"id": "acme"}, 409, "tenant_exists", None),
        ("POST", "/admin/tenants", {"id": "no spaces"}, 400, None, "id"),
        ("POST", "/admin/tenants", {"id": "x", "quota": {"requests_per_minute": 0}}, 400, None,
         "quota.requests_per_minute"),
        ("POST", "/admin/tenants", {"id": "x", "quota": {"rpm": 5}}, 400, None, "quota.rpm"),
        ("POST", "/admin/tenants", {"name": "no id"}, 400, None, "id"),
        ("PUT", "/admin/tenants/acme/quota", {"tokens_per_day": "lots"}, 400, None,
         "tokens_per_day"),
        ("PATCH", "/admin/tenants/nobody", {"name": "x"}, 404, "tenant_not_found", None),
        ("GET", "/admin/tenants/{bad}", None, 404, "tenant_not_found", None),
        ("POST", "/admin/tenants/nobody/keys", None, 404, "tenant_not_found", None),
        ("DELETE", "/admin/tenants/acme/keys/key_0", None, 404, "api_key_not_found", None),
        ("POST", "/admin/tenants/acme/keys", {"expires_in_s": -1}, 400, None, "expires_in_s"),
        ("GET", "/admin/tenants/nobody/usage", None, 404, "tenant_not_found", None),
        ("PUT", "/admin/tenants", None, 405, "method_not_allowed", None),
    ]  # fmt: skip
    for method, path, body, status, code, param in cases:
        r = await gw.admin(method, path, body)
        assert r.status_code == status, (method, path, r.text)
        error = r.json()["error"]
        assert (error["code"], error["param"]) == (code, param), (method, path, error)
    r = await gw.client.post("/admin/tenants", content=b"{not json", headers=JSON_ADMIN)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


async def test_keys_issue_list_revoke_rotate(make_gateway: MakeGateway, redis_url: str) -> None:
    gw = await make_gateway()
    await gw.admin("POST", "/admin/tenants", {"id": "acme"})
    r = await gw.admin("POST", "/admin/tenants/acme/keys", {"name": "ci"})
    assert r.status_code == 201
    issued = r.json()
    key, key_id = issued["key"], issued["key_id"]
    assert key.startswith("pg-") and issued["prefix"] == key[:7] and issued["name"] == "ci"
    assert "key_hash" not in issued

    # Only hashes reach Redis: the secret appears in no key name and no value.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for name in client.scan_iter("*"):
        assert key not in name
        dump = client.dump(name) or b""
        assert key.encode() not in dump
    client.close()

    listed = (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"]
    assert [k["key_id"] for k in listed] == [key_id] and "key" not in listed[0]
    assert (await gw.admin("GET", f"/admin/tenants/acme/keys/{key_id}")).json() == listed[0]
    assert (await gw.chat(key, max_tokens=1)).status_code == 200

    # Rotate with a grace period: both keys work until it ends.
    r = await gw.admin("POST", f"/admin/tenants/acme/keys/{key_id}/rotate", {"grace_s": 600})
    assert r.status_code == 201 and r.json()["name"] == "ci"
    new_key, new_id = r.json()["key"], r.json()["key_id"]
    assert (await gw.chat(key, max_tokens=1)).status_code == 200
    # Rotate without one (empty body): the old key is refused at once.
    r = await gw.client.post(f"/admin/tenants/acme/keys/{new_id}/rotate", headers=JSON_ADMIN)
    newest = r.json()["key"]
    assert (await gw.chat(new_key, max_tokens=1)).status_code == 401
    assert (await gw.chat(newest, max_tokens=1)).status_code == 200

    # Revoke: refused from the next request on, and shown as revoked.
    r = await gw.admin("DELETE", f"/admin/tenants/acme/keys/{key_id}")
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert (await gw.chat(key, max_tokens=1)).status_code == 401

    # Deleting the tenant kills its keys.
    await gw.admin("DELETE", "/admin/tenants/acme")
    assert (await gw.chat(newest, max_tokens=1)).status_code == 401


async def test_disabling_a_tenant_refuses_its_keys(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    key = await gw.tenant("acme")
    await gw.admin("PATCH", "/admin/tenants/acme", {"disabled": True})
    assert (await gw.chat(key)).status_code == 401
    await gw.admin("PATCH", "/admin/tenants/acme", {"disabled": False})
    assert (await gw.chat(key, max_tokens=1)).status_code == 200


async def test_usage_read_and_reset(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    key = await gw.tenant("acme", tokens_per_day=1000)
    r = await gw.chat(key, max_tokens=3)
    total = r.json()["usage"]["total_tokens"]
    usage = (await gw.admin("GET", "/admin/tenants/acme/usage")).json()
    assert usage["today"]["total_tokens"] == total and usage["today"]["remaining"] == 1000 - total
    assert usage == await gw.usage(key) | {"as_of": usage["as_of"]}
    for method, path in (("POST", "/usage/reset"), ("DELETE", "/usage")):
        await gw.chat(key, max_tokens=3)
        r = await gw.admin(method, "/admin/tenants/acme" + path)
        assert r.status_code == 200
        assert r.json()["today"]["total_tokens"] == 0 and r.json()["today"]["remaining"] == 1000
    r = await gw.client.get("/admin/tenants/acme/usage", headers=bearer(key))
    assert r.status_code == 403


async def test_key_lifetime_past_a_century_is_a_400(make_gateway: MakeGateway) -> None:
    """Found by the fuzzer: a huge expires_in_s overflowed the datetime arithmetic (a 500)."""
    gw = await make_gateway()
    await gw.admin("POST", "/admin/tenants", {"id": "acme"})
    r = await gw.admin("POST", "/admin/tenants/acme/keys", {"expires_in_s": 10**12})
    assert r.status_code == 400 and r.json()["error"]["param"] == "expires_in_s"
    r = await gw.admin("POST", "/admin/tenants/acme/keys", {"expires_in_s": 100 * 365 * 86400})
    assert r.status_code == 201
