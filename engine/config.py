"""Slotted, self-checking config dataclasses, one per component (built at the edge).

Each raises `ValueError` naming the field on an invalid value (checks are not `assert`s, which
`python -O` removes). None of them reads the environment: the gateway's `Settings` builds an
`EngineConfig`; `LLM(...)` builds one from its arguments and `engine.env.EngineEnv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# Orders of the waiting queue (`engine/policy.py` holds one strategy class for each).
SchedulingPolicy = Literal["fcfs", "priority", "fair"]


@dataclass(slots=True)
class ModelConfig:
    """Architecture of a Llama-family model (Llama, SmolLM, Mistral, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_positive(self, "num_layers", "num_heads", "num_kv_heads", "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads (GQA): {self.num_kv_heads}, {self.num_heads}"
            )

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Build from a transformers `PretrainedConfig` (Llama / Mistral / Qwen2 style)."""
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        rope_theta = getattr(hf, "rope_theta", None)
        rope_scaling = getattr(hf, "rope_scaling", None)
        params = getattr(hf, "rope_parameters", None)  # transformers >= 5
        if params:
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = dict(params)
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        eos = hf.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        model_type = getattr(hf, "model_type", "llama")
        bias = bool(getattr(hf, "attention_bias", False)) or model_type == "qwen2"
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bias,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )


@dataclass(slots=True)
class CacheConfig:
    """KV cache pool: `num_blocks` wins over `kv_cache_gib` when both are set.

    `max_pinned_fraction` caps the blocks pinned prefixes may hold; the engine also keeps room
    for one request of `max_model_len` tokens beside every pin (see `engine/block_manager.py`).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    max_pinned_fraction: float = 0.5

    def __post_init__(self) -> None:
        _check_positive(self, "block_size", "num_blocks", "kv_cache_gib")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two: {self.block_size}")
        if not 0 <= self.max_pinned_fraction < 1:
            raise ValueError(f"max_pinned_fraction must be in [0, 1): {self.max_pinned_fraction}")


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 2048  # tokens computed per step (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    policy: SchedulingPolicy = "fcfs"  # docs/fairness.md
    max_waiting: int = 1024  # queue bound; past it add_request raises EngineOverloadedError
    # The fair policy (engine/fairness.py): a tenant's service is prefill tokens that missed the
    # cache times `prefill_weight` plus generated tokens times `decode_weight`, over its weight;
    # tenants within `fair_allowance` of the least served may run their longest cached prefix;
    # among those tied on it, counters within `fair_tie_band` of the least count as level and
    # the request waiting longest goes first (0: strictly least served first).
    prefill_weight: float = 1.0
    decode_weight: float = 2.0
    fair_allowance: float = 256.0
    fair_tie_band: float = 64.0
    # While requests wait, the prefills already in progress compute at most this many tokens of
    # a step together, and the rest of the budget admits them: a short request (a cached
    # prompt's few new tokens) starts within a step instead of behind a long prompt's every
    # chunk. 0: no cap.
    long_prefill_tokens: int = 0

    def __post_init__(self) -> None:
        _check_positive(
            self,
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "max_waiting",
            "prefill_weight",
            "decode_weight",
        )
        if self.policy not in get_args(SchedulingPolicy):
            raise ValueError(
                f"policy must be one of {', '.join(get_args(SchedulingPolicy))}: {self.policy!r}"
            )
        if not self.fair_allowance >= 0:
            raise ValueError(f"fair_allowance must be at least 0: {self.fair_allowance!r}")
        if not self.fair_tie_band >= 0:
            raise ValueError(f"fair_tie_band must be at least 0: {self.fair_tie_band!r}")
        if self.long_prefill_tokens < 0:
            raise ValueError(f"long_prefill_tokens must be at least 0: {self.long_prefill_tokens}")


@dataclass(slots=True)
class EngineConfig:
    """Everything needed to build an `LLMEngine`. `model=None` is the bundled SmolLM2."""

    model: str | None = None
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    device: str = "auto"  # "auto": cuda when available, else cpu
    attention_backend: str = "auto"  # "auto" | "cpu" | "torch" | "triton"
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads for the model; None: all cores
    # nice increment of the serving engine's step thread and its OpenMP workers over the
    # process's (`AsyncEngine`; Linux): the server's I/O threads, and other processes at normal
    # priority, preempt the step at once on a shared machine. 0: the same priority
    compute_nice: int = 5
    # converted models (GGUF) and the compiled CPU kernels; None: ~/.cache/prefixgate
    cache_dir: str | None = None
    cpu_attention: bool = True  # False: the PyTorch reference attention on CPU, not C++ kernels
    cpu_fused: bool = True  # False: eager PyTorch layer ops on CPU, not the fused C++ ones
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        _check_positive(self, "num_threads")
        if not 0 <= self.compute_nice <= 19:
            raise ValueError(f"compute_nice must be in [0, 19]: {self.compute_nice!r}")


def _check_positive(config: object, *names: str) -> None:
    """Raise `ValueError` naming the first of `names` that is set (not None) and not > 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive: {value!r}")
