"""Operations endpoints, no key needed: `/health`, `/ready`, `/metrics`, `/openapi.json`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.metrics import CONTENT_TYPE
from gateway.replicas.pool import ReplicaPool
from gateway.routing import JSON, Endpoint
from gateway.schemas import HealthResponse, ReadyResponse
from gateway.state import get_state
from tenants import FailureMode


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """200 once the engine is up (behind replicas: while one is in rotation) and, with Redis
    configured, Redis answers. 503 while no replica is in rotation, and while Redis is down in
    closed mode (this gateway refuses every /v1 request); 200 in open mode (it admits with
    per-process limits). Both Redis cases carry `tenant_store: unavailable`."""
    state = get_state(request)
    if state.engine is None:
        if state.load_error is not None:
            failed = ReadyResponse(
                status="failed", model=state.model_name, detail=str(state.load_error)
            )
            return JSON(failed, status_code=503)
        return JSON(ReadyResponse(status="loading", model=state.model_name), status_code=503)
    if isinstance(state.engine, ReplicaPool) and not state.engine.live():
        detail = "No engine replica is in rotation: API requests get 503 until one joins."
        body = ReadyResponse(status="unavailable", model=state.model_name, detail=detail)
        return JSON(body, status_code=503)
    if not state.settings.redis_url:
        return JSON(ReadyResponse(status="ready", model=state.model_name))
    if await state.tenants.check():
        return JSON(ReadyResponse(status="ready", model=state.model_name, tenant_store="ok"))
    if state.tenants.failure_mode is FailureMode.OPEN:
        detail = "Redis is unreachable: admitting with per-process limits (open mode)."
        body = ReadyResponse(
            status="ready", model=state.model_name, tenant_store="unavailable", detail=detail
        )
        return JSON(body)
    detail = "Redis is unreachable: API requests get 503 (closed mode)."
    body = ReadyResponse(
        status="unavailable", model=state.model_name, tenant_store="unavailable", detail=detail
    )
    return JSON(body, status_code=503)


async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return JSONResponse(get_state(request).openapi())


ENDPOINTS = (
    Endpoint("GET", "/health", health, "Process is up", "health", "Operations",
             HealthResponse, description="Up"),
    Endpoint("GET", "/ready", ready, "Engine is loaded", "ready", "Operations", ReadyResponse,
             description="Ready", errors=(503,), error_texts={503: "Loading or failed"},
             error_model=ReadyResponse),
    Endpoint("GET", "/metrics", metrics, "Prometheus metrics", "metrics", "Operations", None,
             description="Prometheus text format", media_type="text/plain"),
    Endpoint("GET", "/openapi.json", openapi, "This document", "openapi", "Operations", None,
             description="OpenAPI 3.1"),
)  # fmt: skip
