"""Tenants cannot reach each other, tenant keys cannot reach the admin API, keys are compared in
constant time and never appear in logs or metrics (over Redis, as deployed)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from typing import Any

import pytest

from gateway.admin.routes import ENDPOINTS as ADMIN_ENDPOINTS
from tests.gateway.conftest import MakeGateway
from tests.gateway.tenancy.helpers import ADMIN_KEY, Gateway, bearer

ACME_FIELDS = {"id": "acme", "name": "Acme", "metadata": {"secret-plan": "acme-only"}}


async def two_tenants(gw: Gateway) -> tuple[str, str, str]:
    """acme (with a key) and beta (with a key, whose id is returned too)."""
    r = await gw.admin("POST", "/admin/tenants", ACME_FIELDS)
    assert r.status_code == 201, r.text
    acme = await gw.key("acme")
    beta = await gw.tenant("beta")
    listed = (await gw.admin("GET", "/admin/tenants/beta/keys")).json()["data"]
    return acme, beta, listed[0]["key_id"]


def _path(template: str, tenant_id: str, key_id: str) -> str:
    return template.replace("{tenant_id}", tenant_id).replace("{key_id}", key_id)


async def test_admin_routes_refuse_tenant_keys(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    acme, beta, beta_key_id = await two_tenants(gw)
    for endpoint in ADMIN_ENDPOINTS:
        for tenant in ("acme", "beta"):  # its own tenant or another one: the same refusal
            path = _path(endpoint.path, tenant, beta_key_id)
            for key, status, code in [
                (acme, 403, "permission_denied"),
                (beta, 403, "permission_denied"),
                ("pg-" + "A" * 43, 401, "invalid_api_key"),
                (ADMIN_KEY + "x", 401, "invalid_api_key"),
            ]:
                r = await gw.client.request(endpoint.method, path, json={}, headers=bearer(key))
                assert (r.status_code, r.json()["error"]["code"]) == (status, code), path
                assert "acme-only" not in r.text and beta_key_id not in r.text
            r = await gw.client.request(endpoint.method, path)
            assert r.status_code == 401, path
    # Nothing changed: both tenants and their keys still work.
    assert (await gw.chat(acme)).status_code == 200
    assert (await gw.chat(beta)).status_code == 200
    assert len((await gw.admin("GET", "/admin/tenants")).json()["data"]) == 2


async def test_usage_is_the_callers_own(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    acme, beta, _ = await two_tenants(gw)
    assert (await gw.chat(acme, max_tokens=3)).status_code == 200
    for probe in ("/v1/usage?tenant_id=beta", "/v1/usage?tenant=beta", "/v1/usage/beta"):
        r = await gw.client.get(probe, headers=bearer(acme))
        assert r.status_code in (200, 404), probe
        if r.status_code == 200:
            assert r.json()["tenant_id"] == "acme"
        else:
            assert "beta" not in r.json()["error"]["message"].replace(probe, "")
    acme_usage, beta_usage = await gw.usage(acme), await gw.usage(beta)
    assert acme_usage["tenant_id"] == "acme" and acme_usage["today"]["requests"] == 1
    assert beta_usage["tenant_id"] == "beta" and beta_usage["today"]["requests"] == 0
    assert "acme-only" not in str(beta_usage)


async def test_keys_are_scoped_to_their_tenant(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    acme, beta, beta_key_id = await two_tenants(gw)
    # Even the admin cannot reach beta's key through acme's path: 404, nothing of beta's.
    for method, suffix in [("GET", ""), ("DELETE", ""), ("POST", "/rotate")]:
        r = await gw.admin(method, f"/admin/tenants/acme/keys/{beta_key_id}{suffix}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "api_key_not_found"
        assert "beta" not in r.text
    assert (await gw.chat(beta)).status_code == 200  # not revoked, not rotated
    # A tenant's key dies with its tenant; the other tenant's key lives on.
    assert (await gw.admin("DELETE", "/admin/tenants/acme")).status_code == 200
    r = await gw.chat(acme)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert (await gw.chat(beta)).status_code == 200
    # A re-created tenant of the same id does not revive the old key.
    await gw.admin("POST", "/admin/tenants", {"id": "acme"})
    assert (await gw.chat(acme)).status_code == 401


async def test_keys_are_compared_in_constant_time(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key check ends in `hmac.compare_digest` over two SHA-256 digests: never `==` on a
    key, never the key itself (its length and prefix cannot shorten the comparison)."""
    gw = await make_gateway()
    acme, _, _ = await two_tenants(gw)
    compared: list[tuple[Any, Any]] = []
    compare_digest = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr("tenants.keys.hmac.compare_digest", recording)
    digest = re.compile(rb"[0-9a-f]{64}")
    for key, path, status in [
        (acme, "/v1/models", 200),  # a tenant key
        ("pg-" + "A" * 43, "/v1/models", 401),  # an unknown key
        ("x", "/v1/models", 401),  # a malformed one
        (ADMIN_KEY, "/admin/tenants", 200),  # the admin key
        ("wrong-admin-key", "/admin/tenants", 401),
        (acme, "/admin/tenants", 403),  # a tenant key on the admin API
    ]:
        compared.clear()
        assert (await gw.client.get(path, headers=bearer(key))).status_code == status
        assert compared, (key, path)
        for a, b in compared:
            assert digest.fullmatch(a) and digest.fullmatch(b)
            assert key.encode() not in (a, b)


async def test_key_material_never_in_logs_or_metrics(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await make_gateway(access_log=True)
    acme, beta, beta_key_id = await two_tenants(gw)
    rotated = (await gw.admin("POST", f"/admin/tenants/beta/keys/{beta_key_id}/rotate")).json()
    secrets = [acme, beta, rotated["key"], ADMIN_KEY, "pg-wrong-" + "B" * 40]
    for key in secrets:
        await gw.chat(key, max_tokens=2)
        await gw.chat(key, max_tokens=2, stream=True)
        await gw.client.get("/v1/usage", headers=bearer(key))
        await gw.client.get("/admin/tenants", headers=bearer(key))
        await gw.client.get("/v1/models", headers={"authorization": key})  # no "Bearer"
    metrics = (await gw.client.get("/metrics")).text
    assert 'tenant="acme"' in metrics  # the scrape did see the traffic
    logged = "\n".join(
        [r.getMessage() + str(r.args) + str(r.exc_text) for r in caplog.records]
        + [logging.Formatter().format(r) for r in caplog.records]
    )
    assert '"status":200' in logged  # access lines were captured
    for secret in secrets:
        fingerprints = [secret, hashlib.sha256(secret.encode()).hexdigest(), secret[7:20]]
        for text in fingerprints:
            assert text not in logged, text
            assert text not in metrics, text
