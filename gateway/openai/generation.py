"""One engine request as the gateway sees it: admitted, observed, accumulated, settled.

`start_generation` runs the admission hook and `engine.add_request`; the returned `Generation`
is an async iterator of the engine's `RequestDelta`s that records time to first token,
inter-token latency and usage on the way, and whose `close` (always called, exactly once)
aborts the engine request if it is still running, settles the hooks and counts the tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio

from engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)
from engine.outputs import Delta, RequestDelta, TokenLogprob
from engine.sampling_params import SamplingParams
from gateway.engine_client import EngineClient, RequestStream
from gateway.errors import SERVER_ERROR, APIError, from_engine_error
from gateway.hooks import GenerationHooks, GenerationInfo, Outcome, UsageCounts
from gateway.metrics import GatewayMetrics
from gateway.openai.schemas import Usage
from gateway.tenancy.auth import Principal

logger = logging.getLogger("prefixgate.generation")

_ENGINE_ERRORS = (InvalidRequestError, EngineOverloadedError, EngineDeadError)


@dataclass(slots=True)
class ChoiceState:
    """The accumulated output of one of the n completions (non-streaming responses)."""

    index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


def aborted_error() -> APIError:
    return APIError(
        503, "The request was aborted by the engine (shutting down?).",
        type=SERVER_ERROR, code="request_aborted",
    )  # fmt: skip


class Generation:
    """Async iterator over one request's `RequestDelta`s, with metrics and settlement."""

    def __init__(
        self,
        stream: RequestStream,
        info: GenerationInfo,
        *,
        hooks: GenerationHooks,
        metrics: GatewayMetrics,
        started_at: float,
        log: dict[str, object],
    ) -> None:
        self.stream = stream
        self.info = info
        self.hooks = hooks
        self.metrics = metrics
        self.started_at = started_at  # perf_counter() when the request arrived
        self.log = log
        self.prompt_tokens = info.prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finished = False
        self.aborted = False  # the engine ended it with finish_reason "abort"
        self._ttft_metric = metrics.ttft.labels(info.route)
        self._itl_metric = metrics.itl.labels(info.route)
        self._last_token_at: float | None = None
        self._ttft: float | None = None
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.info.request_id

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self.stream.__anext__()
        except _ENGINE_ERRORS as exc:
            raise from_engine_error(exc) from exc
        self._observe(out)
        return out

    def _observe(self, out: RequestDelta) -> None:
        now = time.perf_counter()
        if out.completion_tokens > self.completion_tokens:
            if self._last_token_at is None:
                self._ttft = now - self.started_at
                self._ttft_metric.observe(self._ttft)
            else:
                self._itl_metric.observe(now - self._last_token_at)
            self._last_token_at = now
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finished = True
            self.aborted = any(d.finish_reason == "abort" for d in out.deltas)

    async def close(self, outcome: Outcome) -> None:
        """Abort if unfinished, settle hooks, count tokens. Idempotent; safe under cancellation."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if not self.finished:
                await self.stream.aclose()
            elapsed = time.perf_counter() - self.started_at
            self.metrics.e2e.labels(self.info.route, outcome).observe(elapsed)
            tenant = self.info.principal.tenant
            self.metrics.count_tokens(
                tenant, self.prompt_tokens, self.completion_tokens, self.cached_tokens
            )
            self.log.update(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cached_tokens=self.cached_tokens,
                ttft_ms=None if self._ttft is None else round(self._ttft * 1000, 2),
                outcome=outcome,
            )
            usage = UsageCounts(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
            try:
                await self.hooks.settle(self.info, usage, outcome)
            except Exception:
                logger.exception("settle hook failed for %s", self.request_id)


async def start_generation(
    engine: EngineClient,
    *,
    hooks: GenerationHooks,
    metrics: GatewayMetrics,
    info: GenerationInfo,
    prompt_token_ids: list[int],
    params: SamplingParams,
    started_at: float,
    log: dict[str, object],
    shared_blocks: int = 0,
) -> tuple[Generation, Mapping[str, str]]:
    """Admit (hooks), then add the request to the engine (its first `shared_blocks` blocks are
    a public prefix's, hashed in the shared namespace).

    Returns the generation and the extra response headers from the admission hook.

    Raises:
        APIError: refused by the hook (e.g. 429) or by the engine (400 / 503).
    """
    headers = await hooks.admit(info)
    principal: Principal = info.principal
    try:
        stream = engine.add_request(
            prompt_token_ids,
            params,
            request_id=info.request_id,
            tenant=principal.tenant,
            namespace=principal.namespace,
            priority=principal.priority,
            shared_blocks=shared_blocks,
            share=principal.share,
        )
    except BaseException as exc:
        # Settled with no tokens (it still counts as a request); the access line says so.
        log.update(prompt_tokens=0, completion_tokens=0, cached_tokens=0, outcome="rejected")
        await hooks.settle(info, UsageCounts(), "rejected")
        if isinstance(exc, _ENGINE_ERRORS):
            raise from_engine_error(exc) from exc
        raise
    gen = Generation(stream, info, hooks=hooks, metrics=metrics, started_at=started_at, log=log)
    return gen, headers


async def collect(generation: Generation, n: int) -> list[ChoiceState]:
    """Run a generation to the end; the n completions in index order."""
    choices = [ChoiceState(i) for i in range(n)]
    async for out in generation:
        for delta in out.deltas:
            choices[delta.index].add(delta)
    return choices
