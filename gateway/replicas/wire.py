"""A lean HTTP/1.1 client for streamed POSTs: a replica's channel, and the bench's load.

A generation's deltas arrive as one chunk per engine step; httpx (h11 in pure Python, anyio,
httpcore's pool) spent ~0.17 ms of the gateway's CPU per chunk, taken on a 2-core machine from the
model's threads. This reads the chunked body straight off an asyncio stream: a status line, the
headers, then `size CRLF data CRLF` until the empty chunk. It speaks only what the replica's
uvicorn answers (a fixed-length body or a chunked one) and keeps connections alive between
requests; closing a response's connection before its end aborts the request on the server. A
channel (`duplex`) keeps its own request's chunked body open and writes each command into it as
one chunk while the answer streams back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable

# A kept-alive connection idle for longer than this is not reused: uvicorn closes them after 5 s,
# and a request written into one the server is closing would be lost (and is never re-sent).
IDLE_S = 4.0
MAX_HEAD_BYTES = 64 * 1024


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 as this client reads it: a broken connection."""


class StreamResponse:
    """One answer: `status`, then its body, whole (`read`) or as it arrives (`chunks`)."""

    def __init__(self, reader: asyncio.StreamReader, head: bytes) -> None:
        self._reader = reader
        try:
            status_line, *lines = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split(" ", 2)[1])
            headers = dict(line.lower().split(":", 1) for line in lines if line)
        except (ValueError, IndexError) as exc:
            raise ProtocolError(f"malformed response head {head[:200]!r}") from exc
        self.headers = {k.strip(): v.strip() for k, v in headers.items()}
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self.keep_alive = self.headers.get("connection") != "close"
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as the server wrote them (one for a fixed-length body)."""
        reader = self._reader
        if not self.chunked:
            length = int(self.headers.get("content-length", "0"))
            body = await reader.readexactly(length)
            self.complete = True
            if body:
                yield body
            return
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError as exc:
                raise ProtocolError(f"malformed chunk size {size_line[:40]!r}") from exc
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from uvicorn: the closing CRLF
                self.complete = True
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's lines (NDJSON), without their newlines."""
        rest = b""
        async for data in self.chunks():
            if rest:
                data = rest + data
            *whole, rest = data.split(b"\n")
            for line in whole:
                yield line
        if rest:
            yield rest

    async def read(self) -> bytes:
        return b"".join([data async for data in self.chunks()])


class StreamClient:
    """POSTs to one server over kept-alive connections.

    Args:
        url: `http://host:port` (or https).
        connect_timeout_s: deadline of a new connection (a TimeoutError past it).
    """

    def __init__(self, url: str, connect_timeout_s: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []

    @contextlib.asynccontextmanager
    async def post(
        self, path: str, payload: bytes, content_type: str = "application/json"
    ) -> AsyncIterator[StreamResponse]:
        """POST `payload` and yield the response once its head has arrived. Leaving the block
        before the body's end closes the connection (the server aborts the request).

        Raises:
            TimeoutError: no connection within the deadline (nothing was sent).
            ConnectionError, asyncio.IncompleteReadError: the connection was refused or broke.
        """
        request = self._head(path, content_type, f"Content-Length: {len(payload)}") + payload
        reader, writer, head = await self._send(request)
        response = None
        try:
            response = StreamResponse(reader, head)
            yield response
        finally:
            if response is not None and response.complete and response.keep_alive:
                self._idle.append((time.monotonic(), reader, writer))
            else:
                writer.close()

    @contextlib.asynccontextmanager
    async def duplex(
        self, path: str, content_type: str = "application/x-ndjson"
    ) -> AsyncIterator[tuple[StreamResponse, Callable[[bytes], None]]]:
        """POST with a chunked body that stays open: yield the response once its head has
        arrived, and `write(data)`, which sends `data` as the body's next chunk at once (the
        server reads it while it answers). Leaving the block closes the connection.

        Raises:
            TimeoutError: no connection within the deadline.
            ConnectionError, asyncio.IncompleteReadError: the connection was refused or broke
                (`write` raises ConnectionResetError once it is closing).
        """
        request = self._head(path, content_type, "Transfer-Encoding: chunked")
        reader, writer, head = await self._send(request)

        def write(data: bytes) -> None:
            if writer.is_closing():
                raise ConnectionResetError("the connection is closed")
            writer.write(b"%x\r\n%b\r\n" % (len(data), data))

        try:
            yield StreamResponse(reader, head), write
        finally:
            writer.close()
            with contextlib.suppress(Exception):  # gone: the server sees it close either way
                await asyncio.wait_for(writer.wait_closed(), self.connect_timeout_s)

    def _head(self, path: str, content_type: str, framing: str) -> bytes:
        """A POST's head; `framing` is its body's Content-Length or chunked Transfer-Encoding."""
        return (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {content_type}\r\n{framing}\r\n\r\n"
        ).encode("latin-1")

    async def _send(
        self, request: bytes
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """Write `request` on a kept-alive connection or a new one; return the answer's head. A
        kept-alive connection the server closed before reading anything is replaced once by a
        new one (the server never saw the request); any other failure is raised."""
        while True:
            reused = self._take_idle()
            reader, writer = reused or await self._connect()
            try:
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError as exc:
                writer.close()
                raise ProtocolError("response head too long") from exc
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                writer.close()
                if reused is None or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise
                continue
            except BaseException:
                writer.close()
                raise
            return reader, writer, head

    def _take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        now = time.monotonic()
        while self._idle:
            since, reader, writer = self._idle.pop()
            if now - since < IDLE_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = ssl.create_default_context() if self.tls else None
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=context, limit=MAX_HEAD_BYTES),
            self.connect_timeout_s,
        )

    def close(self) -> None:
        """Close the kept-alive connections (responses still open keep theirs)."""
        for _, _, writer in self._idle:
            writer.close()
        self._idle.clear()
