"""The route table: each `Endpoint` is written once, and both the Starlette routes and the OpenAPI
document (`gateway/openapi.py`) are generated from it. Also the request-body helpers every
handler uses (`parse_body`, `optional_body`) and `JSON` for pydantic responses.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.errors import bad_request, from_validation_error
from gateway.schemas import ErrorResponse

T = TypeVar("T", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]
Security = Literal["apiKey", "adminKey"]

_CONVERTER = re.compile(r"{(\w+):\w+}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route: what Starlette serves and what the OpenAPI document says about it.

    `path` is Starlette's (a converter such as `{model:path}` is allowed; the document shows
    `{model}`). `errors` are the documented error statuses (OpenAI's error body); a route with a
    `body` also documents 400, 408 and 413 (`BodyLimitMiddleware`). `error_texts` overrides the
    default description of a status.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    operation_id: str
    tag: str
    response: type[BaseModel] | None  # the success body (None: no JSON schema)
    description: str = ""  # of the success response; default: the summary
    status: int = 200
    media_type: str = "application/json"
    stream: type[BaseModel] | None = None  # SSE event body when the request sets `stream`
    security: Security | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    errors: tuple[int, ...] = ()
    error_texts: Mapping[int, str] = field(default_factory=dict)
    error_model: type[BaseModel] = ErrorResponse

    @property
    def openapi_path(self) -> str:
        return _CONVERTER.sub(r"{\1}", self.path)

    @property
    def error_statuses(self) -> tuple[int, ...]:
        if self.body is None:
            return self.errors
        return tuple(sorted({400, 408, 413, *self.errors}))

    def route(self) -> Route:
        return Route(self.path, self.handler, methods=[self.method])


def starlette_routes(endpoints: Iterable[Endpoint]) -> list[BaseRoute]:
    return [e.route() for e in endpoints]


class JSON(JSONResponse):
    """JSONResponse for pydantic models."""

    def __init__(self, model: BaseModel, status_code: int = 200) -> None:
        super().__init__(model.model_dump(mode="json"), status_code=status_code)


async def _read_body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect as exc:
        raise bad_request("The client disconnected while sending the body.") from exc


async def parse_body(request: Request, model: type[T]) -> T:
    """The JSON body validated as `model`; a 400 naming the field otherwise."""
    body = await _read_body(request)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def optional_body(request: Request, model: type[T]) -> T:
    """Like `parse_body`, but an empty body means all defaults."""
    raw = await _read_body(request)
    if not raw.strip():
        return model()
    return await parse_body(request, model)
