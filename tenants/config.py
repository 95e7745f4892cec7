"""Configuration of the tenants library, built once at the edge and passed in.

The library reads no environment: the gateway's `Settings` reads `PREFIXGATE_REDIS_URL`,
`PREFIXGATE_ADMIN_KEY`, `PREFIXGATE_REDIS_FAILURE_MODE`, ... and builds a `TenantsConfig`
(`Settings.tenants_config()`; the table is in docs/configuration.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .failover import FailureMode
from .memory_store import MemoryStore
from .redis_store import RedisStore
from .service import TenantService
from .store import Store


@dataclass(slots=True)
class TenantsConfig:
    """Everything the tenants library needs; timeouts in seconds."""

    redis_url: str | None = None
    admin_key: str | None = None
    failure_mode: FailureMode = FailureMode.CLOSED
    lease_ttl_s: float = 300.0
    key_prefix: str = "pg"  # Redis key namespace, to share one Redis between deployments
    socket_timeout_s: float = 0.5
    connect_timeout_s: float = 0.5
    pool_timeout_s: float = 1.0  # wait at most this for a free pooled connection
    op_timeout_s: float = 2.0  # overall deadline of one store operation
    max_connections: int = 64
    breaker_cooldown_s: float = 1.0

    def __post_init__(self) -> None:
        """Raises `ValueError` naming the first invalid field."""
        try:
            self.failure_mode = FailureMode(self.failure_mode)
        except ValueError:
            modes = ", ".join(m.value for m in FailureMode)
            raise ValueError(
                f"failure_mode must be one of {modes}: {self.failure_mode!r}"
            ) from None
        positive = ("lease_ttl_s", "socket_timeout_s", "connect_timeout_s", "pool_timeout_s")
        for name in (*positive, "op_timeout_s", "max_connections"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive: {getattr(self, name)!r}")
        if not self.breaker_cooldown_s >= 0:
            raise ValueError(f"breaker_cooldown_s must be >= 0: {self.breaker_cooldown_s!r}")

    @property
    def embedded(self) -> bool:
        """No Redis: one process, in-memory store."""
        return not self.redis_url


def build_store(
    redis_url: str | None,
    *,
    key_prefix: str = "pg",
    socket_timeout_s: float = 0.5,
    connect_timeout_s: float = 0.5,
    pool_timeout_s: float = 1.0,
    op_timeout_s: float = 2.0,
    max_connections: int = 64,
) -> Store:
    """`RedisStore` for a URL (no connection is made yet), `MemoryStore` for None."""
    if not redis_url:
        return MemoryStore()
    return RedisStore.from_url(
        redis_url,
        prefix=key_prefix,
        socket_timeout=socket_timeout_s,
        connect_timeout=connect_timeout_s,
        max_connections=max_connections,
        pool_timeout=pool_timeout_s,
        op_timeout=op_timeout_s,
    )


def build_service(
    config: TenantsConfig, *, clock: Callable[[], float] = time.time
) -> TenantService:
    """The service for a config (call `await service.aclose()` at shutdown)."""
    store = build_store(
        config.redis_url,
        key_prefix=config.key_prefix,
        socket_timeout_s=config.socket_timeout_s,
        connect_timeout_s=config.connect_timeout_s,
        pool_timeout_s=config.pool_timeout_s,
        op_timeout_s=config.op_timeout_s,
        max_connections=config.max_connections,
    )
    return TenantService(
        store,
        clock=clock,
        failure_mode=config.failure_mode,
        lease_ttl_s=config.lease_ttl_s,
        breaker_cooldown_s=config.breaker_cooldown_s,
    )
