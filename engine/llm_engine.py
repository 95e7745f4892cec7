"""LLMEngine: requests in, one step at a time, deltas out (synchronous core)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.block_manager import BlockManager, PinSpec
from engine.config import EngineConfig, ModelConfig
from engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)
from engine.fairness import TenantStats
from engine.model_runner import ModelRunner, PromptLogprobs, StepTimings, num_kv_blocks
from engine.models.loader import LoadedModel, load_model, resolve_dtype
from engine.output_processor import OutputProcessor
from engine.outputs import CompletionOutput, Delta, PrefixState, RequestDelta, RequestOutput
from engine.request import Request, TenantShare
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.structured import Grammars
from engine.validation import validate_request
from kernels.options import KernelOptions, configure


def resolve_device(name: str) -> torch.device:
    """ "auto" is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    kv_usage: float  # 0..1, fraction of blocks held by sequences
    prefix_queries_tokens: int  # cumulative
    prefix_hits_tokens: int  # cumulative
    num_preemptions: int  # cumulative
    num_pinned_blocks: int = 0  # distinct blocks held by pinned prefixes
    max_pinned_blocks: int = 0  # the engine's pin cap
    pinned_blocks_by_tenant: dict[str, int] = field(default_factory=dict)
    tenants: dict[str, TenantStats] = field(default_factory=dict)  # running, waiting, KV charge


