"""One engine replica as an HTTP service: the routes of `engine.service.protocol` over an engine.

The engine is anything with the gateway's `EngineClient` shape (the in-process `AsyncEngine` in
`prefixgate engine`; the tests' fake engine too), already started; the app never owns it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from engine.errors import InvalidRequestError
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
    ) -> None:
        self.engine = engine
        self.draining = draining
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
            Route(protocol.ADD, self.add, methods=["POST"]),
            Route(protocol.ABORT, self.abort, methods=["POST"]),
            Route(protocol.WARM, self.warm, methods=["POST"]),
            Route(protocol.UNPIN, self.unpin, methods=["POST"]),
            Route(protocol.EXTEND, self.extend, methods=["POST"]),
            Route(protocol.STATS, self.stats, methods=["GET"]),
            Route(protocol.INFO, self.get_info, methods=["GET"]),
            Route(protocol.TOKENIZER, self.tokenizer, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.health, methods=["GET"]),
        ]

    async def add(self, request: Request) -> Response:
        try:
            body = await _json(request)
            params = protocol.PARAMS.validate_python(body["params"])
            prompt = [int(t) for t in body["prompt_token_ids"]]
            kwargs = self.add_kwargs.decode(body.get("kwargs") or {})
            if params.grammar is not None:  # in a worker thread, not on this event loop
                await self.engine.compile_grammar(params.grammar)
            stream = self.engine.add_request(
                prompt, params, request_id=body.get("request_id"), **kwargs
            )
        except Exception as exc:
            return error_response(exc)
        return DeltaStreamResponse(stream)

    async def abort(self, request: Request) -> Response:
        self.engine.abort(request.path_params["request_id"])
        return Response(status_code=204)

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
) -> Starlette:
    """The replica's Starlette app. `background(service)` runs for the app's lifetime (the
    Redis heartbeat and KV events: `engine.service.discovery`). `model_name` is the name
    gateways serve it under (default: the engine's); `draining()` says whether it is shutting
    down (its stats tell gateways so)."""
    service = EngineService(engine, replica_id, model_name, draining)

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


class DeltaStreamResponse(Response):
    """One JSON line per `RequestDelta` (an error line if the engine fails mid-stream); the
    client going away aborts the request at once, not at its next token."""

    def __init__(self, stream: Any) -> None:
        super().__init__(status_code=200, media_type=NDJSON.decode())
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", NDJSON)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                with contextlib.suppress(OSError):  # the client left: aborted below
                    await self._pump(send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _pump(self, send: Send) -> None:
        try:
            async for delta in self.stream:
                line = protocol.encode(delta) + b"\n"
                await send({"type": "http.response.body", "body": line, "more_body": True})
        except Exception as exc:
            line = protocol.encode(protocol.error_body(exc)) + b"\n"
            await send({"type": "http.response.body", "body": line, "more_body": False})
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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


def error_response(exc: Exception) -> Response:
    """`exc` in the protocol's error shape, with its status (also what a draining replica
    answers: `gateway.drain`)."""
    if isinstance(exc, KeyError | TypeError | ValueError) and not protocol.is_engine_error(exc):
        exc = InvalidRequestError(f"malformed engine request: {exc!r}")
    body = protocol.error_body(exc)
    return Response(
        protocol.encode(body),
        status_code=protocol.error_status(body),
        media_type="application/json",
    )
