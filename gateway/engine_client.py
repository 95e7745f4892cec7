"""The gateway's view of an engine: the `EngineClient` protocol.

The gateway never imports `engine.async_engine` outside the embedded-mode factory
(`load_embedded_engine`), so its tests run against a small fake engine, and a remote client
(engine replicas as separate services) can later implement the same protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from engine.config import EngineConfig
from engine.fairness import TenantStats
from engine.grammar import GrammarSpec
from engine.outputs import PrefixState, RequestDelta
from engine.request import TenantShare
from engine.sampling_params import SamplingParams


@runtime_checkable
class EngineStats(Protocol):
    """Engine counters read at scrape time (`num_preemptions` and `prefix_*` are cumulative)."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    kv_usage: float  # 0..1
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    num_preemptions: int
    num_pinned_blocks: int  # distinct blocks held by pinned prefixes
    max_pinned_blocks: int  # the engine's pin cap
    pinned_blocks_by_tenant: dict[str, int]
    tenants: dict[str, TenantStats]  # per tenant: sequences running and waiting, KV charge and cap


class RequestStream(Protocol):
    """Async iterator of one request's deltas; the last one has `finished=True`."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[RequestDelta]: ...

    async def __anext__(self) -> RequestDelta: ...

    async def aclose(self) -> None:
        """Abort the request in the engine if it has not finished (idempotent)."""
        ...


class EngineClient(Protocol):
    """What the gateway uses of an engine (in-process `AsyncEngine` today, remote later)."""

    tokenizer: Any  # a transformers tokenizer: apply_chat_template, encode, decode
    model_name: str
    max_model_len: int
    block_size: int  # tokens per KV block: a prefix's full blocks are what a hit serves

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

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
        """Admit a request (event loop thread only). `namespace` salts its KV cache blocks; its
        first `shared_blocks` blocks are a public prefix's, shared by every namespace.
        `priority` (lower first) orders it under the priority policy; `share` carries its
        tenant's weight (fair policy).

        Raises:
            InvalidRequestError / ContextLengthError: bad request, nothing allocated.
            EngineOverloadedError: the waiting queue is full (HTTP 503 + retry-after).
            EngineDeadError: the engine loop has crashed.
        """
        ...

    def abort(self, request_id: str) -> None: ...

    async def compile_grammar(self, spec: GrammarSpec) -> None:
        """Make sure a structured-output grammar compiles, ahead of `add_request` and off the
        engine's step loop: the in-process engine compiles it into its cache (by spec); the
        remote client only checks it, and the replica compiles it when the request arrives.

        Raises:
            InvalidRequestError: the grammar does not compile (the message says why).
        """
        ...

    async def warm_prefix(
        self,
        token_ids: list[int],
        *,
        key: str | None = None,
        tenant: str = "default",
        namespace: str | None = None,
        expires_at: float | None = None,
    ) -> PrefixState:
        """Compute a prefix into the cache (one prefill); with `key`, pin its full blocks until
        `unpin_prefix(key)` or `expires_at` (epoch seconds). Re-pinning a key replaces its pin.

        Raises:
            InvalidRequestError / ContextLengthError: the prefix cannot be a prompt.
            PinRefusedError: over the engine's pin cap, or prefix caching is off (HTTP 409).
            EngineDeadError: the engine stopped.
        """
        ...

    async def unpin_prefix(self, key: str) -> bool:
        """End a pin (its blocks stay cached until evicted); False if `key` is not pinned."""
        ...

    async def extend_pin(self, key: str, expires_at: float | None) -> bool:
        """Move a pin's lease end; False if `key` is not pinned (expired or never pinned)."""
        ...

    def stats(self) -> EngineStats: ...


def load_embedded_engine(config: EngineConfig) -> EngineClient:
    """Build the in-process `AsyncEngine` (blocking: loads the model; run it in a thread)."""
    from engine.async_engine import AsyncEngine

    engine: EngineClient = AsyncEngine.from_config(config)
    return engine
