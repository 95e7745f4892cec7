"""Helpers for the gateway's tenant tests: an app over Redis (DB 12) with the admin key set,
driven in process (`Gateway`, async) or through a real server (`admin_sync`, `tenant_key_sync`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette

from gateway.state import GatewayState

REDIS_URL = os.environ.get("PREFIXGATE_TEST_GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/12")
MODEL = "fake-model"  # FakeEngine's
ADMIN_KEY = "test-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat(content: str = "Hello", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    return body | fields


@dataclass
class Gateway:
    """An app whose lifespan is running, and an httpx client on it (no network)."""

    app: Starlette
    client: httpx.AsyncClient
    engine: Any

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.app.state.gateway
        return state

    async def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self.client.request(method, path, json=body, headers=ADMIN)

    async def tenant(self, tenant_id: str, **quota: int) -> str:
        """Create a tenant with this quota and return a new key of it."""
        r = await self.admin("POST", "/admin/tenants", {"id": tenant_id, "quota": quota})
        assert r.status_code == 201, r.text
        return await self.key(tenant_id)

    async def key(self, tenant_id: str, **spec: Any) -> str:
        r = await self.admin("POST", f"/admin/tenants/{tenant_id}/keys", spec)
        assert r.status_code == 201, r.text
        key: str = r.json()["key"]
        return key

    async def chat(self, key: str | None, **fields: Any) -> httpx.Response:
        headers = bearer(key) if key is not None else {}
        body = chat(**fields)
        return await self.client.post("/v1/chat/completions", json=body, headers=headers)

    async def usage(self, key: str) -> dict[str, Any]:
        r = await self.client.get("/v1/usage", headers=bearer(key))
        assert r.status_code == 200, r.text
        usage: dict[str, Any] = r.json()
        return usage


def admin_sync(url: str, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers=ADMIN)


def tenant_key_sync(url: str, tenant_id: str, **quota: int) -> str:
    """Through a running server: create a tenant with this quota and return a key of it."""
    r = admin_sync(url, "POST", "/admin/tenants", {"id": tenant_id, "quota": quota})
    assert r.status_code == 201, r.text
    r = admin_sync(url, "POST", f"/admin/tenants/{tenant_id}/keys")
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key
