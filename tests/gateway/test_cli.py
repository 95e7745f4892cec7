"""`prefixgate serve` flags and their precedence over the environment."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import weakref

import httpx
import pytest

from gateway.cli import build_parser, freeze_gc_heap, main, settings_from_args


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return settings_from_args(build_parser().parse_args(argv))


def test_serve_flags() -> None:
    s = parse(
        "serve", "--model", "/m/tiny", "--host", "0.0.0.0", "--port", "8123", "--dtype",
        "float32", "--num-blocks", "64", "--block-size", "32", "--max-num-seqs", "8",
        "--max-batched-tokens", "512", "--no-access-log",
    )  # fmt: skip
    assert (s.model, s.host, s.port, s.dtype) == ("/m/tiny", "0.0.0.0", 8123, "float32")
    assert s.device == "auto" and s.attention_backend == "auto"
    assert parse("serve", "--attention-backend", "torch").attention_backend == "torch"
    assert (s.num_blocks, s.block_size, s.max_num_seqs, s.max_batched_tokens) == (64, 32, 8, 512)
    assert s.access_log is False and s.model_name() == "tiny"
    assert parse("engine", "--compute-nice", "0").engine_config().compute_nice == 0


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIXGATE_PORT", "9000")
    monkeypatch.setenv("PREFIXGATE_NUM_BLOCKS", "99")
    monkeypatch.setenv("PREFIXGATE_DTYPE", "bfloat16")
    s = parse("serve", "--port", "9001", "--kv-cache-gib", "0.5")
    assert (s.port, s.dtype, s.kv_cache_gib, s.num_blocks) == (9001, "bfloat16", 0.5, None)
    assert parse("serve").num_blocks == 99


def test_cache_size_flags_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--num-blocks", "4", "--kv-cache-gib", "1"])
    assert "not allowed with" in capsys.readouterr().err


def test_invalid_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])


class _Node:
    """A reference cycle only the cyclic GC frees."""

    def __init__(self) -> None:
        self.me = self


def test_freeze_gc_heap_freezes_what_is_alive_and_still_collects_new_garbage() -> None:
    before = _Node()
    try:
        freeze_gc_heap()
        assert gc.get_freeze_count() > 0
        frozen = weakref.ref(before)
        del before
        gc.collect()
        assert frozen() is not None  # frozen: the collector no longer looks at it
        later = _Node()
        ref = weakref.ref(later)
        del later
        gc.collect()
        assert ref() is None  # created after the freeze: collected as usual
    finally:
        gc.unfreeze()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_end_to_end(tiny_model_dir: str) -> None:
    """`prefixgate serve` in a subprocess: JSON logs, /ready, a completion, clean Ctrl-C."""
    port = _free_port()
    env = {**os.environ, "PREFIXGATE_PORT": str(port)}
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--model", tiny_model_dir,
           "--dtype", "float32", "--num-blocks", "64", "--max-num-seqs", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        status = None
        while status != 200:  # while it loads; a server that died fails below
            time.sleep(0.2)
            try:
                status = httpx.get(f"{base}/ready").status_code
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3}
        r = httpx.post(f"{base}/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    access = [x for x in lines if x.get("event") == "access" and x["path"] == "/v1/completions"]
    assert access[0]["status"] == 200 and access[0]["completion_tokens"] == 3
    assert any(x.get("event") == "engine_ready" for x in lines)
    [tenancy] = [x for x in lines if x.get("event") == "tenants"]
    assert (tenancy["store"], tenancy["anonymous"], tenancy["admin_api"]) == ("memory", True, False)
