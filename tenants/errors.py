"""Typed errors of the tenants library: a message, a machine-readable `code` and the `param`
(field) at fault. The gateway alone decides their HTTP status and error body
(`gateway.errors.from_tenants_error`).
"""

from __future__ import annotations

from typing import ClassVar


class TenantsError(Exception):
    """Base class; subclasses fix the default `code`."""

    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param


class NotFoundError(TenantsError):
    """A tenant or key that does not exist."""

    default_code = "not_found"


class TenantNotFound(NotFoundError):
    default_code = "tenant_not_found"

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"Tenant '{tenant_id}' does not exist.")
        self.tenant_id = tenant_id


class KeyNotFound(NotFoundError):
    default_code = "api_key_not_found"

    def __init__(self, tenant_id: str, key_id: str) -> None:
        super().__init__(f"API key '{key_id}' of tenant '{tenant_id}' does not exist.")


class PrefixNotFound(NotFoundError):
    """A prefix name the caller cannot see: absent, lease ended, or another tenant's."""

    default_code = "prefix_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"Prefix '{name}' does not exist.", param="prefix")
        self.name = name


class ConflictError(TenantsError):
    """Creating something that already exists, or that a limit does not leave room for."""

    default_code = "conflict"


class PrefixLimitExceeded(ConflictError):
    """A registration over the owner's `max_prefixes` or `max_pinned_blocks`."""

    default_code = "prefix_limit_exceeded"


class InvalidError(TenantsError):
    """A request the library refuses as malformed; `param` names the field."""

    default_code = "invalid_value"


class AuthenticationError(TenantsError):
    """Missing, unknown, revoked or expired key, or disabled tenant: always the same message."""

    default_code = "invalid_api_key"
    MESSAGE: ClassVar[str] = "Incorrect API key provided."

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class StoreUnavailable(TenantsError):
    """The shared store (Redis) cannot be reached in time."""

    default_code = "store_unavailable"

    def __init__(self, detail: str = "") -> None:
        super().__init__("The quota store is unavailable; please retry shortly.")
        self.detail = detail  # for logs only: never sent to clients
