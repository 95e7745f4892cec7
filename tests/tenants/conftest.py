"""Fixtures: a fake clock, both stores (Redis DB 13, under a key prefix of each test's own, so
that test runs sharing one Redis never touch each other's keys), a private redis-server."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tenants import MemoryStore, RedisStore, Store, TenantService
from tenants.periods import UTC

REDIS_URL = os.environ.get("PREFIXGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
START = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC).timestamp()
NOW = datetime.fromtimestamp(START, tz=UTC)


class FakeClock:
    """Epoch seconds that move only when told."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, when: datetime) -> None:
        self.now = when.timestamp()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


_PREFIXES = itertools.count()


def unique_prefix() -> str:
    """A Redis key prefix for one test alone. Test runs sharing a Redis (two sessions, or a
    session and CI) never see, count or delete each other's keys: no FLUSHDB anywhere."""
    return f"pgtest-{os.getpid()}-{next(_PREFIXES)}"


async def drop_keys(store: RedisStore) -> None:
    """Delete every key under the store's prefix."""
    names = [n async for n in store.client.scan_iter(match=f"{store.keys.prefix}:*", count=1000)]
    if names:
        await store.client.delete(*names)


async def fresh_redis_store(url: str = REDIS_URL, **options: float) -> RedisStore:
    """A `RedisStore` under a new key prefix (so: empty), Redis checked reachable."""
    store = RedisStore.from_url(url, prefix=unique_prefix(), **options)  # type: ignore[arg-type]
    try:
        await store.ping()
    except Exception as exc:
        await store.aclose()
        pytest.fail(f"Redis is not reachable at {url} (start it with `make redis`): {exc}")
    return store


async def close_redis_store(store: RedisStore) -> None:
    await drop_keys(store)
    await store.aclose()


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    store = await fresh_redis_store()
    yield store
    await close_redis_store(store)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each contract test runs once per store."""
    if request.param == "memory":
        yield MemoryStore()
        return
    redis = await fresh_redis_store()
    yield redis
    await close_redis_store(redis)


@pytest.fixture
async def service(store: Store, clock: FakeClock) -> AsyncIterator[TenantService]:
    svc = TenantService(store, clock=clock, lease_ttl_s=60)
    yield svc
    await svc.guard.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a spare port, to kill, pause and restart mid-test.
    Its append-only file (fsync always) lives in `data_dir`, so a restart keeps the data."""

    def __init__(self, data_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        while self.proc.poll() is None:  # until it answers, or fails to start
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        pytest.fail(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: connections are refused until `start`."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections hang, as with a stalled server or a network partition."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None:
        server.resume()
    server.kill()
