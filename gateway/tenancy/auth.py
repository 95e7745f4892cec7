"""Who is calling: API-key authentication on `/v1/*`, and the `Principal` it puts in the scope.

- Anonymous mode (`Settings.anonymous`: no Redis URL and no admin key): `/v1/*` needs no key and
  any key sent is ignored; every request is tenant `default` in the global cache namespace.
- Otherwise every `/v1/*` request needs `Authorization: Bearer <key>`, an active key of an
  enabled tenant. Missing, malformed, unknown, revoked and expired keys and disabled tenants all
  get the same 401 (`invalid_api_key`) after the same work (`TenantService.authenticate`); 503
  `store_unavailable` while the tenant store cannot be reached (closed failure mode).
- Other paths (`/health`, `/ready`, `/metrics`, `/openapi.json`) need no key; `/admin/*` checks
  the admin key itself (`gateway/admin/routes.py`). Their principal is `UNAUTHENTICATED`
  (tenant "").

Everything downstream (engine tenant and cache namespace, metric labels, access log, quotas)
reads the principal through `get_principal`.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from engine.request import DEFAULT_SHARE, TenantShare
from gateway.errors import from_tenants_error
from tenants import Caller, Tenant, TenantsError, TenantService, bearer_token

PRINCIPAL_SCOPE_KEY = "prefixgate.principal"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str = "default"
    namespace: str | None = None  # KV cache namespace (salt), set by the server, never the client
    priority: int = 0  # the tenant's quota `priority`: lower is served first (priority policy)
    share: TenantShare = DEFAULT_SHARE  # the tenant's quota `weight` and `max_kv_blocks`
    # The tenant's max_tokens_per_request: caps the default max_tokens of a request that sets none.
    max_tokens_per_request: int | None = None


ANONYMOUS = Principal()
UNAUTHENTICATED = Principal(tenant="")


def get_principal(scope: Scope) -> Principal:
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else ANONYMOUS


def cache_namespace(tenant: Tenant) -> str:
    """The tenant's KV cache namespace: salted by the server, so no two tenants ever share (or
    can time) each other's cached blocks. The creation instant keeps a tenant re-created under
    a deleted tenant's id away from the old tenant's blocks."""
    return f"t:{tenant.id}:{int(tenant.created_at.timestamp() * 1000)}"


def principal_of(caller: Caller) -> Principal:
    tenant = caller.tenant
    quota = tenant.quota
    return Principal(
        tenant=tenant.id,
        namespace=cache_namespace(tenant),
        priority=quota.priority or 0,
        share=TenantShare(weight=quota.weight or 1, max_kv_blocks=quota.max_kv_blocks),
        max_tokens_per_request=quota.max_tokens_per_request,
    )


def _is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class ApiKeyAuthMiddleware:
    """Bearer API key -> tenant `Principal` on `/v1/*` (see the module docstring).

    Args:
        tenants: the service that checks keys.
        anonymous: accept `/v1/*` without a key as tenant `default` (embedded, no admin key).
    """

    def __init__(self, app: ASGIApp, *, tenants: TenantService, anonymous: bool) -> None:
        self.app = app
        self.tenants = tenants
        self.anonymous = anonymous
        self._default: Principal | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[PRINCIPAL_SCOPE_KEY] = UNAUTHENTICATED
        if _is_v1(scope["path"]):
            scope[PRINCIPAL_SCOPE_KEY] = await self._authenticate(scope)
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> Principal:
        if self.anonymous:
            return await self._default_principal()
        try:
            caller = await self.tenants.authenticate(bearer_token(_authorization(scope)))
        except TenantsError as exc:
            raise from_tenants_error(exc) from None
        return principal_of(caller)

    async def _default_principal(self) -> Principal:
        if self._default is None:
            caller = await self.tenants.default_caller()
            self._default = Principal(tenant=caller.tenant_id)  # global namespace, as before
        return self._default


def _authorization(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None
