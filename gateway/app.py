"""The Starlette application factory.

```
AccessLogMiddleware      request id, one JSON access line, prefixgate_http_requests_total
  ErrorMiddleware        anything unexpected -> OpenAI-shaped 500 (bad input never gets here)
    BodyLimit            413 over settings.max_body_bytes, 408 past settings.body_timeout_s
      ApiKeyAuth         API key -> tenant Principal in the scope, on /v1/* (401 / 503)
        router           ENDPOINTS: the OpenAI API (gateway/openai), /v1/usage (gateway/tenancy),
                         operations, the admin API (gateway/admin, admin key); + extra_routes
```

Around each generation, `QuotaHooks` admit (429 / 400 / 503) and settle with the tenant
service, which the lifespan starts and closes with the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from gateway import operations
from gateway.admin import routes as admin
from gateway.engine_client import EngineClient, load_embedded_engine
from gateway.errors import APIError, from_tenants_error
from gateway.hooks import GenerationHooks
from gateway.middleware import AccessLogMiddleware, BodyLimitMiddleware, ErrorMiddleware
from gateway.openai import routes as openai
from gateway.routing import Endpoint, starlette_routes
from gateway.settings import Settings
from gateway.state import EngineLoader, GatewayState
from gateway.tenancy import routes as tenancy
from gateway.tenancy.auth import ApiKeyAuthMiddleware
from gateway.tenancy.quota_hooks import QuotaHooks
from tenants import TenantsError, TenantService

# The route table: Starlette's routes and the OpenAPI document are both generated from it.
ENDPOINTS: tuple[Endpoint, ...] = (
    *openai.ENDPOINTS,
    *tenancy.ENDPOINTS,
    *operations.ENDPOINTS,
    *admin.ENDPOINTS,
)


def create_app(
    settings: Settings | None = None,
    engine_client: EngineClient | None = None,
    *,
    engine_loader: EngineLoader = load_embedded_engine,
    tenants: TenantService | None = None,
    auth_middleware: Callable[[ASGIApp], ASGIApp] | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    hooks: GenerationHooks | None = None,
    on_engine_error: Callable[[BaseException], None] | None = None,
    on_engine_ready: Callable[[], None] | None = None,
) -> Starlette:
    """Build the gateway app.

    Args:
        settings: configuration; default reads `PREFIXGATE_*` from the environment.
        engine_client: an already built engine (tests, remote replicas); the caller starts and
            shuts it down. When None, the lifespan loads the embedded engine in the background
            with `engine_loader` (`/ready` is 503 until it is up) and shuts it down at exit.
        tenants: the tenant service (tests with a fake clock); the caller starts and closes
            it. When None, one is built from `settings` (Redis at `redis_url`, else in
            process) and the lifespan starts and closes it.
        auth_middleware: ASGI middleware class that puts a `Principal` in the scope (default:
            `ApiKeyAuthMiddleware` over the tenant service).
        extra_routes: more routes.
        hooks: admission / settlement around each generation (default: `QuotaHooks`).
        on_engine_error: called if the embedded engine fails to load (the CLI exits).
        on_engine_ready: called once the embedded engine runs, before `/ready` says so (the CLI
            freezes the GC heap there: `gateway.cli.freeze_gc_heap`).
    """
    settings = settings or Settings()
    state = GatewayState(settings, engine_client, hooks, tenants)
    state.endpoints = ENDPOINTS
    if hooks is None:
        state.hooks = QuotaHooks(state.tenants, state.metrics)
    auth = (
        Middleware(auth_middleware)
        if auth_middleware is not None
        else Middleware(ApiKeyAuthMiddleware, tenants=state.tenants, anonymous=settings.anonymous)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = None
        if state.owns_tenants:
            await state.start_tenants()
        if state.engine is not None:  # injected: warm the registered prefixes before serving
            await state.prefixes.warm_all(state.engine)
        else:
            loading = asyncio.create_task(
                state.load_engine(engine_loader, on_engine_error, on_engine_ready)
            )
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            if state.owns_engine and state.engine is not None:
                state.engine.shutdown()
            if state.owns_tenants:
                await state.tenants.aclose()

    app = Starlette(
        routes=[*starlette_routes(ENDPOINTS), *extra_routes],
        middleware=[
            Middleware(AccessLogMiddleware, metrics=state.metrics, enabled=settings.access_log),
            Middleware(ErrorMiddleware),
            Middleware(
                BodyLimitMiddleware,
                max_bytes=state.limits.max_body_bytes,
                timeout_s=state.limits.body_timeout_s,
            ),
            auth,
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            TenantsError: _tenants_error,
        },
        lifespan=lifespan,
    )
    app.state.gateway = state
    return app


def error_response(error: APIError) -> Response:
    """`error` as a response (also what a draining server answers: `gateway.drain`)."""
    return Response(
        error.body_bytes(),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _tenants_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TenantsError)
    return error_response(from_tenants_error(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = APIError(404, f"Unknown path: {request.url.path}", code="not_found")
    elif exc.status_code == 405:
        error = APIError(
            405, f"Method {request.method} not allowed here.", code="method_not_allowed"
        )
    else:
        error = APIError(exc.status_code, str(exc.detail))
    error.headers.update(exc.headers or {})
    return error_response(error)
