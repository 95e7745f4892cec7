"""Engine replicas behind the gateway: the remote `EngineClient` (`remote`), the pool that
routes over several (`pool`, `router`), and where they come from (`discovery`).
`replicas_loader(settings)` is the app's engine loader when `settings.remote_engines`."""

from __future__ import annotations

from engine.config import EngineConfig
from gateway.engine_client import EngineClient
from gateway.replicas.remote import Timeouts
from gateway.settings import Settings
from gateway.state import EngineLoader


def timeouts(settings: Settings) -> Timeouts:
    return Timeouts(
        connect_s=min(2.0, settings.engine_timeout_s),
        call_s=settings.engine_timeout_s,
        ttl_s=settings.replica_ttl_s,
        probe_s=min(1.0, settings.replica_ttl_s / 3),
    )


def replicas_loader(settings: Settings) -> EngineLoader:
    """An async engine loader: a `ReplicaPool` over `settings.engine_urls`, or over the
    replicas registered in Redis (`settings.discovery`); it returns once one replica is up."""

    async def load(config: EngineConfig) -> EngineClient:
        import redis.asyncio as aioredis

        from engine.service.discovery import RegistryKeys
        from gateway.replicas.discovery import RedisReplicas, StaticReplicas
        from gateway.replicas.pool import ReplicaPool

        pool = ReplicaPool(
            settings.routing, settings.routing_load_weight, model_name=settings.model_name()
        )
        try:
            if settings.discovery:
                if not settings.redis_url:
                    raise ValueError("PREFIXGATE_DISCOVERY needs PREFIXGATE_REDIS_URL")
                client = aioredis.Redis.from_url(
                    settings.redis_url, socket_timeout=settings.redis_timeout_s * 4
                )
                keys = RegistryKeys(settings.redis_key_prefix)
                await RedisReplicas(pool, client, keys, timeouts(settings)).first()
            else:
                urls = settings.engine_url_list()
                await StaticReplicas(pool, urls, timeouts(settings)).first()
        except BaseException:
            pool.shutdown()
            raise
        return pool

    return load
