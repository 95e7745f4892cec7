"""`RemoteEngine`: the gateway's `EngineClient` over one engine replica (`prefixgate engine`).

Everything a generation needs crosses one channel per replica (`engine.service.protocol`), a
POST held open by a lean HTTP/1.1 client (`gateway.replicas.wire`): its request body carries
the adds and aborts, one line each, its response the deltas. Every call has a deadline
(`Timeouts`): connecting, control calls, warm-ups. The channel has no deadline between lines (a
long queue wait is normal); a dead replica ends it instead: its connection resets, or the
liveness probe (or the Redis heartbeat, in a pool) stops answering for `ttl_s`, and then every
stream still open on it ends with `ReplicaLostError`. A connection that is refused or breaks
takes the replica out of rotation at once, until it answers again (or, in a pool, writes a
heartbeat after that: a killed replica's last one stays in Redis until its TTL), so the
requests that follow go to other replicas rather than wait for the probe. A request is never
sent twice: once its line may have reached the replica, it may have produced tokens, so a
failure is reported, not retried. A stream closed early is aborted with an abort line, which
the channel delivers after its add.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from engine.async_engine import DeltaStream
from engine.errors import EngineDeadError
from engine.grammar import GrammarSpec
from engine.outputs import PrefixState
from engine.sampling_params import SamplingParams
from engine.service import protocol
from engine.service.protocol import ReplicaInfo, ReplicaStats
from engine.validation import validate_request
from gateway.replicas.wire import IDLE_S, StreamClient

logger = logging.getLogger("prefixgate.replicas")

Write = Callable[[bytes], None]  # sends one chunk of a channel's body


class ReplicaLostError(EngineDeadError):
    """The replica serving a request went away (connection lost, no heartbeat)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines of the calls to a replica, in seconds."""

    connect_s: float = 2.0  # TCP connect (a stream's too)
    call_s: float = 10.0  # stats, abort, info, unpin, extend
    warm_s: float = 300.0  # a warm-up waits for a prefill behind the queue
    ttl_s: float = 5.0  # no answer from the replica for so long: it is lost
    probe_s: float = 1.0  # liveness and load probe period

    def call(self, total: float | None = None) -> httpx.Timeout:
        return httpx.Timeout(total or self.call_s, connect=self.connect_s)


class RemoteStream(DeltaStream):
    """Async iterator over one remote request's deltas (the `RequestStream` protocol): added
    with a line on its replica's channel, where its deltas arrive too (`RemoteEngine`)."""

    def __init__(self, engine: RemoteEngine, request_id: str, fields: dict[str, Any]) -> None:
        super().__init__(request_id)
        self._engine = engine
        self._posted = False
        self._task = self._loop.create_task(self._add(fields))

    def fail(self, exc: BaseException) -> None:
        """End the stream with `exc` (its replica is lost)."""
        self._task.cancel()
        self._put_now(exc)

    def _abort(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._engine.streams.pop(self.request_id, None)
        if self._posted:
            self._engine.abort(self.request_id)  # on the channel, behind its add
        else:
            self._task.cancel()  # nothing sent yet

    async def _add(self, fields: dict[str, Any]) -> None:
        """Write the add on the channel (opened first if it is not) once the handler that made
        this stream yields: the rest of the handler runs before the replica's first step, not
        during it (docs/deployment.md)."""
        engine = self._engine
        try:
            write = await engine.channel()
            self._posted = True
            write(protocol.encode(fields | {"op": "add"}) + b"\n")
        except ReplicaLostError as exc:  # its channel could not open
            self._end(exc)
        except OSError as exc:  # the channel's connection is closing
            engine.out_of_rotation(f"a request's connection failed: {exc!r}")
            self._end(ReplicaLostError(f"replica {engine.replica_id} lost: {exc!r}"))

    def _end(self, exc: BaseException) -> None:
        self._engine.streams.pop(self.request_id, None)
        self._put_now(exc)


class RemoteEngine:
    """`EngineClient` over one replica; build it with `await RemoteEngine.connect(url)`."""

    def __init__(
        self,
        url: str,
        info: ReplicaInfo,
        tokenizer: Any,
        *,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.info = info
        self.replica_id = info.replica_id
        self.tokenizer = tokenizer
        self.model_name = info.model_name
        self.max_model_len = info.max_model_len
        self.block_size = info.block_size
        self.timeouts = timeouts or Timeouts()
        self.http = _client(self.url, self.timeouts)  # control calls
        self.wire = StreamClient(self.url, self.timeouts.connect_s)  # streams
        self.streams: dict[str, RemoteStream] = {}
        self.last_stats: ReplicaStats = ReplicaStats(0, 0, 0, 0, 0.0, 0, 0, 0)
        self.last_seen = time.monotonic()
        self.lost: BaseException | None = None
        # when it was taken out of rotation, on `clock` (epoch seconds; a pool's discovery sets
        # its own, the one heartbeats are written with)
        self.clock: Callable[[], float] = time.time
        self._lost_at = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._channel: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[Write] | None = None  # the open channel's `write`
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    async def connect(
        cls, url: str, timeouts: Timeouts | None = None, tokenizer: Any = None
    ) -> RemoteEngine:
        """Read the replica's info (and its tokenizer, unless given one of the same model).

        Raises:
            httpx.HTTPError: the replica did not answer in time.
        """
        timeouts = timeouts or Timeouts()
        async with _client(url, timeouts) as http:
            info = protocol.INFO_ADAPTER.validate_json((await _get(http, protocol.INFO)).content)
            if tokenizer is None:
                files = (await _get(http, protocol.TOKENIZER)).json()["files"]
                tokenizer = await asyncio.to_thread(load_tokenizer, files)
        return cls(url, info, tokenizer, timeouts=timeouts)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the liveness probe (event loop thread)."""
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    def shutdown(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self.fail_streams(EngineDeadError("the gateway is shutting down"))
        self._close_channel()
        self.wire.close()
        self._spawn(self.http.aclose())

    async def aclose(self) -> None:
        """`shutdown`, and wait for the channel's connection to close."""
        channel = self._channel
        self.shutdown()
        await self.http.aclose()
        if channel is not None:
            await asyncio.wait([channel])

    def fail_streams(self, exc: BaseException) -> None:
        """End every stream open on this replica with `exc`."""
        for stream in list(self.streams.values()):
            stream.fail(exc)
        self.streams.clear()

    def mark_lost(self, reason: str) -> None:
        """The replica is gone: its streams end with an error, new requests are refused."""
        if self.lost is None:
            logger.warning(json.dumps({"event": "replica_lost", "replica": self.replica_id,
                                       "reason": reason}))  # fmt: skip
            self._lost_at = self.clock()
        self.lost = ReplicaLostError(f"replica {self.replica_id} lost: {reason}")
        self.fail_streams(self.lost)
        self._close_channel()

    def out_of_rotation(self, reason: str) -> None:
        """A connection to the replica was refused or broke: no new requests until it answers
        again (`seen`). Its other streams run on: if it is dead they end by themselves (their
        connections break too), or when the probe gives up after `ttl_s`."""
        if self.lost is None:
            logger.warning(json.dumps({"event": "replica_unreachable", "replica": self.replica_id,
                                       "reason": reason}))  # fmt: skip
            self.lost = ReplicaLostError(f"replica {self.replica_id} unreachable: {reason}")
            self._lost_at = self.clock()

    def seen(self, stats: ReplicaStats, beat: float | None = None) -> None:
        """The replica's load, from the replica itself (`beat` None: it answered, so it is back
        in rotation) or from its heartbeat record (`beat`: when the replica wrote it, on
        `clock`). A record puts a replica that was taken out of rotation back only if written
        after that: a killed replica's last record stays readable until its TTL, and read
        again at each sync it would put the dead replica back, to take the next request."""
        self.last_stats = stats
        self.last_seen = time.monotonic()
        if beat is None or beat > self._lost_at:
            self.lost = None

    # ---- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> RemoteStream:
        """Validate here (400 before any byte is sent), then stream from the replica."""
        if self.lost is not None:
            raise self.lost
        validate_request(
            prompt_token_ids,
            params,
            vocab_size=self.info.vocab_size,
            max_model_len=self.max_model_len,
            block_size=self.info.block_size,
            share=kwargs.get("share"),
            shared_blocks=kwargs.get("shared_blocks", 0),
        )
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        fields = {
            "prompt_token_ids": prompt_token_ids,
            "params": params,
            "request_id": request_id,
            "kwargs": kwargs,
        }
        stream = RemoteStream(self, request_id, fields)
        self.streams[request_id] = stream
        return stream

    # ---- the channel ----------------------------------------------------------------------------
    async def channel(self) -> Write:
        """The `write` of this gateway's channel on the replica, opened if none is: each call
        sends one chunk of the channel's body (`wire.StreamClient.duplex`).

        Raises:
            ReplicaLostError: it could not be opened.
        """
        if self._channel is None or self._channel.done():
            self._opened = asyncio.get_running_loop().create_future()
            self._channel = asyncio.get_running_loop().create_task(self._run_channel(self._opened))
        assert self._opened is not None
        return await asyncio.shield(self._opened)

    async def _run_channel(self, opened: asyncio.Future[Write]) -> None:
        """Read the channel: its id, then every delta, each handed to its stream. Its end, for
        whatever reason, ends every stream still open on this replica."""
        reason = "it closed the channel"
        try:
            async with self.wire.duplex(protocol.CHANNEL) as (response, write):
                if response.status != 200:
                    raise protocol.decode_error(_loads(await response.read()))
                async for line in response.lines():
                    if opened.done():
                        self._on_line(line)
                    elif line:  # its id: open
                        opened.set_result(write)
        except TimeoutError as exc:
            reason = repr(exc)
        except (OSError, asyncio.IncompleteReadError) as exc:  # refused, reset, cut short
            reason = repr(exc)
            self.out_of_rotation(f"its channel's connection failed: {reason}")
        except asyncio.CancelledError:
            reason = "the gateway closed the channel"
            raise
        except Exception as exc:  # an error answer, an unreadable line
            reason = repr(exc)
        finally:
            lost = ReplicaLostError(f"replica {self.replica_id} lost: {reason}")
            if not opened.done():
                opened.set_exception(lost)
                opened.exception()  # retrieved: no warning when no request waited for it
            if self._opened is opened:
                self.fail_streams(lost)

    def _on_line(self, line: bytes) -> None:
        if not line:
            return
        if line.startswith(b'{"error"'):
            body = _loads(line)
            stream = self.streams.pop(str(body.get("request_id")), None)
            if stream is not None:
                stream._put_now(protocol.decode_error(body))
            return
        delta = protocol.DELTA.validate_json(line)
        stream = (self.streams.pop if delta.finished else self.streams.get)(delta.request_id, None)
        if stream is not None:
            stream._put_now(delta)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.cancel()
            self._channel = None

    async def compile_grammar(self, spec: GrammarSpec) -> None:
        """Check the grammar here (`check_grammar`); the replica compiles it, once."""
        await check_grammar(spec)

    def abort(self, request_id: str) -> None:
        """Abort on the open channel (no channel open: the replica aborted every request of the
        last one when it closed)."""
        opened = self._opened
        if opened is None or not opened.done() or opened.cancelled() or opened.exception():
            return
        with contextlib.suppress(OSError):  # closing: its end aborts the request
            opened.result()(protocol.encode({"op": "abort", "request_id": request_id}) + b"\n")

    async def warm_prefix(self, token_ids: list[int], **kwargs: Any) -> PrefixState:
        body = {"token_ids": token_ids, "kwargs": kwargs}
        raw = await self._post(protocol.WARM, protocol.encode(body), self.timeouts.warm_s)
        return protocol.PREFIX_STATE.validate_json(raw)

    async def unpin_prefix(self, key: str) -> bool:
        raw = await self._post(protocol.UNPIN, protocol.encode({"key": key}), self.timeouts.call_s)
        return bool(_loads(raw)["ok"])

    async def extend_pin(self, key: str, expires_at: float | None) -> bool:
        body = protocol.encode({"key": key, "expires_at": expires_at})
        raw = await self._post(protocol.EXTEND, body, self.timeouts.call_s)
        return bool(_loads(raw)["ok"])

    def stats(self) -> ReplicaStats:
        return self.last_stats

    async def fetch_stats(self) -> ReplicaStats:
        stats = protocol.STATS_ADAPTER.validate_json(
            (await _get(self.http, protocol.STATS)).content
        )
        self.seen(stats)
        return stats

    # ---- internals ----------------------------------------------------------------------------
    async def _post(self, path: str, body: bytes, timeout: float) -> bytes:
        """POST and return the body; an engine error answer is raised as that error.

        Raises:
            ReplicaLostError: no answer in time.
        """
        try:
            response = await self.http.post(
                path,
                content=body,
                headers={"content-type": "application/json"},
                timeout=self.timeouts.call(timeout),
            )
        except httpx.HTTPError as exc:
            raise ReplicaLostError(f"replica {self.replica_id}: {exc!r}") from exc
        if response.status_code >= 400:
            raise protocol.decode_error(_loads(response.content))
        return response.content

    async def _probe_loop(self) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                await self.fetch_stats()
            if time.monotonic() - self.last_seen > self.timeouts.ttl_s:
                self.mark_lost(f"no answer for {self.timeouts.ttl_s:g} s")
            await asyncio.sleep(self.timeouts.probe_s)

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(_quietly(coro))
        except RuntimeError:  # no running loop (interpreter exit)
            coro.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)


_TOKENIZER_LOCK = threading.Lock()


async def check_grammar(spec: GrammarSpec) -> None:
    """A gateway in front of replicas checks a grammar without compiling it (no tokenizer:
    `engine.structured.check`, in a worker thread), so a bad one is a 400 before any stream
    starts; the replica that runs the request compiles it into its own cache, once
    (`engine.service.app`), instead of the gateway compiling it a second time.

    Raises:
        InvalidRequestError: the spec is no grammar (the reason).
    """
    from engine.structured import check  # xgrammar and torch: only when used

    await asyncio.to_thread(check, spec)


def load_tokenizer(files: dict[str, str]) -> Any:
    """A transformers tokenizer from its saved files (what a replica's /engine/tokenizer sends).
    One at a time: transformers' lazy first import is not thread-safe (two replicas connecting
    at once got `cannot import name 'AutoTokenizer'`)."""
    with _TOKENIZER_LOCK, tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoTokenizer

        for name, text in files.items():
            (Path(tmp) / Path(name).name).write_text(text)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _client(url: str, timeouts: Timeouts) -> httpx.AsyncClient:
    # idle connections dropped before the replica's uvicorn closes them (5 s): httpx's default
    # expiry is the same 5 s, so a control call could be written into a closing connection and
    # fail as a lost replica
    limits = httpx.Limits(
        max_connections=None, max_keepalive_connections=64, keepalive_expiry=IDLE_S
    )
    return httpx.AsyncClient(base_url=url, timeout=timeouts.call(), limits=limits)


async def _get(http: httpx.AsyncClient, path: str) -> httpx.Response:
    response = await http.get(path)
    response.raise_for_status()
    return response


async def _quietly(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro


def _loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