class LLMEngine:
    """Continuous-batching engine over a paged, prefix-cached KV pool."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            # The model gets every core; the asyncio server thread only needs the GIL between
            # torch ops, which release it.
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        self.dtype = resolve_dtype(config.dtype, self.device)
        configure(KernelOptions(config.cpu_attention, config.cpu_fused, config.cache_dir))
        if loaded is None:
            loaded = load_model(
                config.model, self.dtype, self.device, config.attention_backend, config.cache_dir
            )
        self.loaded = loaded
        self.model_config: ModelConfig = loaded.config
        self.tokenizer: Any = loaded.tokenizer
        self.model_name: str = loaded.name
        mc = self.model_config
        cache = config.cache
        self.num_blocks = num_kv_blocks(mc, cache, self.dtype)
        # A sequence can never outgrow the pool, so the context is capped at the pool's size too.
        limit = config.scheduler.max_model_len or mc.max_position_embeddings
        self.max_model_len = min(
            limit, mc.max_position_embeddings, self.num_blocks * cache.block_size
        )
        # Pins hold at most max_pinned_fraction of the pool, and always leave room for one
        # request of max_model_len tokens: they can slow traffic down, never starve it.
        room = self.num_blocks - -(-self.max_model_len // cache.block_size)
        self.block_manager = BlockManager(
            self.num_blocks,
            cache.block_size,
            cache.enable_prefix_caching,
            max_pinned_blocks=min(int(self.num_blocks * cache.max_pinned_fraction), room),
        )
        self.clock: Callable[[], float] = time.time  # pin leases (epoch seconds); tests swap it
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.runner = ModelRunner(
            loaded.model,
            mc,
            self.num_blocks,
            cache.block_size,
            self.dtype,
            self.device,
            config.seed,
        )
        self.eos_token_ids = set(mc.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            self.eos_token_ids.add(tok_eos)
        self.runner.sampler.eos_token_ids = sorted(self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, mc.vocab_size, sorted(self.eos_token_ids))
        self.timings = StepTimings()
        self._ids = itertools.count()

    # ---- requests --------------------------------------------------------------------------
    def validate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        share: TenantShare | None = None,
        shared_blocks: int = 0,
    ) -> int:
        """Check a request against the model, the pool and its tenant's KV cap; return its
        resolved max_tokens.

        Raises:
            InvalidRequestError / ContextLengthError naming the field, before anything is
            allocated.
        """
        return validate_request(
            prompt_token_ids,
            params,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            block_size=self.block_manager.block_size,
            share=share,
            shared_blocks=shared_blocks,
        )

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        tenant: str = "default",
        namespace: str | None = None,
        priority: int = 0,
        shared_blocks: int = 0,
        share: TenantShare | None = None,
        grammar: object = None,
    ) -> Request:
        """Queue a request (validated first: see `validate`). `namespace` salts its cache blocks;
        its first `shared_blocks` blocks are a public prefix's, shared by every namespace.
        `grammar`: `params.grammar` compiled already (`self.grammars`); compiled here if not.

        Raises:
            InvalidRequestError: as `validate`, or `params.grammar` does not compile.
        """
        max_tokens = self.validate(prompt_token_ids, params, share, shared_blocks)
        if params.grammar is not None and grammar is None:
            grammar = self.grammars.compile(params.grammar)
        if self.scheduler.num_waiting >= self.config.scheduler.max_waiting:
            raise EngineOverloadedError("the engine's waiting queue is full; retry later")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}", param="request_id")
        if params.prompt_logprobs is not None:
            # Cached tokens have no logits: a namespace of its own computes the whole prompt.
            namespace = f"{namespace or ''}\x00prompt-logprobs\x00{request_id}"
            shared_blocks = 0
        request = Request(
            request_id,
            list(prompt_token_ids),
            params,
            max_tokens,
            tenant,
            namespace,
            priority,
            shared_blocks,
        )
        request.share = share
        request.grammar = grammar
        self.scheduler.add_request(request)
        return request

    def abort(self, request_id: str) -> RequestDelta | None:
        """Abort a request at any point; its blocks return to the pool at once."""
        request = self.scheduler.abort_request(request_id)
        if request is None:
            return None
        return self._delta(request)

    # ---- prefixes --------------------------------------------------------------------------
    def warm_prefix(
        self,
        token_ids: list[int],
        *,
        key: str | None = None,
        tenant: str = "default",
        namespace: str | None = None,
        expires_at: float | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Compute a prefix into the cache with one prefill (and one greedy token); with `key`,
        pin its full blocks under `key` as its prompt finishes, until `unpin_prefix(key)` or
        `expires_at` (epoch seconds, `self.clock`). Read the outcome with `prefix_state` once
        the request has finished.

        Raises:
            InvalidRequestError / ContextLengthError: as `add_request`.
            PinRefusedError: the pin cap cannot take it (checked before anything runs).
        """
        if key is not None:
            self.block_manager.check_pin(key, token_ids, namespace)
        params = SamplingParams(max_tokens=1, temperature=0.0)
        request = self.add_request(token_ids, params, request_id, tenant, namespace)
        if key is not None:
            num_blocks = len(token_ids) // self.block_manager.block_size
            request.pin = PinSpec(key, num_blocks, expires_at)
        return request

    def prefix_state(self, request: Request) -> PrefixState:
        """The outcome of a finished `warm_prefix` request.

        Raises:
            PinRefusedError: the pin was refused when the prompt finished (another pin took the
                room meanwhile).
            EngineDeadError: the request was aborted before its prompt finished.
        """
        assert request.finished
        if request.pin_error is not None:
            raise request.pin_error
        if request.seqs[0].finish_reason == "abort":
            raise EngineDeadError("the prefix's warm-up request was aborted")
        n = len(request.prompt_token_ids)
        return PrefixState(
            num_tokens=n,
            num_blocks=n // self.block_manager.block_size,
            num_cached_tokens=request.num_cached_tokens,
            pinned=request.pinned is not None,
        )

    def unpin_prefix(self, key: str) -> bool:
        """End a pin now; its blocks stay cached until evicted. False if `key` is not pinned."""
        return self.block_manager.unpin(key)

    def extend_pin(self, key: str, expires_at: float | None) -> bool:
        """Move a pin's lease end; False if `key` is not pinned (expired, or never pinned)."""
        return self.block_manager.extend_pin(key, expires_at)

    def is_pinned(self, key: str) -> bool:
        return key in self.block_manager.pins

    def expire_pins(self) -> list[str]:
        """Unpin every pin whose lease has ended by `self.clock()`; returns their keys."""
        return self.block_manager.expire_pins(self.clock())

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> EngineStats:
        bm = self.block_manager.stats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting,
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            kv_usage=bm.usage,
            prefix_queries_tokens=bm.prefix_queries_tokens,
            prefix_hits_tokens=bm.prefix_hits_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_pinned_blocks=bm.num_pinned_blocks,
            max_pinned_blocks=bm.max_pinned_blocks,
            pinned_blocks_by_tenant=bm.pinned_blocks_by_tenant,
            tenants=self.scheduler.tenant_stats(),
        )

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Schedule, run the model, sample, detokenize; return what each touched request made."""
        t = time.perf_counter()
        if self.block_manager.pins:
            self.expire_pins()
        out = self.scheduler.schedule()
        self.timings.add("schedule", t)
        result = self.runner.execute(out, self.timings)
        t = time.perf_counter()
        self._record_prompt_logprobs(result.prompt_logprobs)
        touched: dict[str, Request] = {}
        for token in result.sampled:
            seq = self.scheduler.seqs[token.seq_id]
            seq.token_ids.append(token.token_id)
            if token.logprob is not None:
                seq.cumulative_logprob += token.logprob.logprob
                if seq.request.params.logprobs is not None:
                    if seq.logprobs is None:
                        seq.logprobs = []
                    seq.logprobs.append(token.logprob)
            stop = self.output_processor.check_stop(seq, token.token_id, token.grammar_done)
            if stop is not None:
                self.scheduler.finish(seq, *stop)
            touched[seq.request.request_id] = seq.request
        deltas = []
        for request in touched.values():
            delta = self._delta(request)
            if delta.deltas or delta.finished:
                deltas.append(delta)
        self.timings.add("output", t)
        self.timings.steps += 1
        return deltas

    def _record_prompt_logprobs(self, chunks: list[PromptLogprobs]) -> None:
        for chunk in chunks:
            seq = self.scheduler.seqs.get(chunk.seq_id)
            if seq is None or seq.request.prompt_logprobs is None:
                continue
            first = chunk.start + 1
            seq.request.prompt_logprobs[first : first + len(chunk.logprobs)] = chunk.logprobs

    def _delta(self, request: Request) -> RequestDelta:
        """The request's new output. With best_of > n nothing is sent until every candidate
        has finished; then the n best, numbered 0..n-1, whole."""
        params = request.params
        with_lp = params.logprobs is not None
        deltas: list[Delta] = []
        if params.num_seqs == params.n or request.finished:
            for index, seq in enumerate(request.returned_seqs):
                delta = self.output_processor.take_delta(seq, with_lp)
                if delta is not None:
                    delta.index = index
                    deltas.append(delta)
        prompt_logprobs = None
        ready = bool(deltas) or request.finished
        if ready and request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            prompt_logprobs = request.prompt_logprobs
            request.prompt_logprobs_sent = True
        return RequestDelta(
            request.request_id,
            deltas,
            request.finished,
            request.num_prompt_tokens,
            request.num_output_tokens,
            request.num_cached_tokens,
            prompt_logprobs,
        )

    # ---- offline helpers -------------------------------------------------------------------
    @staticmethod
    def final_output(request: Request) -> RequestOutput:
        return RequestOutput(
            request.request_id,
            request.prompt_token_ids,
            [
                CompletionOutput(
                    i, s.text, s.output_token_ids, s.finish_reason, s.stop_reason, s.logprobs
                )
                for i, s in enumerate(request.returned_seqs)
            ],
            request.finished,
            request.num_cached_tokens,
            request.prompt_logprobs,
        )
