"""The replicas' streaming HTTP client against a scripted server on loopback: chunked and
fixed-length bodies, lines across chunk boundaries, kept-alive connections (and the one a server
closed), a body cut short, and a response left early closing its connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.replicas.wire import StreamClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class Server:
    """Reads each request on a connection and lets `handler(reader, writer, n)` answer it (n:
    requests seen so far); the handler returns whether to keep the connection open."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = asyncio.Event()  # a connection ended from the client's side

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed.set()
                    return
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(await reader.readexactly(length))
                if not await self.handler(reader, writer, len(self.requests)):
                    return
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[Server, str]]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> tuple[Server, str]:
        server = Server(handler)
        srv = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        servers.append(srv)
        port = srv.sockets[0].getsockname()[1]
        return server, f"http://127.0.0.1:{port}"

    yield start
    for srv in servers:
        srv.close()


def chunked(*pieces: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return head + body + b"0\r\n\r\n"


async def test_lines_across_chunks_and_several_in_one(serve) -> None:
    async def handler(reader, writer, n) -> bool:
        writer.write(chunked(b'{"a": 1}\n{"b"', b": 2}\n", b'{"c": 3}\n', b'{"d": 4}'))
        return True

    server, url = await serve(handler)
    client = StreamClient(url)
    async with client.post("/x", b'{"q": 1}') as response:
        assert response.status == 200
        lines = [line async for line in response.lines()]
    assert lines == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}', b'{"d": 4}']
    assert server.requests == [b'{"q": 1}']
    client.close()


async def test_a_fixed_length_error_answer(serve) -> None:
    body = b'{"error": {"type": "InvalidRequestError", "message": "no"}}'

    async def handler(reader, writer, n) -> bool:
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        return True

    _, url = await serve(handler)
    client = StreamClient(url)
    async with client.post("/x", b"{}") as response:
        assert response.status == 400
        assert await response.read() == body
    client.close()


async def test_a_finished_response_keeps_its_connection_for_the_next(serve) -> None:
    async def handler(reader, writer, n) -> bool:
        writer.write(chunked(b"%d\n" % n))
        return True

    server, url = await serve(handler)
    client = StreamClient(url)
    for n in (1, 2, 3):
        async with client.post("/x", b"{}") as response:
            assert [line async for line in response.lines()] == [b"%d" % n]
    assert server.connections == 1
    client.close()


async def test_a_kept_alive_connection_the_server_closed_is_replaced_once(serve) -> None:
    async def handler(reader, writer, n) -> bool:
        writer.write(chunked(b"%d\n" % n))
        await writer.drain()
        return False  # closes the connection without saying so

    server, url = await serve(handler)
    client = StreamClient(url)
    for n in (1, 2):
        async with client.post("/x", b"{}") as response:
            assert [line async for line in response.lines()] == [b"%d" % n]
        await asyncio.sleep(0.05)  # the server's close arrives
    assert server.requests == [b"{}", b"{}"]  # each sent once
    assert server.connections == 2
    client.close()


async def test_a_body_cut_short_raises_and_its_connection_is_dropped(serve) -> None:
    async def handler(reader, writer, n) -> bool:
        if n == 1:
            writer.write(chunked(b"one\n", b"two\n")[:-10])  # dies mid-stream
            await writer.drain()
            return False
        writer.write(chunked(b"fine\n"))
        return True

    server, url = await serve(handler)
    client = StreamClient(url)
    seen: list[bytes] = []
    with pytest.raises(asyncio.IncompleteReadError):
        async with client.post("/x", b"{}") as response:
            async for line in response.lines():
                seen.append(line)
    assert seen == [b"one"]
    async with client.post("/x", b"{}") as response:
        assert [line async for line in response.lines()] == [b"fine"]
    assert server.connections == 2  # the broken one was not reused
    client.close()


async def test_leaving_a_response_early_closes_its_connection(serve) -> None:
    async def handler(reader, writer, n) -> bool:
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(head + b"6\r\nfirst\n\r\n")  # and never ends
        await writer.drain()
        return True

    server, url = await serve(handler)
    client = StreamClient(url)
    async with client.post("/x", b"{}") as response:
        async for line in response.lines():
            assert line == b"first"
            break
    await asyncio.wait_for(server.closed.wait(), 5)  # the server sees the client leave
    assert not client._idle
    client.close()


async def test_a_refused_connection_is_a_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it once closed
    client = StreamClient(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError):
        async with client.post("/x", b"{}"):
            pass
