"""`prefixgate` command line: `prefixgate serve` (embedded gateway + engine, one process) and
`prefixgate admin ...` (the admin REST API of a running gateway, see `gateway/admin/cli.py`).

Flags of `serve` override `PREFIXGATE_*` environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import ValidationError

from engine.config import SchedulingPolicy
from gateway.admin.cli import add_admin_parser, run_admin
from gateway.app import create_app, error_response
from gateway.drain import GATEWAY_ANSWERED, Drain, draining_server
from gateway.errors import shutting_down
from gateway.logs import configure_logging
from gateway.server import uvicorn_config
from gateway.settings import Settings

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixgate", description="Multi-tenant LLM serving with an OpenAI-compatible API."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI-compatible API (gateway and engine in one process)",
        description="Serve the OpenAI-compatible API. Every flag can also be set with the "
        "environment variable PREFIXGATE_<FLAG> (e.g. PREFIXGATE_PORT=9000).",
    )
    _add_engine_flags(serve)
    add = serve.add_argument
    add("--engine-urls", help="comma-separated engine replica URLs (default: engine in process)")
    add("--discovery", action="store_true", default=None,
        help="route to the engine replicas registered in Redis (PREFIXGATE_REDIS_URL)")  # fmt: skip
    add("--routing", choices=("prefix", "least-loaded", "round-robin"),
        help="how to pick a replica (default prefix)")  # fmt: skip
    add("--no-access-log", dest="access_log", action="store_false", default=None)
    engine = commands.add_parser(
        "engine",
        help="serve one engine replica for `serve` gateways (docs/deployment.md)",
        description="Run one engine replica with an internal API for gateways started with "
        "--engine-urls or --discovery. Reads the same PREFIXGATE_* variables as serve.",
    )
    _add_engine_flags(engine)
    engine.add_argument("--discovery", action="store_true", default=None,
                        help="register in Redis (heartbeat, load, KV events)")  # fmt: skip
    engine.add_argument("--replica-id", help="this replica's name (default host:port)")
    engine.add_argument("--advertise-url", help="URL gateways reach it at")
    add_admin_parser(commands)
    return parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Flags `serve` and `engine` share: server, model, engine, logging."""
    add = parser.add_argument
    add("--model", help="Hugging Face model dir or GGUF file (default: bundled SmolLM2-135M)")
    add("--served-model-name", help="name clients pass as `model` (default: smollm2 / dir name)")
    add("--host", help="bind address (default 127.0.0.1)")
    add("--port", type=int, help="port (default 8000)")
    add("--dtype", choices=DTYPES, help="weights and KV cache dtype (default auto)")
    add("--device", help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1")
    add(
        "--attention-backend",
        choices=("auto", "cpu", "torch", "triton"),
        help="attention kernels (default auto: triton on CUDA, the C++/SDPA path on CPU)",
    )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--kv-cache-gib", type=float, help="KV cache size in GiB (default 1)")
    cache.add_argument("--num-blocks", type=int, help="KV cache size in blocks")
    add("--block-size", type=int, help="tokens per KV block (default 16)")
    add("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
        help="compute every prompt in full (no shared KV blocks, no pins)")  # fmt: skip
    add("--max-num-seqs", type=int, help="running sequences at most (default 64)")
    add("--max-batched-tokens", type=int, help="tokens per engine step (default 2048)")
    add(
        "--long-prefill-tokens",
        type=int,
        help="while requests wait, tokens per step of the prompts being computed (default 0: none)",
    )
    add("--max-model-len", type=int, help="context length (default: the model's)")
    add("--max-queue", type=int, help="waiting requests before 503 (default 1024)")
    add(
        "--scheduling-policy",
        choices=get_args(SchedulingPolicy),
        help="fcfs (default), priority (tenant quota `priority`) or fair (tenant quota `weight`)",
    )
    add("--compute-nice", type=int, help="nice increment of the engine's step threads (default 5)")
    add("--max-n", type=int, help="largest `n` accepted (default 16)")
    add("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    add("--drain-timeout-s", type=float,
        help="on SIGTERM, seconds in-flight requests get to finish (default 30)")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment + flags (flags win). `--kv-cache-gib` clears a `PREFIXGATE_NUM_BLOCKS`."""
    overrides: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }
    if args.kv_cache_gib is not None:
        overrides["num_blocks"] = None
    return Settings(**overrides)


def freeze_gc_heap() -> None:
    """Move every object alive once the model is loaded (torch, transformers, the model's
    modules: ~370k objects) out of the cyclic GC's reach. A full collection over them holds the
    GIL for ~200 ms, stalling the engine thread and so every stream's next token; after the
    freeze one takes well under a millisecond. Objects created later are collected as usual."""
    gc.collect()
    gc.freeze()


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level)
    failed = False

    def on_engine_error(exc: BaseException) -> None:
        nonlocal failed
        failed = True
        server.should_exit = True

    extra: dict[str, Any] = {}
    if settings.remote_engines:
        from gateway.replicas import replicas_loader

        extra["engine_loader"] = replicas_loader(settings)
    app = create_app(
        settings, on_engine_error=on_engine_error, on_engine_ready=freeze_gc_heap, **extra
    )
    config = uvicorn_config(
        app,
        settings.request_limits(),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # ours is structured: gateway.middleware.AccessLogMiddleware
        log_level=settings.log_level,
    )
    refuse = error_response(shutting_down())
    server = draining_server(
        config, Drain(settings.drain_timeout_s), refuse, GATEWAY_ANSWERED.__contains__
    )
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C cuts the drain short
        server.run()
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        return run_admin(args)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"prefixgate: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    if args.command == "engine":
        from gateway.replicas.service import serve_engine

        return serve_engine(settings)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
