"""Config from the environment and the store factory."""

from __future__ import annotations

import pytest

from tenants import FailureMode, MemoryStore, RedisStore, TenantsConfig, build_service, build_store


def test_from_env() -> None:
    c = TenantsConfig.from_env({})
    assert c.embedded and c.admin_key is None and c.failure_mode is FailureMode.CLOSED
    c = TenantsConfig.from_env(
        {
            "PREFIXGATE_REDIS_URL": "redis://localhost:6379/2",
            "PREFIXGATE_ADMIN_KEY": "adm",
            "PREFIXGATE_REDIS_FAILURE_MODE": "OPEN",
            "PREFIXGATE_LEASE_TTL_S": "30",
        }
    )
    assert not c.embedded and c.admin_key == "adm"
    assert c.failure_mode is FailureMode.OPEN and c.lease_ttl_s == 30
    with pytest.raises(ValueError):
        TenantsConfig.from_env({"PREFIXGATE_REDIS_FAILURE_MODE": "sometimes"})


async def test_build_store_and_service() -> None:
    assert isinstance(build_store(None), MemoryStore)
    redis = build_store("redis://127.0.0.1:6379/13")
    assert isinstance(redis, RedisStore)
    await redis.aclose()
    svc = build_service(TenantsConfig(redis_url=None, lease_ttl_s=5))
    assert isinstance(svc.store, MemoryStore) and svc.lease_ttl_ms == 5000
    await svc.aclose()
