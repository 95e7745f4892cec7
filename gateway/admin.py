"""Admin REST API under `/admin`: tenants, quotas, API keys, usage.

Every route needs `Authorization: Bearer <PREFIXGATE_ADMIN_KEY>` (compared in constant time):
a tenant's key gets 403 `permission_denied`, no key or any other key 401 `invalid_api_key`.
Without an admin key configured the admin API is off: 404 `admin_api_disabled`.

| route | body | answer |
|---|---|---|
| `POST /admin/tenants` | `TenantCreate` | 201 `Tenant` (409 if the id exists) |
| `GET /admin/tenants` | | `TenantList` |
| `GET /admin/tenants/{id}` | | `Tenant` |
| `PATCH /admin/tenants/{id}` | `TenantUpdate` (merge patch) | `Tenant` |
| `DELETE /admin/tenants/{id}` | | `TenantDeleted` (keys refused at once) |
| `PUT /admin/tenants/{id}/quota` | `Quota` (replaces the whole quota) | `Tenant` |
| `POST /admin/tenants/{id}/keys` | `KeyCreate` (optional) | 201 `IssuedApiKey` |
| `GET /admin/tenants/{id}/keys` | | `ApiKeyList` |
| `GET /admin/tenants/{id}/keys/{key_id}` | | `ApiKeyInfo` |
| `DELETE /admin/tenants/{id}/keys/{key_id}` | | `ApiKeyInfo` (revoked) |
| `POST /admin/tenants/{id}/keys/{key_id}/rotate` | `RotateKey` (optional) | 201 `IssuedApiKey` |
| `GET /admin/tenants/{id}/usage` | | `Usage` |
| `POST /admin/tenants/{id}/usage/reset`, `DELETE /admin/tenants/{id}/usage` | | `Usage` |

Errors are OpenAI-shaped: 400 (invalid body, `param` names the field), 404 (`tenant_not_found`,
`api_key_not_found`), 409 (`tenant_exists`), 503 (`store_unavailable`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.admin_protocol import (
    ApiKeyInfo,
    ApiKeyList,
    IssuedApiKey,
    RotateKey,
    TenantDeleted,
    TenantList,
)
from gateway.errors import APIError, bad_request, from_tenants_error
from gateway.routes import JSON, parse_body
from gateway.state import get_state
from tenants import (
    AuthenticationError,
    KeyCreate,
    Quota,
    TenantCreate,
    TenantNotFound,
    TenantsError,
    TenantService,
    TenantUpdate,
    bearer_token,
    check_admin_key,
)
from tenants.models import TENANT_ID_PATTERN

T = TypeVar("T", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]

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


async def optional_body(request: Request, model: type[T]) -> T:
    """Like `parse_body`, but an empty body means all defaults."""
    try:
        raw = await request.body()
    except ClientDisconnect as exc:
        raise bad_request("The client disconnected while sending the body.") from exc
    if not raw.strip():
        return model()
    return await parse_body(request, model)


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
    return JSON(await tenants.update_tenant(_tenant_id(request), patch))


@admin
async def delete_tenant(request: Request, tenants: TenantService) -> Response:
    tenant_id = _tenant_id(request)
    await tenants.delete_tenant(tenant_id)
    return JSON(TenantDeleted(id=tenant_id))


@admin
async def set_quota(request: Request, tenants: TenantService) -> Response:
    quota = await parse_body(request, Quota)
    return JSON(await tenants.set_quota(_tenant_id(request), quota))


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


# -- usage ------------------------------------------------------------------------------------


@admin
async def get_usage(request: Request, tenants: TenantService) -> Response:
    return JSON(await tenants.get_usage(_tenant_id(request)))


@admin
async def reset_usage(request: Request, tenants: TenantService) -> Response:
    tenant_id = _tenant_id(request)
    await tenants.reset_usage(tenant_id)
    return JSON(await tenants.get_usage(tenant_id))


def routes() -> list[BaseRoute]:
    tenant = "/admin/tenants/{tenant_id}"
    key = tenant + "/keys/{key_id}"
    return [
        Route("/admin/tenants", create_tenant, methods=["POST"]),
        Route("/admin/tenants", list_tenants, methods=["GET"]),
        Route(tenant, get_tenant, methods=["GET"]),
        Route(tenant, update_tenant, methods=["PATCH"]),
        Route(tenant, delete_tenant, methods=["DELETE"]),
        Route(tenant + "/quota", set_quota, methods=["PUT"]),
        Route(tenant + "/keys", issue_key, methods=["POST"]),
        Route(tenant + "/keys", list_keys, methods=["GET"]),
        Route(key, get_key, methods=["GET"]),
        Route(key, revoke_key, methods=["DELETE"]),
        Route(key + "/rotate", rotate_key, methods=["POST"]),
        Route(tenant + "/usage", get_usage, methods=["GET"]),
        Route(tenant + "/usage", reset_usage, methods=["DELETE"]),
        Route(tenant + "/usage/reset", reset_usage, methods=["POST"]),
    ]
