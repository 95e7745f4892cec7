"""`prefixgate engine`: load the engine, serve its internal API (`engine.service.app`) with
uvicorn and, with `--discovery`, heartbeat into Redis (`engine.service.discovery`)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from engine.errors import EngineOverloadedError
from engine.service import protocol
from engine.service.app import EngineService, create_engine_app, error_response
from engine.service.discovery import Heartbeat, RegistryKeys, heartbeating
from gateway.drain import Drain, draining_server
from gateway.logs import configure_logging
from gateway.settings import Settings

logger = logging.getLogger("prefixgate.engine")


def replica_identity(settings: Settings) -> tuple[str, str]:
    """(replica id, advertised URL): the settings', else the host name and the port."""
    host = socket.gethostname()
    replica_id = settings.replica_id or f"{host}:{settings.port}"
    bound = settings.host if settings.host not in ("0.0.0.0", "::", "") else host
    url = settings.advertise_url or f"http://{bound}:{settings.port}"
    return replica_id, url


def _answered_draining(path: str) -> bool:
    """A draining replica refuses new work only (its channels refuse new requests:
    `EngineService.add`)."""
    return path != protocol.WARM


def replica_server_config(app: Any, **options: Any) -> uvicorn.Config:
    """uvicorn's config for a replica's app (`options` are uvicorn's): no access log (the
    gateways log each request)."""
    return uvicorn.Config(app, access_log=False, **options)


def serve_engine(settings: Settings) -> int:
    from engine.async_engine import AsyncEngine
    from gateway.cli import freeze_gc_heap

    configure_logging(settings.log_level)
    replica_id, url = replica_identity(settings)
    engine = AsyncEngine.from_config(settings.engine_config())
    engine.start()
    freeze_gc_heap()

    @contextlib.asynccontextmanager
    async def registered(service: EngineService) -> AsyncIterator[None]:
        import redis.asyncio as aioredis

        assert settings.redis_url is not None
        client = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_timeout_s * 4
        )
        heartbeat = Heartbeat(
            engine,
            client,
            RegistryKeys(settings.redis_key_prefix),
            replica_id=replica_id,
            url=url,
            ttl_s=settings.replica_ttl_s,
            stats=service.wire_stats,
        )
        async with heartbeating(heartbeat):
            yield

    if settings.discovery and not settings.redis_url:
        print("prefixgate engine: --discovery needs PREFIXGATE_REDIS_URL", flush=True)
        engine.shutdown()
        return 2
    drain = Drain(settings.drain_timeout_s)
    app = create_engine_app(
        engine,
        replica_id=replica_id,
        model_name=settings.model_name(),
        background=registered if settings.discovery else None,
        draining=lambda: drain.draining,
        track=drain.hold,
    )
    line = {"event": "replica_ready", "replica": replica_id, "url": url,
            "discovery": settings.discovery, "model": settings.model_name()}  # fmt: skip
    logger.info(json.dumps(line))
    config = replica_server_config(
        app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level
    )
    refuse = error_response(EngineOverloadedError(f"replica {replica_id} is shutting down"))
    try:
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C cuts the drain short
            draining_server(config, drain, refuse, _answered_draining).run()
    finally:
        engine.shutdown()
    return 0
