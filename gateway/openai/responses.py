"""ASGI responses that drive a `Generation` while watching for the client going away.

Both responses run the generation next to a watcher that waits on `receive()` for
`http.disconnect`; a disconnect cancels the work at once, and `Generation.close` then aborts
the engine request so its KV blocks go back to the pool without waiting for the next token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from engine.outputs import Delta, TokenLogprob
from gateway.errors import APIError
from gateway.hooks import Outcome
from gateway.openai.generation import ChoiceState, Generation, aborted_error, collect
from gateway.openai.schemas import Usage

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE_EVENT = b"data: [DONE]\n\n"


class OutputFormat(Protocol):
    """Chat or text completion: how deltas and results become JSON bytes."""

    def opening_chunks(self) -> list[bytes]: ...

    def take_prompt_logprobs(self, logprobs: list[TokenLogprob | None]) -> None:
        """The prompt's logprobs (requests with prompt logprobs), before the deltas that follow."""

    def delta_chunks(self, delta: Delta) -> list[bytes]: ...

    def usage_chunk(self, usage: Usage) -> bytes: ...

    def final_body(self, choices: list[ChoiceState], usage: Usage) -> bytes: ...


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


async def run_until_disconnect(receive: Receive, work: Callable[[], Awaitable[None]]) -> bool:
    """Run `work`, cancelling it if the client disconnects first.

    Returns True if the client left before `work` completed.
    """
    disconnected = completed = False
    error: Exception | None = None  # raised after the task group, unwrapped
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            await work()
            completed = True
        except OSError:  # ASGI spec >= 2.4 servers raise on send once the client is gone
            disconnected = True
        except Exception as exc:
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return disconnected and not completed


def _encode_headers(extra: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]


class StreamingGenerationResponse(Response):
    """Server-sent events: `data: {chunk}` per delta, optional usage chunk, `data: [DONE]`.

    An engine error after the headers went out becomes a `data: {"error": ...}` event.
    """

    def __init__(
        self,
        generation: Generation,
        fmt: OutputFormat,
        *,
        include_usage: bool,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.generation = generation
        self.fmt = fmt
        self.include_usage = include_usage
        self.extra_headers = dict(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: Outcome = "error"
        try:
            headers = SSE_HEADERS + _encode_headers(self.extra_headers)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if await run_until_disconnect(receive, lambda: self._stream(send)):
                outcome = "disconnected"
            else:
                gen = self.generation
                outcome = "finished" if gen.finished and not gen.aborted else "error"
        finally:
            await self.generation.close(outcome)

    async def _stream(self, send: Send) -> None:
        async def emit(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        fmt = self.fmt
        await emit(b"".join(sse(c) for c in fmt.opening_chunks()))
        try:
            async for out in self.generation:
                if out.prompt_logprobs is not None:
                    fmt.take_prompt_logprobs(out.prompt_logprobs)
                events = [sse(c) for d in out.deltas for c in fmt.delta_chunks(d)]
                if events:
                    await emit(b"".join(events))
            if self.generation.aborted:
                raise aborted_error()
        except APIError as exc:
            await emit(sse(exc.body_bytes()) + DONE_EVENT, more=False)
            return
        tail = sse(fmt.usage_chunk(self.generation.usage())) if self.include_usage else b""
        await emit(tail + DONE_EVENT, more=False)


class GenerationResponse(Response):
    """A complete JSON body once the generation finishes (the client may leave meanwhile)."""

    def __init__(
        self, generation: Generation, fmt: OutputFormat, *, n: int, headers: Mapping[str, str]
    ) -> None:
        super().__init__(status_code=200, media_type="application/json")
        self.generation = generation
        self.fmt = fmt
        self.n = n
        self.extra_headers = dict(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: Outcome = "error"
        choices: list[ChoiceState] = []

        async def work() -> None:
            nonlocal choices
            choices = await collect(self.generation, self.n)

        try:
            try:
                if await run_until_disconnect(receive, work):
                    outcome = "disconnected"
                    return
                if self.generation.aborted:
                    raise aborted_error()
            except APIError as exc:
                await self._send(send, exc.status, exc.body_bytes(), exc.headers)
                return
            outcome = "finished"
            if self.generation.prompt_logprobs is not None:
                self.fmt.take_prompt_logprobs(self.generation.prompt_logprobs)
            body = self.fmt.final_body(choices, self.generation.usage())
            await self._send(send, 200, body, {})
        finally:
            await self.generation.close(outcome)

    async def _send(self, send: Send, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        raw = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *_encode_headers({**self.extra_headers, **headers}),
        ]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
