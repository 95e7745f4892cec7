"""What the engine hands back: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    """Logprob of one sampled token, with the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class CompletionOutput:
    """One of the n completions of a request (cumulative)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class RequestOutput:
    """Final (or cumulative) result of a request, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # SamplingParams.prompt_logprobs: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass(slots=True)
class Delta:
    """New output of one completion since the previous delta (for streaming)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestDelta:
    """What `AsyncEngine.generate` yields: the deltas of one engine step for one request."""

    request_id: str
    deltas: list[Delta]
    finished: bool
    prompt_tokens: int
    completion_tokens: int  # so far, all n completions together (all best_of candidates)
    cached_tokens: int  # prompt tokens served from the prefix cache
    # SamplingParams.prompt_logprobs: on the first delta after the prompt was computed
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True, slots=True)
class PrefixState:
    """What warming a prefix left in the engine (`warm_prefix`)."""

    num_tokens: int  # the prefix's tokens
    num_blocks: int  # its full blocks: the cacheable (and, when pinned, pinned) part
    num_cached_tokens: int  # tokens found in the cache already, so not computed again
    pinned: bool  # its full blocks are pinned under the key until unpinned or the lease ends
