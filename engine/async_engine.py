"""AsyncEngine: the step loop in a background thread, per-request delta streams for asyncio.

The event loop thread validates and enqueues; the engine thread owns every engine structure
(scheduler, block manager, runner) and pushes each step's deltas back with
`loop.call_soon_threadsafe`, so the server stays responsive while the model runs.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineOverloadedError
from engine.grammar import GrammarSpec
from engine.llm_engine import EngineStats, LLMEngine
from engine.outputs import PrefixState, RequestDelta
from engine.priority import lower_this_thread
from engine.request import Request, TenantShare
from engine.sampling_params import SamplingParams

log = logging.getLogger("prefixgate.engine")
T = TypeVar("T")


@dataclass(slots=True)
class _Add:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str
    tenant: str
    namespace: str | None
    priority: int
    shared_blocks: int
    share: TenantShare | None
    grammar: object  # params.grammar compiled, or None


@dataclass(slots=True)
class _Call:
    """Run `fn(engine)` on the engine thread; its result (or exception) resolves `future`."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any]


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _resolve_soon(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    loop = future.get_loop()
    if not loop.is_closed():
        loop.call_soon_threadsafe(_resolve, future, result, exc)


class DeltaStream:
    """Async iterator over one request's `RequestDelta`s; the last one has `finished=True`.

    A deque and one waiter future rather than an `asyncio.Queue`: every streamed token passes
    through here on the event loop, which shares the CPU with the model. Subclasses say how a
    request is aborted (`_abort`) and feed items with `_put_now` on the event loop thread.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._loop = asyncio.get_running_loop()
        self._items: deque[RequestDelta | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[RequestDelta | BaseException], None] | None = None
        self.finished = False

    def push_to(self, sink: Callable[[RequestDelta | BaseException], None]) -> None:
        """Hand each item to `sink` as it arrives (event loop thread), the last one a finished
        delta or an error, instead of iterating: a replica multiplexing many requests' deltas
        onto one connection (`engine.service.app`) does so without a task per request."""
        self._sink = sink
        while self._items:
            self._deliver(self._items.popleft())

    def _deliver(self, item: RequestDelta | BaseException) -> None:
        if isinstance(item, BaseException) or item.finished:
            self.finished = True
        assert self._sink is not None
        self._sink(item)

    def _put_now(self, item: RequestDelta | BaseException) -> None:  # event loop thread
        if self._sink is not None:
            self._deliver(item)
            return
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _abort(self) -> None:
        raise NotImplementedError

    def __aiter__(self) -> DeltaStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        if not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self._abort()
                raise
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    async def aclose(self) -> None:
        """Abort the request unless it already finished."""
        self._abort()


class RequestStream(DeltaStream):
    """A request's deltas from the in-process engine, whose thread feeds them with `_put`."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        super().__init__(request_id)
        self._engine = engine

    def _put(self, item: RequestDelta | BaseException) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._put_now, item)

    def _abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


def _shutdown_at_exit(ref: weakref.ref[AsyncEngine]) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


def _deliver(items: list[tuple[RequestStream, RequestDelta]]) -> None:
    for stream, delta in items:
        stream._put_now(delta)


