"""Gateway configuration: environment variables `PREFIXGATE_*`, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tenants import FailureMode, TenantsConfig

BUNDLED_MODEL_NAME = "smollm2"


class Settings(BaseSettings):
    """Everything `prefixgate serve` needs. `model=None` serves the bundled SmolLM2."""

    model_config = SettingsConfigDict(env_prefix="PREFIXGATE_", extra="ignore")

    # Server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"
    access_log: bool = True

    # Model and engine
    model: str | None = None
    served_model_name: str | None = None  # default: "smollm2" for the bundled model, else dir name
    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"
    seed: int = 0
    kv_cache_gib: float = Field(default=1.0, gt=0)
    num_blocks: int | None = Field(default=None, ge=1)  # wins over kv_cache_gib
    block_size: int = Field(default=16, ge=1)
    max_num_seqs: int = Field(default=64, ge=1)
    max_batched_tokens: int = Field(default=2048, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=1024, ge=1)  # waiting requests; past it: 503 + retry-after

    # Request limits
    max_n: int = Field(default=16, ge=1)
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1)

    # Tenants, keys and quotas. No Redis URL: in-process store (one gateway process).
    # No admin key: admin API off, and without Redis too, /v1/* needs no key (tenant `default`).
    redis_url: str | None = None
    admin_key: SecretStr | None = None
    redis_failure_mode: Literal["closed", "open"] = "closed"  # while Redis is unreachable
    lease_ttl_s: float = Field(default=300.0, gt=0)  # a concurrency slot outlives a crash so long
    # Connect and read timeout of one Redis call; a whole operation gets 4x (retry included).
    redis_timeout_s: float = Field(default=0.5, gt=0)
    # Prefix of every Redis key: deployments (or test runs) sharing one Redis stay apart.
    redis_key_prefix: str = Field(default="pg", pattern=r"^[A-Za-z0-9._-]{1,64}$")

    def model_name(self) -> str:
        """The name clients pass as `model`."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return BUNDLED_MODEL_NAME
        return Path(self.model.rstrip("/")).name or self.model

    @field_validator("redis_url", "admin_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("redis_failure_mode", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def anonymous(self) -> bool:
        """Embedded mode (no Redis) without an admin key: `/v1/*` needs no API key and every
        request is tenant `default`."""
        return not self.redis_url and self.admin_key is None

    def admin_key_value(self) -> str | None:
        return self.admin_key.get_secret_value() if self.admin_key is not None else None

    def tenants_config(self) -> TenantsConfig:
        return TenantsConfig(
            redis_url=self.redis_url or None,
            admin_key=self.admin_key_value(),
            failure_mode=FailureMode(self.redis_failure_mode),
            lease_ttl_s=self.lease_ttl_s,
            key_prefix=self.redis_key_prefix,
            socket_timeout_s=self.redis_timeout_s,
            connect_timeout_s=self.redis_timeout_s,
            pool_timeout_s=2 * self.redis_timeout_s,
            op_timeout_s=4 * self.redis_timeout_s,
        )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            attention_backend=self.attention_backend,
            seed=self.seed,
            cache=CacheConfig(
                block_size=self.block_size,
                num_blocks=self.num_blocks,
                kv_cache_gib=self.kv_cache_gib,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_batched_tokens,
                max_model_len=self.max_model_len,
                max_waiting=self.max_queue,
            ),
        )
