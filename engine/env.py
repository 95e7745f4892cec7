"""The `PREFIXGATE_*` environment variables the engine honours, read in this one place.

`prefixgate serve` reads them through the gateway's `Settings` (which inherits these fields);
offline, `LLM(...)` reads them here. Either way they reach the engine as `EngineConfig` fields
(`EngineEnv.apply`); nothing below reads the environment. The table is docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.config import EngineConfig

ENV_CONFIG = SettingsConfigDict(env_prefix="PREFIXGATE_", extra="ignore")


def none_if_empty(value: object) -> object:
    """An empty variable (`PREFIXGATE_CACHE_DIR=`) means unset."""
    return None if value == "" else value


class EngineEnv(BaseSettings):
    """Engine settings that come from the environment, not from `LLM(...)`'s arguments."""

    model_config = ENV_CONFIG

    cache_dir: str | None = Field(
        default=None,
        description="where converted models (`models/`) and the compiled CPU kernels "
        "(`torch_extensions/`) are kept; unset: `~/.cache/prefixgate`",
    )

    cpu_attention: Literal["cpu", "torch"] = Field(
        default="cpu",
        description="`cpu`: the C++ attention kernels on CPU (the reference where they cannot be "
        "built); `torch`: the PyTorch reference",
    )
    cpu_fused: bool = Field(
        default=True,
        description="`true`: the fused C++ layer ops and the one-call layer stack on CPU; "
        "`false` (or `0`): eager PyTorch ops",
    )

    _empty_is_unset = field_validator("cache_dir", mode="before")(none_if_empty)

    @field_validator("cpu_attention", mode="before")
    @classmethod
    def _attention_name(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return value.lower() or "cpu"  # empty: unset

    def apply(self, config: EngineConfig) -> EngineConfig:
        """`config` with these settings."""
        return dataclasses.replace(
            config,
            cache_dir=self.cache_dir,
            cpu_attention=self.cpu_attention == "cpu",
            cpu_fused=self.cpu_fused,
        )