class AsyncEngine:
    """Asyncio front of an `LLMEngine` running in a background thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer: Any = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.block_size = engine.block_manager.block_size
        self._commands: queue.SimpleQueue[_Add | _Call | str | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._warms: dict[str, tuple[Request, asyncio.Future[PrefixState]]] = {}  # engine thread
        self._wakeup = threading.Event()
        self._go = threading.Event()  # set by start()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._pending = 0
        self._ids = 0
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model inside the thread that will run the step loop (blocks until loaded).

        Every parallel torch op of the engine then starts on that one thread. OpenMP (libgomp)
        keeps a team of worker threads per thread that opens parallel regions; with a second team
        (a loader thread's) the process manages more threads than there are cores, and libgomp
        then lets idle workers sleep instead of spinning between regions: on 2 cores that made a
        decode step 1.5x slower (12.5 -> 19.5 ms at batch 1).
        """
        box: queue.SimpleQueue[AsyncEngine | BaseException] = queue.SimpleQueue()

        def build_then_run() -> None:
            lower_this_thread(config.compute_nice)  # before the model's first op
            try:
                built = cls(LLMEngine(config))
            except BaseException as exc:  # handed to the caller, which raises it
                box.put(exc)
                return
            built._thread = threading.current_thread()
            box.put(built)
            built._go.wait()
            built._run()

        threading.Thread(target=build_then_run, name="engine-loop", daemon=True).start()
        result = box.get()
        if isinstance(result, BaseException):
            raise result
        return result

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        # The engine thread drops the GIL inside every torch op and must get it back between
        # ops; with the default 5 ms switch interval a busy event loop can hold it that long
        # each time. 1 ms keeps the model fed while the server streams.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        if self._thread is not None and self._go.is_set():
            return  # running
        self._stopping = False
        self._dead = None
        if self._thread is None:  # else from_config's thread, waiting for the go
            self._thread = threading.Thread(
                target=self._run_lowered, name="engine-loop", daemon=True
            )
            self._thread.start()
        self._go.set()
        # A daemon thread still inside a torch op while the interpreter finalizes can crash
        # it; stop the loop first at exit (a weak reference: the engine may be collected).
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    def shutdown(self) -> None:
        self._stopping = True
        if self._dead is None:
            self._dead = RuntimeError("engine shut down")
        self._commands.put(None)
        self._wakeup.set()
        self._go.set()  # a loop thread never started runs once and ends
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.engine.grammars.close()

    # ---- requests (event loop thread) ------------------------------------------------------
    async def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile a structured-output grammar into the engine's cache, on its low-priority
        compile thread (neither the event loop nor the step loop waits for it, and the step's
        threads keep the cores first; a cached spec returns at once).

        Raises:
            InvalidRequestError: the spec does not compile (the compiler's reason).
        """
        await self.engine.grammars.compile_async(spec)

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        tenant: str = "default",
        namespace: str | None = None,
        priority: int = 0,
        shared_blocks: int = 0,
        share: TenantShare | None = None,
    ) -> RequestStream:
        """Validate and enqueue; raises `InvalidRequestError`, `ContextLengthError`,
        `EngineOverloadedError` or `EngineDeadError` before anything is allocated."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        self.engine.validate(prompt_token_ids, params, share, shared_blocks)
        grammar = None
        if params.grammar is not None:  # compiled by `compile_grammar` first, normally
            grammar = self.engine.grammars.compile(params.grammar)
        limit = self.engine.config.scheduler.max_waiting
        if self.engine.scheduler.num_waiting + self._pending >= limit:
            raise EngineOverloadedError("the engine's waiting queue is full; retry later")
        with self._lock:
            self._ids += 1
            request_id = request_id or f"req-{self._ids}"
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        with self._lock:
            self._pending += 1
        self._commands.put(
            _Add(
                list(prompt_token_ids),
                params,
                request_id,
                tenant,
                namespace,
                priority,
                shared_blocks,
                share,
                grammar,
            )
        )
        self._wakeup.set()
        # Hand the GIL to the engine thread now, while it waits for it to leave `wait()`: else it
        # starts the step only when this thread next blocks, after the rest of the request's
        # handling (0.5-0.65 -> 0.16-0.18 ms from here to the step's start, in the gateway).
        time.sleep(0)
        return stream

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, **kwargs: Any
    ) -> AsyncIterator[RequestDelta]:
        stream = self.add_request(prompt_token_ids, params, **kwargs)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        self._commands.put(request_id)
        self._wakeup.set()

    # ---- prefixes (event loop thread) ------------------------------------------------------
    async def warm_prefix(
        self,
        token_ids: list[int],
        *,
        key: str | None = None,
        tenant: str = "default",
        namespace: str | None = None,
        expires_at: float | None = None,
    ) -> PrefixState:
        """Compute a prefix into the cache (one prefill) and, with `key`, pin its full blocks
        until `unpin_prefix(key)` or `expires_at` (epoch seconds); see `LLMEngine.warm_prefix`.

        Raises:
            InvalidRequestError / ContextLengthError: the prefix cannot be a prompt.
            PinRefusedError: over the engine's pin cap (HTTP 409).
            EngineDeadError: the engine stopped before the prefix was computed.
        """
        done: asyncio.Future[PrefixState] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._ids += 1
            request_id = f"warm-{self._ids}"

        def start(engine: LLMEngine) -> None:
            request = engine.warm_prefix(
                token_ids,
                key=key,
                tenant=tenant,
                namespace=namespace,
                expires_at=expires_at,
                request_id=request_id,
            )
            self._warms[request_id] = (request, done)

        await self._call(start)
        return await done

    async def unpin_prefix(self, key: str) -> bool:
        """End a pin; its blocks stay cached until evicted. False if `key` was not pinned."""
        return await self._call(lambda engine: engine.unpin_prefix(key))

    async def extend_pin(self, key: str, expires_at: float | None) -> bool:
        """Move a pin's lease end (a use of the prefix); False if `key` is not pinned."""
        return await self._call(lambda engine: engine.extend_pin(key, expires_at))

    async def cached_block_hashes(self) -> list[bytes]:
        """Content hashes of every cached block (a replica publishes them as KV events)."""
        return await self._call(lambda engine: list(engine.block_manager.cached))

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        """`fn(engine)` on the engine thread, which owns every engine structure."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._commands.put(_Call(fn, future))
        self._wakeup.set()
        return await future

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- engine thread ---------------------------------------------------------------------
    def _run_lowered(self) -> None:
        lower_this_thread(self.engine.config.compute_nice)  # before its first op
        self._run()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if not self.engine.has_unfinished:
                    self.engine.expire_pins()  # leases end while idle too
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                self._dispatch_all(self.engine.step())
                if self._warms:
                    self._finish_warms()
        except BaseException as exc:  # the loop must never die silently
            log.exception("engine loop crashed")
            self._dead = exc
            dead = EngineDeadError(f"engine loop crashed: {exc!r}")
            for stream in list(self._streams.values()):
                stream._put(dead)
            self._streams.clear()
            self._fail_pending(dead)
            return
        for request_id in list(self.engine.scheduler.requests):
            aborted = self.engine.abort(request_id)
            if aborted is not None:
                self._dispatch(aborted)
        self._fail_pending(EngineDeadError("engine shut down"))

    def _finish_warms(self) -> None:
        for request_id, (request, done) in list(self._warms.items()):
            if not request.finished:
                continue
            del self._warms[request_id]
            try:
                state = self.engine.prefix_state(request)
            except Exception as exc:
                _resolve_soon(done, None, exc)
            else:
                _resolve_soon(done, state, None)

    def _fail_pending(self, exc: EngineDeadError) -> None:
        """The loop is ending: every warm-up and call still waiting gets `exc`."""
        for _, done in self._warms.values():
            _resolve_soon(done, None, exc)
        self._warms.clear()
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Call):
                _resolve_soon(cmd.future, None, exc)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd is None:
                continue
            if isinstance(cmd, str):
                delta = self.engine.abort(cmd)
                if delta is not None:
                    self._dispatch(delta)
                continue
            if isinstance(cmd, _Call):
                self._run_call(cmd)
                continue
            with self._lock:
                self._pending -= 1
            try:
                self.engine.add_request(
                    cmd.prompt_token_ids,
                    cmd.params,
                    cmd.request_id,
                    cmd.tenant,
                    cmd.namespace,
                    cmd.priority,
                    cmd.shared_blocks,
                    cmd.share,
                    cmd.grammar,
                )
            except Exception as exc:  # validated already; report rather than crash the loop
                stream = self._streams.pop(cmd.request_id, None)
                if stream is not None:
                    stream._put(exc)

    def _run_call(self, cmd: _Call) -> None:
        try:
            result = cmd.fn(self.engine)
        except Exception as exc:  # the caller's error, not the loop's
            _resolve_soon(cmd.future, None, exc)
        else:
            _resolve_soon(cmd.future, result, None)

    def _dispatch(self, delta: RequestDelta) -> None:
        self._dispatch_all([delta])

    def _dispatch_all(self, deltas: list[RequestDelta]) -> None:
        """Hand one step's deltas over with one wake-up per event loop (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestDelta]]] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            if delta.finished:
                del self._streams[delta.request_id]
            by_loop.setdefault(stream._loop, []).append((stream, delta))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, items)
