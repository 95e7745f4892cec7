"""Configuration: every `PREFIXGATE_*` environment variable is declared here, overridden by CLI
flags, and handed down as each component's own config (`engine_config()`, `tenants_config()`).

`python -m gateway.settings --markdown` writes the table of docs/configuration.md from these
declarations (a test checks that the file is current).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings

from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SchedulingPolicy
from engine.env import ENV_CONFIG, EngineEnv, none_if_empty
from gateway.limits import RequestLimits
from tenants import FailureMode, TenantsConfig

BUNDLED_MODEL_NAME = "smollm2"
DEFAULT_URL = "http://127.0.0.1:8000"
_LIMITS = RequestLimits()  # the defaults


class Settings(EngineEnv):
    """Everything `prefixgate serve` needs. `model=None` serves the bundled SmolLM2.

    Inherits the variables that offline `LLM(...)` honours too (`EngineEnv`)."""

    # Server
    host: str = Field(default="127.0.0.1", description="bind address")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    log_level: str = Field(default="info", description="debug, info, warning or error")
    access_log: bool = Field(default=True, description="one structured log line per request")
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM or Ctrl-C, requests in flight get this long to finish while "
        "new ones get 503; then the process exits (code 0)",
    )

    # Model and engine
    model: str | None = Field(
        default=None,
        description="Hugging Face model directory or GGUF file; unset: the bundled SmolLM2-135M",
    )
    served_model_name: str | None = Field(
        default=None,
        description="the name clients pass as `model`; unset: `smollm2` for the bundled model, "
        "else the directory or file name",
    )
    dtype: str = Field(
        default="auto", description="weights and KV cache: auto, float32, bfloat16, float16"
    )
    device: str = Field(
        default="auto", description="torch device: auto (cuda when available, else cpu), cpu, cuda"
    )
    attention_backend: str = Field(
        default="auto",
        description="auto (triton on CUDA, the C++ kernels on CPU), cpu, torch or triton",
    )
    seed: int = Field(default=0, description="seed of the sampler's random generator")
    kv_cache_gib: float = Field(default=1.0, gt=0, description="KV cache size in GiB")
    num_blocks: int | None = Field(
        default=None, ge=1, description="KV cache size in blocks; wins over kv_cache_gib"
    )
    block_size: int = Field(default=16, ge=1, description="tokens per KV block (a power of two)")
    prefix_caching: bool = Field(
        default=True,
        description="share KV blocks of identical prompt prefixes (off: registered prefixes "
        "cannot be pinned)",
    )
    max_num_seqs: int = Field(default=64, ge=1, description="running sequences at most")
    max_batched_tokens: int = Field(
        default=2048, ge=1, description="tokens computed per engine step"
    )
    long_prefill_tokens: int = Field(
        default=0,
        ge=0,
        description="while requests wait, the prompts already being computed take at most this "
        "many tokens of a step together and the rest admits them, so a short or cached request "
        "starts within a step instead of behind a long prompt's every chunk (vLLM's "
        "`long_prefill_token_threshold`); 0: no cap",
    )
    max_model_len: int | None = Field(
        default=None, ge=1, description="context length; unset: the model's"
    )
    max_queue: int = Field(
        default=1024, ge=1, description="waiting requests at most; past it: 503 and retry-after"
    )
    compute_nice: int = Field(
        default=5,
        ge=0,
        le=19,
        description="nice increment of the engine's step thread and its OpenMP workers over the "
        "server's own threads (Linux): on cores that the server, its clients or other replicas "
        "share, their work preempts the step at once instead of waiting for it "
        "(docs/deployment.md); 0: the same priority",
    )
    scheduling_policy: SchedulingPolicy = Field(
        default="fcfs",
        description="order of waiting requests: fcfs, priority (the tenant's quota `priority`, "
        "lower first) or fair (tenants share the engine by their quota `weight`, cache hits "
        "first; docs/fairness.md)",
    )

    # Request limits (gateway/limits.py holds the defaults and the fixed bounds)
    max_n: int = Field(default=_LIMITS.max_n, ge=1, description="largest `n` a request may ask for")
    max_body_bytes: int = Field(
        default=_LIMITS.max_body_bytes, ge=1, description="largest request body; past it: 413"
    )
    max_messages: int = Field(
        default=_LIMITS.max_messages, ge=1, description="messages of one chat request at most"
    )
    max_prompt_chars: int = Field(
        default=_LIMITS.max_prompt_chars,
        ge=1,
        description="characters of a chat request's contents, or of a completions prompt "
        "(token ids: as many), at most",
    )
    body_timeout_s: float = Field(
        default=_LIMITS.body_timeout_s,
        gt=0,
        description="the request line and headers, then the whole body, must each arrive "
        "within this time; past it: 408",
    )
    max_header_bytes: int = Field(
        default=_LIMITS.max_header_bytes,
        ge=1,
        description="request line and headers at most; past it: 431",
    )

    # Tenants, keys and quotas
    redis_url: str | None = Field(
        default=None,
        description="Redis holding tenants, keys, quotas and usage; unset: an in-process store "
        "(one gateway process)",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="the admin API's bearer key; unset: admin API off, and without Redis too, "
        "`/v1/*` needs no key (every request is tenant `default`)",
    )
    redis_failure_mode: Literal["closed", "open"] = Field(
        default="closed",
        description="while Redis is unreachable: closed (503) or open (admit known tenants "
        "with per-process limits)",
    )
    lease_ttl_s: float = Field(
        default=300.0, gt=0, description="a concurrency slot outlives a crashed gateway so long"
    )
    redis_timeout_s: float = Field(
        default=0.5,
        gt=0,
        description="connect and read timeout of one Redis call; a whole operation gets 4x "
        "(retry included)",
    )
    redis_key_prefix: str = Field(
        default="pg",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="prefix of every Redis key, so deployments sharing one Redis stay apart",
    )

    # Engine replicas (docs/deployment.md)
    engine_urls: str | None = Field(
        default=None,
        description="comma-separated URLs of engine replicas (`prefixgate engine`) this gateway "
        "sends requests to; unset: replicas are discovered in Redis when `discovery` is on, "
        "else the engine runs in this process",
    )
    discovery: bool = Field(
        default=False,
        description="`serve`: route to the engine replicas registered in Redis (`redis_url`); "
        "`engine`: register this replica there (heartbeat, load, KV events)",
    )
    routing: Literal["prefix", "least-loaded", "round-robin"] = Field(
        default="prefix",
        description="how a gateway picks a replica: prefix (most cached blocks of the "
        "request, tempered by load), least-loaded, or round-robin",
    )
    routing_load_weight: float = Field(
        default=2.0,
        ge=0,
        description="prefix routing: score = cached fraction of the prompt - weight x "
        "max(0, load - mean load) / (mean load + 4), load = the replica's running + waiting "
        "requests (docs/deployment.md)",
    )
    engine_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="deadline of a control call to a replica (stats, abort, pin); connecting "
        "gets at most 2 s of it",
    )
    replica_ttl_s: float = Field(
        default=5.0,
        gt=0,
        description="a replica that has not answered or heartbeated for this long leaves "
        "rotation and its streams end with an error",
    )
    replica_id: str | None = Field(
        default=None, description="`engine`: this replica's name; unset: host name and port"
    )
    advertise_url: str | None = Field(
        default=None,
        description="`engine`: the URL gateways reach this replica at; unset: "
        "http://<host name>:<port>",
    )

    def model_name(self) -> str:
        """The name clients pass as `model`."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return BUNDLED_MODEL_NAME
        return Path(self.model.rstrip("/")).name or self.model

    _empty_is_unset = field_validator(
        "redis_url", "admin_key", "engine_urls", "replica_id", "advertise_url", mode="before"
    )(none_if_empty)

    @field_validator("redis_failure_mode", "scheduling_policy", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def anonymous(self) -> bool:
        """Embedded mode (no Redis) without an admin key: `/v1/*` needs no API key and every
        request is tenant `default`."""
        return not self.redis_url and self.admin_key is None

    def admin_key_value(self) -> str | None:
        return _secret(self.admin_key)

    def engine_url_list(self) -> list[str]:
        return [u.strip() for u in (self.engine_urls or "").split(",") if u.strip()]

    @property
    def remote_engines(self) -> bool:
        """The gateway drives engine replicas (`prefixgate engine`) instead of its own."""
        return bool(self.engine_url_list()) or self.discovery

    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_n=self.max_n,
            max_messages=self.max_messages,
            max_prompt_chars=self.max_prompt_chars,
            max_body_bytes=self.max_body_bytes,
            body_timeout_s=self.body_timeout_s,
            max_header_bytes=self.max_header_bytes,
        )

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
        return self.apply(
            EngineConfig(
                model=self.model,
                dtype=self.dtype,
                device=self.device,
                attention_backend=self.attention_backend,
                seed=self.seed,
                compute_nice=self.compute_nice,
                cache=CacheConfig(
                    block_size=self.block_size,
                    num_blocks=self.num_blocks,
                    kv_cache_gib=self.kv_cache_gib,
                    enable_prefix_caching=self.prefix_caching,
                ),
                scheduler=SchedulerConfig(
                    max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_batched_tokens,
                    long_prefill_tokens=self.long_prefill_tokens,
                    max_model_len=self.max_model_len,
                    max_waiting=self.max_queue,
                    policy=self.scheduling_policy,
                ),
            )
        )


