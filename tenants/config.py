"""Configuration of the tenants library, built once at the edge (gateway lifespan, CLI).

Environment (names shared with the gateway):
    PREFIXGATE_REDIS_URL           unset: in-process store (embedded mode)
    PREFIXGATE_ADMIN_KEY           unset: admin API off
    PREFIXGATE_REDIS_FAILURE_MODE  closed (default) | open
    PREFIXGATE_LEASE_TTL_S         concurrency lease TTL in seconds (default 300)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
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
        self.failure_mode = FailureMode(self.failure_mode)
        assert self.lease_ttl_s > 0, "lease_ttl_s must be positive"
        assert self.max_connections > 0
        assert min(self.socket_timeout_s, self.connect_timeout_s, self.pool_timeout_s) > 0
        assert self.op_timeout_s > 0 and self.breaker_cooldown_s >= 0

    @property
    def embedded(self) -> bool:
        """No Redis: one process, in-memory store."""
        return not self.redis_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TenantsConfig:
        env = os.environ if env is None else env
        return cls(
            redis_url=env.get("PREFIXGATE_REDIS_URL") or None,
            admin_key=env.get("PREFIXGATE_ADMIN_KEY") or None,
            failure_mode=FailureMode(env.get("PREFIXGATE_REDIS_FAILURE_MODE", "closed").lower()),
            lease_ttl_s=float(env.get("PREFIXGATE_LEASE_TTL_S", "300")),
        )


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
