"""The uvicorn server of `prefixgate serve`, with bounds on request headers.

uvicorn's httptools protocol buffers a request line and headers of any size, for as long as the
client cares to send them. `HeaderLimitedProtocol` answers, in OpenAI's error shape, and closes
the connection:

- 431 once the bytes received before the headers end pass `max_header_bytes` (an endless header
  costs at most one read buffer more than the limit);
- 408 when the headers are not complete `header_timeout_s` after the connection opened (first
  request) or after the request's first byte (later requests on a kept-alive connection), so a
  slow-loris client holds a connection no longer than that. The body has its own deadline
  (`BodyLimitMiddleware`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from gateway.errors import APIError, request_timeout
from gateway.limits import RequestLimits

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 bounds headers itself
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}
_DEFAULTS = RequestLimits()


def headers_too_large(limit: int) -> APIError:
    return APIError(
        431,
        f"Request line and headers too large: the limit is {limit} bytes.",
        code="request_header_fields_too_large",
    )


def _raw_response(error: APIError) -> bytes:
    """An error response written straight to the socket (the request never reached the app)."""
    body = error.body_bytes()
    head = (
        f"HTTP/1.1 {error.status} {_REASONS[error.status]}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


if HttpToolsProtocol is not None:

    class HeaderLimitedProtocol(HttpToolsProtocol):
        """httptools protocol bounding the size and arrival time of request headers."""

        # Set on the subclass `uvicorn_config` makes.
        max_header_bytes = _DEFAULTS.max_header_bytes
        header_timeout_s = _DEFAULTS.body_timeout_s

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._header_bytes = 0  # bytes received since the current request began
            self._in_headers = True
            self._refused = False
            self._header_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > self.max_header_bytes:
                self._refuse(headers_too_large(self.max_header_bytes))

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_headers = True
            self._header_bytes = 0

        def _arm(self) -> None:
            timeout = self.header_timeout_s
            self._header_timer = self.loop.call_later(timeout, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if not (self._in_headers and not self._refused):
                return
            if self.cycle is None or self.cycle.response_complete:
                self._refuse(request_timeout(self.header_timeout_s, "request line and headers"))
            else:  # a pipelined request stalled while an earlier response is still going out
                self._refused = True
                self.transport.close()

        def _refuse(self, error: APIError) -> None:
            self._refused = True
            self._disarm()
            self.transport.write(_raw_response(error))
            self.transport.close()


def uvicorn_config(app: Any, limits: RequestLimits, **options: Any) -> uvicorn.Config:
    """A uvicorn config for `app` whose requests' headers are bounded by `limits`
    (`max_header_bytes`, and `body_timeout_s` for their arrival); `options` are uvicorn's."""
    if HttpToolsProtocol is None:  # pragma: no cover
        return uvicorn.Config(
            app, http="h11", h11_max_incomplete_event_size=limits.max_header_bytes, **options
        )
    bounds = {
        "max_header_bytes": limits.max_header_bytes,
        "header_timeout_s": limits.body_timeout_s,
    }
    protocol = type("HeaderLimitedProtocol", (HeaderLimitedProtocol,), bounds)
    return uvicorn.Config(app, http=protocol, **options)