class AdminClientSettings(BaseSettings):
    """What `prefixgate admin` (a client of a running gateway) reads from the environment."""

    model_config = ENV_CONFIG

    url: str = Field(default=DEFAULT_URL, description="base URL of the gateway to call")
    admin_key: SecretStr | None = Field(
        default=None, description="the admin key the gateway was started with"
    )

    _empty_is_unset = field_validator("admin_key", mode="before")(none_if_empty)

    def admin_key_value(self) -> str | None:
        return _secret(self.admin_key)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def markdown() -> str:
    """The tables of docs/configuration.md: every variable, its `serve` flag, default, meaning."""
    from gateway.cli import build_parser  # the CLI imports this module

    flags = _serve_flags(build_parser())
    serve = [name for name in Settings.model_fields if name not in EngineEnv.model_fields]
    serve_table = _table(Settings, serve, lambda name: flags.get(name, ""))
    engine_table = _table(Settings, list(EngineEnv.model_fields), lambda name: "")
    admin = list(AdminClientSettings.model_fields)
    admin_table = _table(AdminClientSettings, admin, lambda name: f"`--{name.replace('_', '-')}`")
    return (
        "# Configuration\n\n"
        "<!-- Generated by `python -m gateway.settings --markdown` from gateway/settings.py and\n"
        "     engine/env.py; tests/gateway/test_settings.py fails when this file is out of date. "
        "-->\n\n"
        "`prefixgate serve` reads these environment variables; a flag overrides its variable, "
        "which overrides the default (a variable without a flag is set in the environment only). "
        "An empty variable counts as unset. An invalid value stops the "
        "server at startup with an error that names the setting.\n\n"
        f"{serve_table}\n"
        "## Engine\n\n"
        "`prefixgate serve` and offline `LLM(...)` (`from engine import LLM`) both read these "
        "(`engine.env.EngineEnv`):\n\n"
        f"{engine_table}\n"
        "## `prefixgate admin`\n\n"
        "The admin command line (a client of a running gateway) reads these:\n\n"
        f"{admin_table}"
    )


def _serve_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Settings field -> its `prefixgate serve` flag(s), from the parser itself."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return {
        action.dest: ", ".join(f"`{flag}`" for flag in action.option_strings)
        for action in serve._actions
        if action.option_strings and action.dest in Settings.model_fields
    }


def _table(cls: type[BaseSettings], names: list[str], flag: Any) -> str:
    rows = ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
    for name in names:
        field = cls.model_fields[name]
        variable = f"`PREFIXGATE_{name.upper()}`"
        rows.append(
            f"| {variable} | {flag(name)} | {_default(field.default)} | {field.description} |"
        )
    return "\n".join(rows) + "\n"


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.settings")
    parser.add_argument("--markdown", action="store_true", help="print docs/configuration.md")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
