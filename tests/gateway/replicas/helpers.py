"""An engine served as a replica (`engine.service.app`) in this process, a gateway over it
through the remote client, and `prefixgate serve` / `prefixgate engine` as processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from engine.service.app import create_engine_app
from gateway.app import create_app
from gateway.replicas import replicas_loader
from tests.gateway.conftest import make_settings, running_server, wait_until


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serve_replica(engine: Any, replica_id: str = "replica-0") -> Iterator[str]:
    """`engine` behind the replica API on a loopback port; yields its URL."""
    with running_server(create_engine_app(engine, replica_id=replica_id)) as url:
        yield url


@contextmanager
def serve_gateway(engine_urls: list[str], model: str, **settings: Any) -> Iterator[str]:
    """A gateway (uvicorn, loopback) over replicas at `engine_urls`; yields its URL once ready."""
    settings = make_settings(served_model_name=model, engine_urls=",".join(engine_urls), **settings)
    app = create_app(settings, engine_loader=replicas_loader(settings))
    with running_server(app) as url:
        assert wait_until(lambda: is_ready(url))
        yield url


@contextmanager
def serve_remote(engine: Any) -> Iterator[str]:
    """A gateway whose engine is `engine` served as a replica; yields the gateway's URL."""
    with serve_replica(engine) as replica, serve_gateway([replica], engine.model_name) as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CliProcess:
    """`prefixgate <command>` in a process of its own, its stderr kept line by line."""

    def __init__(self, command: str, args: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", command, *args, "--port", str(self.port)],
            env=os.environ | {"OMP_NUM_THREADS": "1"} | env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            sys.stderr.write(line)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def stop(self) -> None:
        """SIGTERM (a drain, of nothing if idle), SIGKILL if it has not exited 30 s later."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


@contextmanager
def cli_process(command: str, args: list[str], env: dict[str, str]) -> Iterator[CliProcess]:
    """Start `prefixgate <command> args` (`--port` added) and yield it once `/ready` answers;
    stopped at exit if still running."""
    process = CliProcess(command, args, env)
    try:
        assert wait_until(lambda: process.proc.poll() is not None or is_ready(process.url))
        assert process.proc.poll() is None, "the process exited"
        yield process
    finally:
        process.stop()
