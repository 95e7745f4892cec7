"""Admin REST API under `/admin`: tenants, quotas, API keys, usage, public prefixes.

Every route needs `Authorization: Bearer <PREFIXGATE_ADMIN_KEY>` (compared in constant time):
a tenant's key gets 403 `permission_denied`, no key or any other key 401 `invalid_api_key`.
Without an admin key configured the admin API is off: 404 `admin_api_disabled`.

The routes are the table `ENDPOINTS` at the end (also the source of the OpenAPI document).
Errors are OpenAI-shaped: 400 (invalid body, `param` names the field), 404 (`tenant_not_found`,
`api_key_not_found`), 409 (`tenant_exists`), 503 (`store_unavailable`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from engine.block_manager import PUBLIC_NAMESPACE
from gateway.admin.schemas import (
    ApiKeyInfo,
    ApiKeyList,
    IssuedApiKey,
    RotateKey,
    TenantDeleted,
    TenantList,
    TenantUsage,
)
from gateway.errors import APIError, from_tenants_error
from gateway.prefixes import PrefixCreate, PrefixDeleted, PrefixList, PrefixObject
from gateway.routing import JSON, Endpoint, Handler, optional_body, parse_body
from gateway.state import get_state
from tenants import (
    AuthenticationError,
    KeyCreate,
    Quota,
    Tenant,
    TenantCreate,
    TenantNotFound,
    TenantsError,
    TenantService,
    TenantUpdate,
    bearer_token,
    check_admin_key,
)
from tenants.models import TENANT_ID_PATTERN

_TENANT_ID = re.compile(TENANT_ID_PATTERN)


def admin_api_disabled() -> APIError:
    return APIError(
        404,
        "The admin API is disabled: start the gateway with PREFIXGATE_ADMIN_KEY set.",
        code="admin_api_disabled",
    )


def permission_denied() -> APIError:
    return APIError(
        403,
        "This API key cannot use the admin API; use the admin key (PREFIXGATE_ADMIN_KEY).",
        code="permission_denied",
    )


async def require_admin(request: Request) -> TenantService:
    """The tenant service, once the request has shown the admin key (else 404 / 401 / 403)."""
    state = get_state(request)
    admin_key = state.settings.admin_key_value()
    if admin_key is None:
        raise admin_api_disabled()
    token = bearer_token(request.headers.get("authorization"))
    if check_admin_key(token, admin_key):
        return state.tenants
    try:
        await state.tenants.authenticate(token)
    except TenantsError:  # unknown, revoked, missing, or the store cannot tell: not the admin
        raise from_tenants_error(AuthenticationError()) from None
    raise permission_denied()


def admin(handler: Callable[[Request, TenantService], Awaitable[Response]]) -> Handler:
    """Route handler behind `require_admin`, with a well-formed `tenant_id` path parameter."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        tenants = await require_admin(request)
        tenant_id = request.path_params.get("tenant_id")
        if tenant_id is not None and not _TENANT_ID.fullmatch(tenant_id):
            raise from_tenants_error(TenantNotFound(tenant_id))
        return await handler(request, tenants)

    return wrapper


def _tenant_id(request: Request) -> str:
    return str(request.path_params["tenant_id"])


def _key_id(request: Request) -> str:
    return str(request.path_params["key_id"])


# -- tenants ----------------------------------------------------------------------------------


@admin
async def create_tenant(request: Request, tenants: TenantService) -> Response:
    spec = await parse_body(request, TenantCreate)
    return JSON(await tenants.create_tenant(spec), status_code=201)


@admin
async def list_tenants(request: Request, tenants: TenantService) -> Response:
    return JSON(TenantList(data=await tenants.list_tenants()))


@admin
async def get_tenant(request: Request, tenants: TenantService) -> Response:
    return JSON(await tenants.get_tenant(_tenant_id(request)))


@admin
async def update_tenant(request: Request, tenants: TenantService) -> Response:
    patch = await parse_body(request, TenantUpdate)
    tenant = await tenants.update_tenant(_tenant_id(request), patch)
    if patch.quota is not None:
        await _quota_changed(request, tenant)
    return JSON(tenant)


@admin
async def delete_tenant(request: Request, tenants: TenantService) -> Response:
    """The tenant, its keys, usage and prefixes (their pins end)."""
    tenant_id = _tenant_id(request)
    state = get_state(request)
    await state.prefixes.delete_tenant(state.engine, tenant_id)
    return JSON(TenantDeleted(id=tenant_id))


@admin
async def set_quota(request: Request, tenants: TenantService) -> Response:
    quota = await parse_body(request, Quota)
    tenant = await tenants.set_quota(_tenant_id(request), quota)
    await _quota_changed(request, tenant)
    return JSON(tenant)


async def _quota_changed(request: Request, tenant: Tenant) -> None:
    """Re-warm the tenant's prefixes (re-pinning the pinned ones) under its new quota."""
    state = get_state(request)
    if state.engine is not None:
        await state.prefixes.warm_tenant(state.engine, tenant)


# -- keys -------------------------------------------------------------------------------------


@admin
async def issue_key(request: Request, tenants: TenantService) -> Response:
    spec = await optional_body(request, KeyCreate)
    issued = await tenants.issue_key(_tenant_id(request), spec)
    return JSON(IssuedApiKey.issued(issued), status_code=201)


@admin
async def list_keys(request: Request, tenants: TenantService) -> Response:
    keys = await tenants.list_keys(_tenant_id(request))
    return JSON(ApiKeyList(data=[ApiKeyInfo.of(k) for k in keys]))


@admin
async def get_key(request: Request, tenants: TenantService) -> Response:
    return JSON(ApiKeyInfo.of(await tenants.get_key(_tenant_id(request), _key_id(request))))


