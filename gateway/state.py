"""What the app holds for its lifetime: settings, the engine client (once loaded), the tenant
service, hooks, metrics."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from starlette.requests import Request

from engine.config import EngineConfig
from gateway.engine_client import EngineClient, load_embedded_engine
from gateway.errors import APIError, engine_not_ready, model_not_found
from gateway.hooks import GenerationHooks
from gateway.metrics import GatewayMetrics
from gateway.openai.tokens import TokenTexts
from gateway.openapi import build_openapi
from gateway.prefixes import PrefixRegistry
from gateway.routing import Endpoint
from gateway.settings import Settings
from tenants import TenantService, build_service

logger = logging.getLogger("prefixgate")

# Blocking (run in a thread: the embedded engine) or a coroutine function (remote replicas).
EngineLoader = Callable[[EngineConfig], EngineClient | Awaitable[EngineClient]]


class GatewayState:
    """Per-app state (`app.state.gateway`).

    An injected engine client or tenant service belongs to the caller (who starts and shuts it
    down); the ones the app builds itself are started and shut down by the app's lifespan. The
    tenant service built from settings makes no connection until it is first used.
    """

    def __init__(
        self,
        settings: Settings,
        engine: EngineClient | None = None,
        hooks: GenerationHooks | None = None,
        tenants: TenantService | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.request_limits()
        self.engine = engine
        self.owns_engine = engine is None
        self.load_error: BaseException | None = None
        self.owns_tenants = tenants is None
        self.tenants = tenants or build_service(settings.tenants_config())
        self.hooks = hooks or GenerationHooks()
        self.metrics = GatewayMetrics(lambda: self.engine, self.tenants.stats)
        self.prefixes = PrefixRegistry(self.tenants, self.metrics, settings.anonymous)
        self.created = int(time.time())
        self.model_name = settings.served_model_name or (
            engine.model_name if engine is not None else settings.model_name()
        )
        self._token_texts: TokenTexts | None = None
        self.endpoints: Sequence[Endpoint] = ()  # the route table, set by `create_app`
        self._openapi: dict[str, Any] | None = None

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document of `endpoints` (built on first use)."""
        if self._openapi is None:
            self._openapi = build_openapi(self.endpoints)
        return self._openapi

    async def start_tenants(self) -> None:
        """Lifespan startup: load the Redis scripts (never raises for an outage) and log the
        tenancy mode, so an operator sees which one a process runs in."""
        await self.tenants.start()
        s = self.settings
        line = {
            "event": "tenants",
            "store": "redis" if s.redis_url else "memory",
            "admin_api": s.admin_key is not None,
            "anonymous": s.anonymous,
            "failure_mode": s.redis_failure_mode,
            "lease_ttl_s": s.lease_ttl_s,
        }
        logger.info(json.dumps(line))

    def require_engine(self) -> EngineClient:
        if self.engine is None:
            if self.load_error is not None:
                raise APIError(
                    503, "The model failed to load.", type="server_error", code="engine_failed"
                )
            raise engine_not_ready()
        return self.engine

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise model_not_found(model)

    def token_texts(self) -> TokenTexts:
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.require_engine().tokenizer)
        return self._token_texts

    async def load_engine(
        self,
        loader: EngineLoader = load_embedded_engine,
        on_error: Callable[[BaseException], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Embedded mode: build the engine in a thread (the server answers /health meanwhile);
        `on_ready` runs once it is up, before `/ready` reports it (if it raises, the load failed
        and the engine is shut down)."""
        started = time.perf_counter()
        engine: EngineClient | None = None
        try:
            config = self.settings.engine_config()
            if inspect.iscoroutinefunction(loader):
                engine = await cast(Awaitable[EngineClient], loader(config))
            else:
                engine = cast(EngineClient, await asyncio.to_thread(loader, config))
            engine.start()
            if on_ready is not None:
                on_ready()
            await self.prefixes.warm_all(engine)  # registered prefixes are hits from the start
        except Exception as exc:
            if engine is not None:
                engine.shutdown()
            self.load_error = exc
            logger.exception("engine failed to load")
            if on_error is not None:
                on_error(exc)
            return
        self.engine = engine
        line = {
            "event": "engine_ready",
            "model": self.model_name,
            "max_model_len": engine.max_model_len,
            "load_s": round(time.perf_counter() - started, 2),
        }
        logger.info(json.dumps(line))


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state
