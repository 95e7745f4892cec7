"""Tenant self-service under `/v1` (the caller's own tenant, from its API key)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.admin.schemas import TenantUsage
from gateway.routing import JSON, Endpoint
from gateway.state import get_state
from gateway.tenancy.auth import get_principal


async def usage(request: Request) -> Response:
    """The caller's own usage: today, this month, the last hour by minute, and its quota."""
    state = get_state(request)
    return JSON(await state.tenants.get_usage(get_principal(request.scope).tenant))


ENDPOINTS = (
    Endpoint(
        "GET",
        "/v1/usage",
        usage,
        "Your usage: today, this month, the last hour by minute, and your quota",
        "getUsage",
        "Tenants",
        TenantUsage,
        description="Usage of the caller's tenant",
        security="apiKey",
        errors=(401, 503),
    ),
)
