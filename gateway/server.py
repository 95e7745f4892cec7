"""The uvicorn server of `prefixgate serve`, with a bound on request headers.

uvicorn's httptools protocol buffers a request line and headers of any size (its h11 protocol
stops at 16 KiB); `HeaderLimitedProtocol` counts the bytes that arrive before a request's headers
are complete and answers 431 (OpenAI's error body, connection closed) past `max_header_bytes`,
so a client streaming an endless header holds at most one read buffer more than the limit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from gateway.errors import APIError

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 bounds headers itself
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def headers_too_large(limit: int) -> APIError:
    return APIError(
        431,
        f"Request line and headers too large: the limit is {limit} bytes.",
        code="request_header_fields_too_large",
    )


def _refusal(limit: int) -> bytes:
    """The raw 431 response (the request never reaches the app)."""
    body = headers_too_large(limit).body_bytes()
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


if HttpToolsProtocol is not None:

    class HeaderLimitedProtocol(HttpToolsProtocol):
        """httptools protocol that refuses a request line + headers over `max_header_bytes`."""

        max_header_bytes = 32 * 1024  # set on the subclass `protocol_class` makes

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._header_bytes = 0  # bytes received since the current request began
            self._in_headers = True
            self._refused = False
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > self.max_header_bytes:
                self._refused = True
                self.transport.write(_refusal(self.max_header_bytes))
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_headers = True
            self._header_bytes = 0


def uvicorn_config(app: Any, max_header_bytes: int, **options: Any) -> uvicorn.Config:
    """A uvicorn config for `app` whose requests carry at most `max_header_bytes` of request
    line and headers (431 past it); `options` are uvicorn's."""
    if HttpToolsProtocol is None:  # pragma: no cover
        return uvicorn.Config(
            app, http="h11", h11_max_incomplete_event_size=max_header_bytes, **options
        )
    protocol = type(
        "HeaderLimitedProtocol", (HeaderLimitedProtocol,), {"max_header_bytes": max_header_bytes}
    )
    return uvicorn.Config(app, http=protocol, **options)
