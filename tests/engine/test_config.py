"""The engine's config dataclasses refuse invalid values with a ValueError naming the field
(not an assert, which `python -O` drops)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

MODEL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip


def test_defaults_are_valid() -> None:
    config = EngineConfig()
    assert config.cache.block_size == 16 and config.scheduler.max_waiting == 1024
    assert ModelConfig(**MODEL).num_kv_heads == 2  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (CacheConfig, "block_size", 0),
        (CacheConfig, "block_size", 12),
        (CacheConfig, "num_blocks", 0),
        (CacheConfig, "kv_cache_gib", 0.0),
        (SchedulerConfig, "max_num_seqs", 0),
        (SchedulerConfig, "max_num_batched_tokens", -1),
        (SchedulerConfig, "max_model_len", 0),
        (SchedulerConfig, "max_waiting", 0),
        (SchedulerConfig, "fair_allowance", -1.0),
        (SchedulerConfig, "fair_tie_band", -1.0),
        (EngineConfig, "num_threads", 0),
        (EngineConfig, "compute_nice", -1),
        (EngineConfig, "compute_nice", 20),
    ],
)
def test_invalid_value_names_the_field(cls: type, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        cls(**{field: value})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"head_dim": 0}, "head_dim"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
    ],
)
def test_invalid_model_config_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        ModelConfig(**{**MODEL, **changes})  # type: ignore[arg-type]
