"""Per-request sampling parameters, validated up front (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.grammar import GrammarSpec


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request.

    `temperature == 0` is greedy. `top_k <= 0` and `top_p == 1` disable those filters.
    `max_tokens=None` means "until the context is full". `logprobs=None` returns none;
    `logprobs=k` returns the chosen token's logprob plus the top k alternatives.
    `logit_bias` adds a bias in [-100, 100] to a token's logit before sampling (-100 bans it,
    +100 all but forces it). `best_of` samples that many completions (n <= best_of) sharing the
    prompt's blocks and returns the n with the highest cumulative logprob, once all finished.
    `prompt_logprobs=k` also returns each prompt token's logprob (and top k) after the first;
    such a request computes its whole prompt (no prefix-cache hits: cached tokens have no logits).
    `grammar` constrains the output to a JSON schema, any JSON object, a regex or a list of
    choices (`engine.structured`).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)
    best_of: int | None = None
    prompt_logprobs: int | None = None
    grammar: GrammarSpec | None = None

    MAX_LOGPROBS = 20
    MAX_BIAS = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = dict(self.logit_bias)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def num_seqs(self) -> int:
        """Sequences sampled: `best_of` when set, else `n`."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def sample_logprobs(self) -> int | None:
        """Top-k the sampler must report per token: `logprobs`, or 0 (the chosen token's
        logprob alone) when `best_of` ranks candidates by cumulative logprob."""
        if self.logprobs is None and self.num_seqs > self.n:
            return 0
        return self.logprobs

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first invalid field."""
        checks: list[tuple[bool, str, str]] = [
            (self.n >= 1, "n", f"n must be at least 1, got {self.n}"),
            (
                self.temperature >= 0.0,
                "temperature",
                f"temperature must be >= 0, got {self.temperature}",
            ),
            (0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 2**31, "top_k", f"top_k must be below 2**31, got {self.top_k}"),
            (
                self.seed is None or 0 <= self.seed < 2**63 - self.n,
                "seed",
                f"seed must be in [0, 2**63 - n), got {self.seed}",
            ),
            (0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                "presence_penalty",
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty",
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.repetition_penalty > 0.0,
                "repetition_penalty",
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                "max_tokens",
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
                "logprobs",
                f"logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                "stop",
                "stop must be a list of non-empty strings",
            ),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids",
                "stop_token_ids must be non-negative integers",
            ),
            (
                self.best_of is None or self.best_of >= self.n,
                "best_of",
                f"best_of must be at least n ({self.n}), got {self.best_of}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS,
                "prompt_logprobs",
                f"prompt_logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs}",
            ),
            (
                all(
                    isinstance(t, int) and t >= 0 and -self.MAX_BIAS <= b <= self.MAX_BIAS
                    for t, b in self.logit_bias.items()
                ),
                "logit_bias",
                f"logit_bias maps token ids to biases in [-{self.MAX_BIAS:g}, {self.MAX_BIAS:g}]",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)
        if self.top_k < 0:
            self.top_k = 0

    def validate_for_model(self, vocab_size: int) -> None:
        """Checks that need the model: token ids must exist in the vocabulary."""
        token_fields = (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias))
        for param, ids in token_fields:
            bad = sorted(t for t in ids if t >= vocab_size)
            if bad:
                raise InvalidRequestError(
                    f"{param}: token ids {bad[:8]} are outside the vocabulary (size {vocab_size})",
                    param=param,
                )
