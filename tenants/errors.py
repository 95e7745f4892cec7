"""Typed errors of the tenants library, each carrying its HTTP status and OpenAI error fields.

The gateway maps any `TenantsError` to a response with `exc.http_status` and `exc.body()`
(OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class TenantsError(Exception):
    """Base class; subclasses fix the HTTP status, OpenAI `type` and default `code`."""

    http_status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI-shaped error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class NotFoundError(TenantsError):
    """A tenant or key that does not exist (404)."""

    http_status = 404
    error_type = "invalid_request_error"
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


class ConflictError(TenantsError):
    """Creating something that already exists (409)."""

    http_status = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class InvalidError(TenantsError):
    """A request the library refuses as malformed (400); `param` names the field."""

    http_status = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class AuthenticationError(TenantsError):
    """Missing, unknown, revoked or expired key, or disabled tenant: always the same message."""

    http_status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"
    MESSAGE: ClassVar[str] = "Incorrect API key provided."

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class StoreUnavailable(TenantsError):
    """The shared store (Redis) cannot be reached in time; the gateway answers 503."""

    http_status = 503
    error_type = "server_error"
    default_code = "store_unavailable"

    def __init__(self, detail: str = "") -> None:
        super().__init__("The quota store is unavailable; please retry shortly.")
        self.detail = detail  # for logs only: never sent to clients
