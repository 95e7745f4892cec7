"""Tenant self-service under `/v1` (the caller's own tenant, from its API key): usage, and the
tenant's registered prefixes (`gateway/prefixes.py`). Another tenant's prefix names are 404,
exactly like names nobody registered."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.admin.schemas import TenantUsage
from gateway.prefixes import PrefixCreate, PrefixDeleted, PrefixList, PrefixObject
from gateway.routing import JSON, Endpoint, parse_body
from gateway.state import get_state
from gateway.tenancy.auth import get_principal


async def usage(request: Request) -> Response:
    """The caller's own usage: today, this month, the last hour by minute, and its quota."""
    state = get_state(request)
    return JSON(await state.tenants.get_usage(get_principal(request.scope).tenant))


async def create_prefix(request: Request) -> Response:
    state = get_state(request)
    body = await parse_body(request, PrefixCreate)
    engine = state.require_engine()
    principal = get_principal(request.scope)
    prefix = await state.prefixes.register(engine, principal.tenant, principal.namespace, body)
    return JSON(PrefixObject.of(prefix), status_code=201)


async def list_prefixes(request: Request) -> Response:
    state = get_state(request)
    prefixes = await state.tenants.list_prefixes(get_principal(request.scope).tenant)
    return JSON(PrefixList(data=[PrefixObject.of(p) for p in prefixes]))


async def get_prefix(request: Request) -> Response:
    state = get_state(request)
    tenant = get_principal(request.scope).tenant
    return JSON(PrefixObject.of(await state.tenants.get_prefix(tenant, _name(request))))


async def delete_prefix(request: Request) -> Response:
    state = get_state(request)
    tenant = get_principal(request.scope).tenant
    prefix = await state.prefixes.delete(state.engine, tenant, _name(request))
    return JSON(PrefixDeleted(name=prefix.name))


def _name(request: Request) -> str:
    return str(request.path_params["name"])


_PREFIX = "/v1/prefixes/{name}"
_TEXTS = {404: "No prefix of this name (another tenant's names included)"}

ENDPOINTS = (
    Endpoint("GET", "/v1/usage", usage,
             "Your usage: today, this month, the last hour by minute, and your quota",
             "getUsage", "Tenants", TenantUsage, description="Usage of the caller's tenant",
             security="apiKey", errors=(401, 503)),
    Endpoint("POST", "/v1/prefixes", create_prefix,
             "Register a prefix (system prompt) by name; warms it, pins it if asked",
             "createPrefix", "Prefixes", PrefixObject, status=201, security="apiKey",
             body=PrefixCreate, errors=(401, 409, 503),
             error_texts={409: "Over max_prefixes / max_pinned_blocks, or the engine's pin cap"}),
    Endpoint("GET", "/v1/prefixes", list_prefixes, "List your prefixes", "listPrefixes",
             "Prefixes", PrefixList, security="apiKey", errors=(401, 503)),
    Endpoint("GET", _PREFIX, get_prefix, "Describe a prefix, with its counters", "getPrefix",
             "Prefixes", PrefixObject, security="apiKey", errors=(401, 404, 503),
             error_texts=_TEXTS),
    Endpoint("DELETE", _PREFIX, delete_prefix, "Delete a prefix (and end its pin)",
             "deletePrefix", "Prefixes", PrefixDeleted, security="apiKey",
             errors=(401, 404, 503), error_texts=_TEXTS),
)  # fmt: skip
