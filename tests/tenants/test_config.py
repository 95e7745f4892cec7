"""The tenants config (checked at construction) and the store factory."""

from __future__ import annotations

import pytest

from tenants import FailureMode, MemoryStore, RedisStore, TenantsConfig, build_service, build_store


def test_defaults() -> None:
    c = TenantsConfig()
    assert c.embedded and c.admin_key is None and c.failure_mode is FailureMode.CLOSED
    assert not TenantsConfig(redis_url="redis://localhost:6379/2").embedded
    assert TenantsConfig(failure_mode="open").failure_mode is FailureMode.OPEN  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_mode", "sometimes"),
        ("lease_ttl_s", 0),
        ("socket_timeout_s", -1.0),
        ("connect_timeout_s", 0.0),
        ("pool_timeout_s", 0.0),
        ("op_timeout_s", 0.0),
        ("max_connections", 0),
        ("breaker_cooldown_s", -0.5),
    ],
)
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    """A ValueError (not an assert, which `python -O` drops) that says which field is wrong."""
    with pytest.raises(ValueError, match=f"^{field} "):
        TenantsConfig(**{field: value})  # type: ignore[arg-type]


async def test_build_store_and_service() -> None:
    assert isinstance(build_store(None), MemoryStore)
    redis = build_store("redis://127.0.0.1:6379/13")
    assert isinstance(redis, RedisStore)
    await redis.aclose()
    svc = build_service(TenantsConfig(redis_url=None, lease_ttl_s=5))
    assert isinstance(svc.store, MemoryStore) and svc.lease_ttl_ms == 5000
    await svc.aclose()
