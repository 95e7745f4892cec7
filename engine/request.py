"""Request and sequence state (pure Python, no torch).

A request asks for `n` completions of one prompt. Each completion is a `Sequence`: the unit the
scheduler schedules, with its own tokens, block table and progress. With n > 1 the first sequence
prefills the prompt alone; when its prompt is done the others are forked from it, sharing its
blocks, and all n sample their first token from the same logits.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from engine.block_manager import Pin, PinSpec
from engine.errors import PinRefusedError
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


@dataclass(frozen=True, slots=True)
class TenantShare:
    """What the scheduler knows of a request's tenant besides its id and priority (the gateway
    reads it from the tenant's quota; offline requests get the default). The newest request of a
    tenant carries its current values."""

    weight: int = 1  # its share of the engine under the fair policy, relative to other tenants'
    max_kv_blocks: int | None = None  # KV blocks its running requests may hold; None: no cap

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise ValueError(f"weight must be at least 1: {self.weight!r}")
        if self.max_kv_blocks is not None and self.max_kv_blocks < 1:
            raise ValueError(f"max_kv_blocks must be positive: {self.max_kv_blocks!r}")


DEFAULT_SHARE = TenantShare()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One completion in progress.

    `token_ids` holds prompt + outputs; `num_computed_tokens` of them have KV in the cache:

        | prompt ...................... | outputs ........ |
        |<--- num_computed_tokens --->|  to compute next |
    """

    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0  # of the sampled tokens, when the sampler reports them
    # Output text bookkeeping, owned by the output processor.
    text: str = ""  # full detokenized output text (stop strings trimmed once finished)
    num_text_sent: int = 0  # characters already handed to the client
    num_tokens_sent: int = 0  # output tokens already handed to the client
    detok_state: object = None

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(slots=True, eq=False)
class Request:
    """A user's request: one prompt, `params.num_seqs` sequences (n, or best_of)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what the context leaves
    tenant: str = "default"
    namespace: str | None = None
    priority: int = 0  # lower is served first by the priority policy
    shared_blocks: int = 0  # leading blocks of a public prefix (block_manager.PUBLIC_NAMESPACE)
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    forked: bool = False  # the n - 1 siblings exist
    pin: PinSpec | None = None  # pin the prompt's leading blocks when it finishes (warm requests)
    pinned: Pin | None = None  # the pin taken at finish
    pin_error: PinRefusedError | None = None  # or why it was refused
    # params.prompt_logprobs: entry i is prompt token i's logprob (None for the first token and
    # until computed); filled by the engine as the prompt's chunks run.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False  # handed out with a delta already
    # The tenant's current weight and KV cap; None (offline, prefix warm-ups): keep what the
    # scheduler last heard for this tenant (the default for a tenant it never heard of).
    share: TenantShare | None = None
    grammar: object = None  # params.grammar compiled (engine.structured), opaque here

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs.append(Sequence(self, 0, list(self.prompt_token_ids)))
        if self.params.num_seqs == 1:
            self.forked = True
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @property
    def returned_seqs(self) -> list[Sequence]:
        """The sequences the caller sees, in output order: all of them, or with best_of the
        n best by cumulative logprob (ties: lower index first)."""
        if self.params.num_seqs == self.params.n:
            return self.seqs  # forked in index order
        ranked = sorted(self.seqs, key=lambda s: (-s.cumulative_logprob, s.index))
        return ranked[: self.params.n]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.seqs)

    @property
    def num_output_tokens(self) -> int:
        return sum(s.num_output_tokens for s in self.seqs)