@admin
async def revoke_key(request: Request, tenants: TenantService) -> Response:
    return JSON(ApiKeyInfo.of(await tenants.revoke_key(_tenant_id(request), _key_id(request))))


@admin
async def rotate_key(request: Request, tenants: TenantService) -> Response:
    body = await optional_body(request, RotateKey)
    issued = await tenants.rotate_key(_tenant_id(request), _key_id(request), grace_s=body.grace_s)
    return JSON(IssuedApiKey.issued(issued), status_code=201)


# -- public prefixes --------------------------------------------------------------------------


@admin
async def create_public_prefix(request: Request, tenants: TenantService) -> Response:
    state = get_state(request)
    body = await parse_body(request, PrefixCreate)
    prefix = await state.prefixes.register(state.require_engine(), None, PUBLIC_NAMESPACE, body)
    return JSON(PrefixObject.of(prefix), status_code=201)


@admin
async def list_public_prefixes(request: Request, tenants: TenantService) -> Response:
    return JSON(PrefixList(data=[PrefixObject.of(p) for p in await tenants.list_prefixes(None)]))


@admin
async def get_public_prefix(request: Request, tenants: TenantService) -> Response:
    return JSON(PrefixObject.of(await tenants.get_prefix(None, _prefix_name(request))))


@admin
async def delete_public_prefix(request: Request, tenants: TenantService) -> Response:
    state = get_state(request)
    prefix = await state.prefixes.delete(state.engine, None, _prefix_name(request))
    return JSON(PrefixDeleted(name=prefix.name))


def _prefix_name(request: Request) -> str:
    return str(request.path_params["name"])


# -- usage ------------------------------------------------------------------------------------


@admin
async def get_usage(request: Request, tenants: TenantService) -> Response:
    return JSON(await tenants.get_usage(_tenant_id(request)))


@admin
async def reset_usage(request: Request, tenants: TenantService) -> Response:
    tenant_id = _tenant_id(request)
    await tenants.reset_usage(tenant_id)
    return JSON(await tenants.get_usage(tenant_id))


_TENANT = "/admin/tenants/{tenant_id}"
_PREFIX = "/admin/prefixes/{name}"
_KEY = _TENANT + "/keys/{key_id}"
_ERRORS = (401, 403, 404, 503)


def _admin(
    method: str,
    path: str,
    handler: Handler,
    summary: str,
    op_id: str,
    response: type[BaseModel],
    **fields: Any,
) -> Endpoint:
    fields.setdefault("errors", _ERRORS)
    texts = {404: "Unknown tenant, key or prefix"}
    return Endpoint(
        method, path, handler, summary, op_id, "Admin", response,
        security="adminKey", error_texts=texts, **fields,
    )  # fmt: skip


ENDPOINTS = (
    _admin("POST", "/admin/tenants", create_tenant, "Create a tenant", "createTenant", Tenant,
           body=TenantCreate, status=201, errors=(401, 403, 409, 503)),
    _admin("GET", "/admin/tenants", list_tenants, "List tenants", "listTenants", TenantList,
           errors=(401, 403, 503)),
    _admin("GET", _TENANT, get_tenant, "Describe a tenant", "getTenant", Tenant),
    _admin("PATCH", _TENANT, update_tenant,
           "Change some fields (merge patch; quota limits sent change, null = unlimited)",
           "updateTenant", Tenant, body=TenantUpdate),
    _admin("DELETE", _TENANT, delete_tenant, "Delete a tenant, its keys and usage",
           "deleteTenant", TenantDeleted),
    _admin("PUT", _TENANT + "/quota", set_quota, "Replace the quota", "setTenantQuota", Tenant,
           body=Quota),
    _admin("POST", _TENANT + "/keys", issue_key, "Issue an API key (the key is shown only here)",
           "issueApiKey", IssuedApiKey, body=KeyCreate, body_required=False, status=201),
    _admin("GET", _TENANT + "/keys", list_keys, "List the tenant's keys", "listApiKeys",
           ApiKeyList),
    _admin("GET", _KEY, get_key, "Describe an API key", "getApiKey", ApiKeyInfo),
    _admin("DELETE", _KEY, revoke_key, "Revoke an API key", "revokeApiKey", ApiKeyInfo),
    _admin("POST", _KEY + "/rotate", rotate_key,
           "Issue a replacement key and revoke this one (after grace_s)", "rotateApiKey",
           IssuedApiKey, body=RotateKey, body_required=False, status=201),
    _admin("GET", _TENANT + "/usage", get_usage, "Usage of the tenant", "getTenantUsage",
           TenantUsage),
    _admin("DELETE", _TENANT + "/usage", reset_usage, "Reset today's and this month's usage",
           "deleteTenantUsage", TenantUsage),
    _admin("POST", _TENANT + "/usage/reset", reset_usage,
           "Reset today's and this month's usage", "resetTenantUsage", TenantUsage),
    _admin("POST", "/admin/prefixes", create_public_prefix,
           "Register a public prefix: every tenant can use it by name, and hits it",
           "createPublicPrefix", PrefixObject, body=PrefixCreate, status=201,
           errors=(401, 403, 409, 503)),
    _admin("GET", "/admin/prefixes", list_public_prefixes, "List the public prefixes",
           "listPublicPrefixes", PrefixList, errors=(401, 403, 503)),
    _admin("GET", _PREFIX, get_public_prefix, "Describe a public prefix, with its counters",
           "getPublicPrefix", PrefixObject),
    _admin("DELETE", _PREFIX, delete_public_prefix, "Delete a public prefix (and end its pin)",
           "deletePublicPrefix", PrefixDeleted),
)  # fmt: skip
