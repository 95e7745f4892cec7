"""A small deterministic engine implementing `gateway.engine_client.EngineClient`.

Character-level tokenizer (one token per ASCII character, three special tokens), outputs that
depend only on (prompt, seed, choice index) so tests can compare runs, stop strings held back
like the real engine, n > 1, logprobs, a queue bound, aborts, block accounting so the
disconnect tests can watch blocks return to the pool, and prefix warm-up and pins with leases
(on `clock`) under a cap of half the pool, like the real engine's.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from engine.async_engine import DeltaStream
from engine.block_manager import PUBLIC_NAMESPACE
from engine.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    PinRefusedError,
)
from engine.fairness import TenantStats
from engine.grammar import GrammarSpec
from engine.outputs import Delta, PrefixState, RequestDelta, TokenLogprob
from engine.request import DEFAULT_SHARE, TenantShare
from engine.sampling_params import SamplingParams
from engine.service.protocol import ReplicaStats

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_ID = 0
FIRST_CHAR_ID = len(SPECIALS)
ALPHABET = "abcdefghij klmnopqrstuvwxyz.,"


@dataclass(frozen=True)
class FakeAddedToken:
    content: str
    special: bool = True


class FakeTokenizer:
    """One token per character (ids 3..258 for code points 0..255), ChatML-like template."""

    chat_template = "chatml"
    eos_token_id = EOS_ID
    added_tokens_decoder: ClassVar = {i: FakeAddedToken(s) for i, s in enumerate(SPECIALS)}

    def __len__(self) -> int:
        return FIRST_CHAR_ID + 256

    def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[int]:
        ids: list[int] = []
        i = 0
        specials = () if split_special_tokens else SPECIALS
        while i < len(text):
            special = next((s for s in specials if text.startswith(s, i)), None)
            if special is not None:
                ids.append(SPECIALS.index(special))
                i += len(special)
            else:
                ids.append(FIRST_CHAR_ID + (ord(text[i]) if ord(text[i]) < 256 else ord("?")))
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out = []
        for t in ids:
            if t < FIRST_CHAR_ID:
                if not skip_special_tokens:
                    out.append(SPECIALS[t])
            else:
                out.append(chr(t - FIRST_CHAR_ID))
        return "".join(out)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.decode([t]) for t in ids]

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> str | list[int]:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversation)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text


@dataclass
class FakePin:
    tenant: str
    namespace: str | None
    token_ids: list[int]
    num_blocks: int
    expires_at: float | None


def char_id(c: str) -> int:
    return FIRST_CHAR_ID + ord(c)


def _stable_seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _Choice:
    def __init__(self, index: int, rng: random.Random) -> None:
        self.index = index
        self.rng = rng
        self.text = ""
        self.emitted = 0  # characters of `text` already sent
        self.num_tokens = 0
        self.finish_reason: str | None = None


class FakeStream(DeltaStream):
    """The in-process stream's iterator and push mode (`DeltaStream`), fed by the fake engine."""

    def __init__(self, engine: FakeEngine, request_id: str) -> None:
        super().__init__(request_id)
        self._engine = engine

    def _abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class FakeEngine:
    """Generates one token per choice every `token_delay` seconds (0: as fast as the loop)."""

    def __init__(
        self,
        *,
        max_model_len: int = 512,
        num_blocks: int = 256,
        block_size: int = 16,
        max_active: int = 64,
        token_delay: float = 0.0,
        eos_after: int | None = None,
        fail_after: int | None = None,
        model_name: str = "fake-model",
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_active = max_active
        self.token_delay = token_delay
        self.eos_after = eos_after  # emit EOS after this many tokens (unless ignore_eos)
        self.fail_after = fail_after  # raise EngineDeadError mid-stream after this many steps
        self.started = False
        self.dead = False
        self.blocks_held: dict[str, int] = {}
        self.aborted: list[str] = []
        self.requests: list[tuple[str, list[int], SamplingParams, str, str | None]] = []
        self.tenancy: dict[str, tuple[int, TenantShare]] = {}  # request id -> (priority, share)
        self.grammars: list[GrammarSpec] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._streams: dict[str, FakeStream] = {}
        self._n: dict[str, int] = {}
        self._cached_prefixes: set[tuple[str | int | None, ...]] = set()
        self._ids = itertools.count()
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.pins: dict[str, FakePin] = {}
        self.warmed: list[tuple[str | None, list[int], str | None]] = []  # (key, tokens, ns)
        self.clock: Callable[[], float] = time.time

    # -- EngineClient -------------------------------------------------------------------------

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        for request_id in list(self._tasks):
            self.abort(request_id)
        self.started = False

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
    ) -> FakeStream:
        if self.dead:
            raise EngineDeadError("fake engine is dead")
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        if len(prompt_token_ids) + max_tokens > self.max_model_len:
            raise ContextLengthError("prompt + max_tokens over the context", param="max_tokens")
        if len(self._tasks) >= self.max_active:
            raise EngineOverloadedError("fake engine queue full", retry_after_s=2.0)
        request_id = request_id or f"fake-{next(self._ids)}"
        self.requests.append((request_id, list(prompt_token_ids), params, tenant, namespace))
        self.tenancy[request_id] = (priority, share or DEFAULT_SHARE)
        stream = FakeStream(self, request_id)
        self._streams[request_id] = stream
        self._n[request_id] = params.n
        loop = asyncio.get_running_loop()
        scope = (namespace, shared_blocks)
        coro = self._run(request_id, list(prompt_token_ids), scope, params, max_tokens, stream)
        self._tasks[request_id] = loop.create_task(coro)
        return stream

    async def compile_grammar(self, spec: GrammarSpec) -> None:
        """The fake accepts every grammar and constrains nothing (the real engine's tests
        cover constrained output)."""
        self.grammars.append(spec)

    def abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is None:
            return
        self.aborted.append(request_id)
        task.cancel()
        self.blocks_held.pop(request_id, None)
        stream = self._streams.pop(request_id)
        n = self._n.pop(request_id, 1)
        deltas = [Delta(i, "", [], None, "abort") for i in range(n)]
        stream._put_now(RequestDelta(request_id, deltas, True, 0, 0, 0))

    def stats(self) -> ReplicaStats:
        self._expire_pins()
        pinned = sum(p.num_blocks for p in self.pins.values())
        used = sum(self.blocks_held.values()) + pinned
        by_tenant: Counter[str] = Counter()
        for pin in self.pins.values():
            by_tenant[pin.tenant] += pin.num_blocks
        return ReplicaStats(
            num_running=len(self._tasks),
            num_waiting=0,
            num_blocks=self.num_blocks,
            num_free_blocks=self.num_blocks - used,
            kv_usage=used / self.num_blocks,
            prefix_queries_tokens=self.prefix_queries,
            prefix_hits_tokens=self.prefix_hits,
            num_preemptions=0,
            num_pinned_blocks=pinned,
            max_pinned_blocks=self.num_blocks // 2,
            pinned_blocks_by_tenant=dict(by_tenant),
            tenants=self._tenant_stats(),
        )

    def _tenant_stats(self) -> dict[str, TenantStats]:
        """Running requests and the blocks they hold, by tenant (nothing waits here)."""
        tenant_of = {rid: tenant for rid, _, _, tenant, _ in self.requests}
        out: dict[str, TenantStats] = {}
        for request_id in self._tasks:
            stats = out.setdefault(tenant_of[request_id], TenantStats())
            stats.running += 1
            stats.kv_blocks += self.blocks_held.get(request_id, 0)
            stats.max_kv_blocks = self.tenancy[request_id][1].max_kv_blocks
        return out

    async def warm_prefix(
        self,
        token_ids: list[int],
        *,
        key: str | None = None,
        tenant: str = "default",
        namespace: str | None = None,
        expires_at: float | None = None,
    ) -> PrefixState:
        if self.dead:
            raise EngineDeadError("fake engine is dead")
        if not token_ids or len(token_ids) >= self.max_model_len:
            raise InvalidRequestError("the prefix must fit the context", param="prompt")
        self._expire_pins()
        num_blocks = len(token_ids) // self.block_size
        if key is not None:
            others = sum(p.num_blocks for k, p in self.pins.items() if k != key)
            if others + num_blocks > self.num_blocks // 2:
                raise PinRefusedError(
                    f"over the fake engine's pin cap of {self.num_blocks // 2} blocks",
                    cap=self.num_blocks // 2,
                    requested=others + num_blocks,
                )
        self.warmed.append((key, list(token_ids), namespace))
        cached = self._cached_tokens(list(token_ids), (namespace, 0))
        if key is not None:
            self.pins[key] = FakePin(tenant, namespace, list(token_ids), num_blocks, expires_at)
        return PrefixState(len(token_ids), num_blocks, cached, pinned=key is not None)

    async def unpin_prefix(self, key: str) -> bool:
        return self.pins.pop(key, None) is not None

    async def extend_pin(self, key: str, expires_at: float | None) -> bool:
        self._expire_pins()
        pin = self.pins.get(key)
        if pin is None:
            return False
        pin.expires_at = expires_at
        return True

    def _expire_pins(self) -> None:
        now = self.clock()
        for key in [
            k for k, p in self.pins.items() if p.expires_at is not None and p.expires_at <= now
        ]:
            del self.pins[key]

    # -- generation ---------------------------------------------------------------------------

    def _cached_tokens(self, prompt: list[int], scope: tuple[str | None, int]) -> int:
        """Full blocks of the prompt seen before in the same cache namespace (its first
        `shared_blocks` blocks in the public one, like the real engine's hash chain)."""
        namespace, shared = scope
        bs = self.block_size
        full = (len(prompt) - 1) // bs  # the last prompt token is always computed

        def key(k: int) -> tuple[str | int | None, ...]:  # (public blocks, then namespace)
            public = k if namespace == PUBLIC_NAMESPACE else min(k, shared)
            return (public, namespace if public < k else None, *prompt[: k * bs])

        cached = 0
        for k in range(1, full + 1):
            if key(k) not in self._cached_prefixes:
                break
            cached = k * bs
        for k in range(1, len(prompt) // bs + 1):
            self._cached_prefixes.add(key(k))
        return cached

    def _rng(self, prompt: list[int], params: SamplingParams, index: int) -> random.Random:
        if params.greedy:
            return random.Random(_stable_seed(prompt))
        if params.seed is not None:
            return random.Random(_stable_seed(prompt, params.seed, index))
        return random.Random()

    async def _run(
        self,
        request_id: str,
        prompt: list[int],
        scope: tuple[str | None, int],
        params: SamplingParams,
        max_tokens: int,
        stream: FakeStream,
    ) -> None:
        cached = self._cached_tokens(prompt, scope)
        self.prefix_queries += len(prompt)
        self.prefix_hits += cached
        choices = [_Choice(i, self._rng(prompt, params, i)) for i in range(params.n)]
        max_stop = max((len(s) for s in params.stop), default=0)
        total = 0
        for step in itertools.count():
            await asyncio.sleep(self.token_delay)
            if self.fail_after is not None and step >= self.fail_after:
                self._finish(request_id)
                self.dead = True
                stream._put_now(EngineDeadError("fake engine died"))
                return
            live = [c for c in choices if c.finish_reason is None]
            deltas = [self._step(c, params, max_tokens, max_stop) for c in live]
            total += len(live)
            size = len(prompt) + max(c.num_tokens for c in choices)
            self.blocks_held[request_id] = math.ceil(size / self.block_size) * params.n
            finished = all(c.finish_reason is not None for c in choices)
            if finished:
                self._finish(request_id)
            stream._put_now(RequestDelta(request_id, deltas, finished, len(prompt), total, cached))
            if finished:
                return

    def _finish(self, request_id: str) -> None:
        self._tasks.pop(request_id, None)
        self._streams.pop(request_id, None)
        self._n.pop(request_id, None)
        self.blocks_held.pop(request_id, None)

    def _step(self, c: _Choice, params: SamplingParams, max_tokens: int, max_stop: int) -> Delta:
        c.num_tokens += 1
        if self.eos_after is not None and c.num_tokens > self.eos_after and not params.ignore_eos:
            token = EOS_ID
            c.finish_reason = "stop"
        else:
            token = char_id(c.rng.choice(ALPHABET))
            c.text += chr(token - FIRST_CHAR_ID)
        stop_at = min((i for s in params.stop if (i := c.text.find(s)) >= 0), default=None)
        if stop_at is not None:
            c.text = c.text[:stop_at]
            c.finish_reason = "stop"
        elif c.num_tokens >= max_tokens and c.finish_reason is None:
            c.finish_reason = "length"
        hold = max(0, max_stop - 1)  # a stop string may still be completing: hold its prefix
        safe = len(c.text) if c.finish_reason else max(c.emitted, len(c.text) - hold)
        text = c.text[c.emitted : safe]
        c.emitted = max(c.emitted, safe)
        logprobs = None
        if params.logprobs is not None:
            alt = char_id("z") if token != char_id("z") else char_id("a")
            top = [(token, -0.25), (alt, -1.5)][: params.logprobs]
            logprobs = [TokenLogprob(token, -0.25, top)]
        return Delta(c.index, text, [token], logprobs, c.finish_reason,
                     params.stop[0] if stop_at is not None else None)  # fmt: skip
