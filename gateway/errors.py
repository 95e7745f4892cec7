"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Everything the gateway refuses goes through `APIError`, whose `body()` is the only place the
error body is built, so no bad input ever turns into a 500. The typed errors and decisions of
the domain packages get their HTTP status here and nowhere else: engine exceptions in
`from_engine_error`, tenants errors in `from_tenants_error`, quota refusals in `from_refusal`.
"""

from __future__ import annotations

import json
import math

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from engine.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    PinRefusedError,
)
from tenants import (
    AdmissionDecision,
    AuthenticationError,
    ConflictError,
    InvalidError,
    Limit,
    NotFoundError,
    StoreUnavailable,
    TenantsError,
)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
NOT_FOUND = "not_found_error"


class APIError(Exception):
    """An error response with OpenAI's body shape; `headers` go on the HTTP response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def engine_not_ready() -> APIError:
    return APIError(
        503,
        "The model is still loading; retry shortly.",
        type=SERVER_ERROR,
        code="engine_not_ready",
        headers={"retry-after": "1"},
    )


def shutting_down() -> APIError:
    """What a draining gateway answers to a new request (`gateway.drain`)."""
    return APIError(
        503,
        "The server is shutting down; retry shortly.",
        type=SERVER_ERROR,
        code="server_shutting_down",
        headers={"retry-after": "1", "connection": "close"},
    )


def body_too_large(limit: int) -> APIError:
    return APIError(
        413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large"
    )


def request_timeout(timeout_s: float, what: str = "request body") -> APIError:
    return APIError(
        408,
        f"The {what} did not arrive within {timeout_s:g} seconds.",
        code="request_timeout",
        headers={"connection": "close"},
    )


def from_engine_error(exc: Exception) -> APIError:
    """Translate an engine exception raised by `add_request`, mid-stream or by a prefix
    warm-up (a refused pin: 409)."""
    if isinstance(exc, ContextLengthError):
        return APIError(400, exc.message, param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, param=exc.param)
    if isinstance(exc, EngineOverloadedError):
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return APIError(
            503,
            exc.message,
            type=SERVER_ERROR,
            code="engine_overloaded",
            headers={"retry-after": retry},
        )
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine has stopped.", type=SERVER_ERROR, code="engine_dead")
    if isinstance(exc, PinRefusedError):
        return APIError(409, exc.message, param="pin", code="pin_refused")
    return APIError(500, "Internal server error.", type=SERVER_ERROR, code="internal_error")


# Tenants errors: (HTTP status, OpenAI `type`, extra headers), the first matching class wins.
_TENANTS_ERRORS: tuple[tuple[type[TenantsError], int, str, dict[str, str]], ...] = (
    (InvalidError, 400, INVALID_REQUEST, {}),
    (AuthenticationError, 401, INVALID_REQUEST, {"www-authenticate": "Bearer"}),
    (NotFoundError, 404, INVALID_REQUEST, {}),
    (ConflictError, 409, INVALID_REQUEST, {}),
    (StoreUnavailable, 503, SERVER_ERROR, {"retry-after": "1"}),
)


def from_tenants_error(exc: TenantsError) -> APIError:
    """Translate a tenants-library error: 400, 401, 404, 409, 503 (500 for an unknown kind)."""
    for cls, status, type_, headers in _TENANTS_ERRORS:
        if isinstance(exc, cls):
            return APIError(
                status, exc.message, type=type_, param=exc.param, code=exc.code, headers=headers
            )
    return APIError(500, exc.message, type=SERVER_ERROR, param=exc.param, code=exc.code)


_TOKEN_LIMITS = (Limit.TOKENS_PER_MINUTE, Limit.TOKENS_PER_DAY, Limit.TOKENS_PER_MONTH)


def from_refusal(decision: AdmissionDecision) -> APIError:
    """A quota refusal: 400 for max_tokens_per_request, else 429 (`insufficient_quota` when a
    budget is spent, `rate_limit_exceeded` otherwise), with the decision's headers."""
    message = decision.message or "Request refused by the tenant's quota."
    headers = dict(decision.headers)
    if decision.limit is Limit.MAX_TOKENS_PER_REQUEST:
        return APIError(400, message, param="max_tokens", code="invalid_value", headers=headers)
    if decision.hard:
        code = type_ = "insufficient_quota"
    else:
        code, type_ = (
            "rate_limit_exceeded",
            "tokens" if decision.limit in _TOKEN_LIMITS else "requests",
        )
    return APIError(429, message, type=type_, code=code, headers=headers)


def from_validation_error(exc: ValidationError) -> APIError:
    """The most telling pydantic error as a 400, with `param` as OpenAI writes it
    (`messages[0].role`)."""
    err = _most_telling(exc.errors(include_url=False))
    if err["type"] == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request. The body must be valid JSON "
            f"({err['msg']}).",
            code="invalid_json",
        )
    if err["type"] == "model_type" and not err["loc"]:
        return bad_request("The request body must be a JSON object.", code="invalid_json")
    param = _param_from_loc(err["loc"])
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    return bad_request(f"Invalid value for '{param}': {err['msg']}.", param=param)


def _most_telling(errors: list[ErrorDetails]) -> ErrorDetails:
    """For a union (`stop`: a string or a list of strings), pydantic reports one error per
    member; a member whose type matched (a list that is too long) tells more than the members
    whose type did not ("should be a valid string")."""

    def type_mismatch(err: ErrorDetails) -> bool:
        return err["type"].endswith("_type") or err["type"] == "none_required"

    return min(enumerate(errors), key=lambda pair: (type_mismatch(pair[1]), pair[0]))[1]


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_from_loc(loc: tuple[int | str, ...]) -> str:
    # pydantic adds union members to the location ("str", "list[str]", "TextPart"); drop them:
    # our field names are lowercase identifiers that are not builtin type names.
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.isidentifier() and item.islower() and item not in _TYPE_NAMES:
            parts.append(f".{item}" if parts else item)
    return "".join(parts) or "body"
