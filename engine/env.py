"""The `PREFIXGATE_*` environment variables the engine honours, read in this one place.

`prefixgate serve` reads them through the gateway's `Settings` (which inherits these fields);
offline, `LLM(...)` reads them here. Either way they reach the engine as `EngineConfig` fields
(`EngineEnv.apply`); nothing below reads the environment. The table is docs/configuration.md.
"""

from __future__ import annotations

import dataclasses

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

    _empty_is_unset = field_validator("cache_dir", mode="before")(none_if_empty)

    def apply(self, config: EngineConfig) -> EngineConfig:
        """`config` with these settings."""
        return dataclasses.replace(config, cache_dir=self.cache_dir)
