"""Plain ASGI middleware (streaming-safe: none of them buffers a response).

Order, outermost first: `AccessLogMiddleware` (request id, timing, one structured log line and
the request counter), `ErrorMiddleware` (any exception -> OpenAI-shaped error if nothing was sent
yet), `BodyLimitMiddleware` (413, 408), then authentication and the router.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import SERVER_ERROR, APIError, body_too_large, request_timeout
from gateway.metrics import GatewayMetrics
from gateway.tenancy.auth import get_principal

REQUEST_ID_KEY = "prefixgate.request_id"
LOG_FIELDS_KEY = "prefixgate.log"  # dict that handlers fill with fields for the access log

access_logger = logging.getLogger("prefixgate.access")
error_logger = logging.getLogger("prefixgate.error")

_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def log_fields(scope: Scope) -> dict[str, Any]:
    """The access-log fields of this request (handlers add model, tokens, finish reason...)."""
    fields: dict[str, Any] = scope.setdefault(LOG_FIELDS_KEY, {})
    return fields


def request_id(scope: Scope) -> str:
    return str(scope.get(REQUEST_ID_KEY, ""))


async def send_error(send: Send, error: APIError) -> None:
    body = error.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AccessLogMiddleware:
    """Assigns the request id (client's `x-request-id` if sane), logs one line per request.

    The line is JSON: method, path, route, status, duration, bytes sent, tenant, plus whatever the
    handler put in `log_fields(scope)`. Also counts `prefixgate_http_requests_total`.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, enabled: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_request_id(scope) or uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = rid
        start = time.perf_counter()
        status = 0
        sent = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._record(scope, status, sent, time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, sent: int, elapsed: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        tenant = get_principal(scope).tenant
        self.metrics.requests.labels(route, scope["method"], str(status), tenant).inc()
        if not self.enabled:
            return
        client = scope.get("client")
        line = {
            "event": "access",
            "request_id": scope[REQUEST_ID_KEY],
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "bytes_sent": sent,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "tenant": tenant,
            **scope.get(LOG_FIELDS_KEY, {}),
        }
        access_logger.info(json.dumps(line, separators=(",", ":")))


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _CLIENT_REQUEST_ID.fullmatch(text) else None
    return None


class ErrorMiddleware:
    """Turns any exception into OpenAI's error shape, if the response has not started.

    `APIError` keeps its status; anything else is a bug: logged with its traceback, answered
    with a 500 `server_error`. Bad input never gets here as a plain exception (handlers and the
    body limit raise `APIError`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except APIError as exc:
            if started:
                raise
            await send_error(send, exc)
        except Exception:
            error_logger.exception("unhandled error", extra={"request_id": request_id(scope)})
            if started:
                raise
            error = APIError(
                500, "Internal server error.", type=SERVER_ERROR, code="internal_error"
            )
            await send_error(send, error)


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, and bodies that have not fully arrived
    `timeout_s` after the request started with 408 (a slow-loris client holds no worker).

    A `content-length` over the limit is refused before reading; a chunked body is counted as it
    is read and `APIError(413)` is raised from `receive` once it passes the limit. The deadline
    applies only while the body is incomplete: a handler waiting for `http.disconnect` later
    (a streamed response) waits as long as the response takes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await send_error(send, body_too_large(self.max_bytes))
            return
        deadline = anyio.current_time() + self.timeout_s
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()):
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_bytes:
                        raise body_too_large(self.max_bytes)
                    complete = not message.get("more_body", False)
                return message
            raise request_timeout(self.timeout_s)

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
