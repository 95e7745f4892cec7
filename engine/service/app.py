"""One engine replica as an HTTP service: the routes of `engine.service.protocol` over an engine.

A gateway's requests and aborts arrive as lines of its channel's request body and their deltas
leave as lines of the channel's response (`Channel`): adding a request runs no HTTP request of
its own on either side.

The engine is anything with the gateway's `EngineClient` shape (the in-process `AsyncEngine` in
`prefixgate engine`; the tests' fake engine too), already started; the app never owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from engine.errors import EngineOverloadedError, InvalidRequestError
from engine.service import protocol
from engine.service.protocol import KwargsCodec, ReplicaInfo

NDJSON = b"application/x-ndjson"


class EngineService:
    """The handlers of one replica's internal API, over `engine`."""

    def __init__(
        self,
        engine: Any,
        replica_id: str,
        model_name: str | None = None,
        draining: Callable[[], bool] = lambda: False,
        track: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.engine = engine
        self.draining = draining
        self.track = track
        self.info = ReplicaInfo(
            replica_id=replica_id,
            model_name=model_name or engine.model_name,
            max_model_len=engine.max_model_len,
            vocab_size=len(engine.tokenizer),
            block_size=engine.block_size,
        )
        kind = type(engine)
        self.add_kwargs = KwargsCodec(kind.add_request, skip=("request_id",))
        self.warm_kwargs = KwargsCodec(kind.warm_prefix, skip=())
        self._tokenizer_files: dict[str, str] | None = None

    def routes(self) -> list[Route]:
        return [
            Route(protocol.CHANNEL, self.channel, methods=["POST"]),
            Route(protocol.WARM, self.warm, methods=["POST"]),
            Route(protocol.UNPIN, self.unpin, methods=["POST"]),
            Route(protocol.EXTEND, self.extend, methods=["POST"]),
            Route(protocol.STATS, self.stats, methods=["GET"]),
            Route(protocol.INFO, self.get_info, methods=["GET"]),
            Route(protocol.TOKENIZER, self.tokenizer, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.health, methods=["GET"]),
        ]

    async def channel(self, request: Request) -> Response:
        return ChannelResponse(Channel(self.track), self.command)

    def command(self, channel: Channel, line: bytes) -> None:
        """One line of a channel's request body: `{"op": "add", ...}` or `{"op": "abort",
        "request_id"}` (`engine.service.protocol`). An add that fails ends its request with an
        error line on the channel; a line that names no request is answered with an error
        line without one. A channel aborts only requests added on it (an abort of another
        gateway's request, or of a finished one, does nothing)."""
        request_id = None
        try:
            body = json.loads(line)
            if not isinstance(body, dict):
                raise InvalidRequestError("a channel line must be a JSON object")
            request_id = body.get("request_id")
            if not isinstance(request_id, str):
                raise InvalidRequestError("a channel line needs its request_id")
            if body.get("op") == "abort":  # only this channel's own requests
                channel.cancel_pending(request_id)
                if request_id in channel.streams:
                    self.engine.abort(request_id)
            elif body.get("op") == "add":
                self.add(channel, request_id, body)
            else:
                raise InvalidRequestError(f"unknown channel op {body.get('op')!r}")
        except Exception as exc:
            channel.error(request_id, _as_engine_error(exc))

    def add(self, channel: Channel, request_id: str, body: Mapping[str, Any]) -> None:
        """Add one request whose deltas go to `channel` (raises what refuses it)."""
        if self.draining():
            raise EngineOverloadedError(f"replica {self.info.replica_id} is shutting down")
        params = protocol.PARAMS.validate_python(body["params"])
        prompt = [int(t) for t in body["prompt_token_ids"]]
        kwargs = self.add_kwargs.decode(body.get("kwargs") or {})

        def start() -> None:
            stream = self.engine.add_request(prompt, params, request_id=request_id, **kwargs)
            channel.attach(stream)

        if params.grammar is None:
            start()
            return
        # compiled in a worker thread, not on this event loop; the lines after this one are
        # read meanwhile (an abort of this request cancels it)
        channel.defer(request_id, lambda: self.engine.compile_grammar(params.grammar), start)

    async def warm(self, request: Request) -> Response:
        try:
            body = await _json(request)
            tokens = [int(t) for t in body["token_ids"]]
            kwargs = self.warm_kwargs.decode(body.get("kwargs") or {})
            state = await self.engine.warm_prefix(tokens, **kwargs)
        except Exception as exc:
            return error_response(exc)
        return _ok(state)

    async def unpin(self, request: Request) -> Response:
        try:
            body = await _json(request)
            done = await self.engine.unpin_prefix(str(body["key"]))
        except Exception as exc:
            return error_response(exc)
        return _ok({"ok": done})

    async def extend(self, request: Request) -> Response:
        try:
            body = await _json(request)
            expires_at = body.get("expires_at")
            done = await self.engine.extend_pin(
                str(body["key"]), None if expires_at is None else float(expires_at)
            )
        except Exception as exc:
            return error_response(exc)
        return _ok({"ok": done})

    def wire_stats(self) -> dict[str, Any]:
        """The engine's stats as they cross the wire (`protocol.ReplicaStats`), with whether
        this replica is draining."""
        stats: dict[str, Any] = protocol.jsonable(self.engine.stats())
        return stats | {"draining": self.draining()}

    async def stats(self, request: Request) -> Response:
        return _ok(self.wire_stats())

    async def get_info(self, request: Request) -> Response:
        return _ok(self.info)

    async def tokenizer(self, request: Request) -> Response:
        if self._tokenizer_files is None:
            self._tokenizer_files = await anyio.to_thread.run_sync(
                tokenizer_files, self.engine.tokenizer
            )
        return _ok({"files": self._tokenizer_files})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ready", "replica_id": self.info.replica_id})


def create_engine_app(
    engine: Any,
    *,
    replica_id: str,
    model_name: str | None = None,
    background: Callable[[EngineService], contextlib.AbstractAsyncContextManager[None]]
    | None = None,
    draining: Callable[[], bool] = lambda: False,
    track: Callable[[int], None] = lambda n: None,
) -> Starlette:
    """The replica's Starlette app. `background(service)` runs for the app's lifetime (the
    Redis heartbeat and KV events: `engine.service.discovery`). `model_name` is the name
    gateways serve it under (default: the engine's); `draining()` says whether it is shutting
    down (its stats tell gateways so); `track(+1 / -1)` counts the generations running (a
    drain waits for them: their HTTP requests returned when they started)."""
    service = EngineService(engine, replica_id, model_name, draining, track)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if background is None:
            yield
            return
        async with background(service):
            yield

    app = Starlette(routes=service.routes(), lifespan=lifespan)
    app.state.service = service
    return app


class Channel:
    """The deltas of the requests a gateway added on this channel, every request's line of an
    engine step written together (one write per step, not one per request and token).

    Args:
        track: called with +1 when a request is attached, -1 when it ends or is aborted.
    """

    def __init__(self, track: Callable[[int], None]) -> None:
        self.id = uuid.uuid4().hex
        self.track = track
        self.streams: dict[str, Any] = {}
        self.pending: dict[str, asyncio.Task[None]] = {}  # adds waiting for their grammar
        self._lines: list[bytes] = []
        self._ready = asyncio.Event()
        self._ending = False

    def error(self, request_id: str | None, exc: BaseException) -> None:
        """End request `request_id` with `exc` (an error line; `request_id` None: a line that
        named no request)."""
        self._write(protocol.encode(protocol.error_body(exc) | {"request_id": request_id}))

    def end(self, exc: BaseException) -> None:
        """End the channel: an error line without a request id after the lines already queued,
        then `pump` returns."""
        self.error(None, exc)
        self._ending = True

    def defer(
        self, request_id: str, ready: Callable[[], Awaitable[None]], start: Callable[[], None]
    ) -> None:
        """Run `start` once `ready()` is done (its error, or `start`'s, ends the request). A
        drain waits for it too; its count is released when its task ends in any way, even
        cancelled before it first ran (an abort in the same read as the add)."""

        async def wait() -> None:
            try:
                await ready()
                start()
            except Exception as exc:
                self.error(request_id, _as_engine_error(exc))

        def done(task: asyncio.Task[None]) -> None:
            if self.pending.get(request_id) is task:
                del self.pending[request_id]
            self.track(-1)

        self.track(1)
        task = asyncio.get_running_loop().create_task(wait())
        task.add_done_callback(done)
        self.pending[request_id] = task

    def cancel_pending(self, request_id: str) -> None:
        task = self.pending.pop(request_id, None)
        if task is not None:
            task.cancel()

    def attach(self, stream: Any) -> None:
        """Send `stream`'s deltas (or its error) on this channel from now on."""
        request_id = stream.request_id
        self.streams[request_id] = stream
        self.track(1)

        def sink(item: Any) -> None:
            if (isinstance(item, BaseException) or item.finished) and self.streams.pop(
                request_id, None
            ):
                self.track(-1)
            if isinstance(item, BaseException):
                self.error(request_id, item)
            else:
                self._write(protocol.encode(item))

        stream.push_to(sink)

    def _write(self, line: bytes) -> None:
        self._lines.append(line)
        self._ready.set()

    async def pump(self, send: Send) -> None:
        """Write what has arrived, whenever something has (until cancelled, or `end`)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            lines, self._lines = self._lines, []
            lines.append(b"")
            await send({"type": "http.response.body", "body": b"\n".join(lines), "more_body": True})
            if self._ending:
                return

    async def close(self) -> None:
        """Abort every request still running or waiting for its grammar (the gateway went
        away)."""
        for task in self.pending.values():
            task.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            await stream.aclose()
            self.track(-1)


class ChannelResponse(Response):
    """A channel: its request body's lines are the gateway's commands (`command(channel,
    line)`), read as they arrive; its response's lines are first `{"channel": id}`, then the
    deltas. The gateway closing the connection aborts every request still running on it, at
    once."""

    def __init__(self, channel: Channel, command: Callable[[Channel, bytes], None]) -> None:
        super().__init__(status_code=200, media_type=NDJSON.decode())
        self.channel = channel
        self.command = command

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", NDJSON)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            async with anyio.create_task_group() as tg:

                async def read() -> None:
                    partial: list[bytes] = []  # a line's pieces until its newline arrives
                    size = 0
                    while (message := await receive())["type"] != "http.disconnect":
                        body, more = message.get("body", b""), message.get("more_body", False)
                        if more and b"\n" not in body:
                            partial.append(body)
                            size += len(body)
                        else:
                            *lines, rest = b"".join([*partial, body]).split(b"\n")
                            if not more:
                                lines.append(rest)  # the body ended: its last line too
                                rest = b""
                            for line in lines:
                                if line.strip():
                                    self.command(self.channel, line)
                            partial, size = [rest], len(rest)
                        if size > protocol.MAX_LINE_BYTES:
                            limit = protocol.MAX_LINE_BYTES
                            self.channel.end(
                                InvalidRequestError(f"a channel line is longer than {limit} bytes")
                            )
                            return  # read no more: the answer ends, its requests are aborted
                    tg.cancel_scope.cancel()

                tg.start_soon(read)
                with contextlib.suppress(OSError):  # the gateway left: aborted below
                    first = protocol.encode({"channel": self.channel.id}) + b"\n"
                    await send({"type": "http.response.body", "body": first, "more_body": True})
                    await self.channel.pump(send)
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await self.channel.close()


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer as its saved text files (tokenizer.json, its config, the chat template)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


async def _json(request: Request) -> Mapping[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise InvalidRequestError(f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return body


def _ok(value: Any) -> Response:
    return Response(protocol.encode(value), media_type="application/json")


def _as_engine_error(exc: Exception) -> Exception:
    """A malformed request's KeyError, TypeError or ValueError as the InvalidRequestError it is."""
    if isinstance(exc, KeyError | TypeError | ValueError) and not protocol.is_engine_error(exc):
        return InvalidRequestError(f"malformed engine request: {exc!r}")
    return exc


def error_response(exc: Exception) -> Response:
    """`exc` in the protocol's error shape, with its status (also what a draining replica
    answers: `gateway.drain`)."""
    body = protocol.error_body(_as_engine_error(exc))
    return Response(
        protocol.encode(body),
        status_code=protocol.error_status(body),
        media_type="application/json",
    )
