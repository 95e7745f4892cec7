"""Who is calling: the `Principal` that authentication puts in the ASGI scope.

Embedded mode without an admin key has no authentication: every request is tenant `default`
(`AnonymousAuthMiddleware`). The tenants phase replaces that middleware with API-key
authentication that writes its own `Principal` under the same scope key; everything downstream
(engine tenant and cache namespace, metric labels, access log) reads it through `get_principal`.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

PRINCIPAL_SCOPE_KEY = "prefixgate.principal"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str = "default"
    namespace: str | None = None  # KV cache namespace (salt), set by the server, never the client
    priority: int = 0


ANONYMOUS = Principal()


def get_principal(scope: Scope) -> Principal:
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else ANONYMOUS


class AnonymousAuthMiddleware:
    """Every request is the `default` tenant (embedded mode, no admin key configured)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[PRINCIPAL_SCOPE_KEY] = ANONYMOUS
        await self.app(scope, receive, send)
