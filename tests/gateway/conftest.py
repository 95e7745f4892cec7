"""Fixtures: the fake engine, an app around it, an httpx ASGI client, a real uvicorn server;
for the tenant tests, Redis DB 12 under a key prefix of the test's own, and apps over it
(`make_gateway`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.replicas.service import replica_server_config
from gateway.server import uvicorn_config
from gateway.settings import Settings
from gateway.state import GatewayState
from tenants.config import build_service
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.tenancy.helpers import ADMIN_KEY, REDIS_URL, Gateway
from tests.tenants.conftest import unique_prefix

MODEL = "fake-model"


def make_settings(**overrides: Any) -> Settings:
    overrides.setdefault("access_log", False)
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def spy_aborts(engine: Any) -> Any:
    """Record the ids passed to `engine.abort` in `engine.aborted` (the fake does it itself)."""
    engine.aborted = []
    abort = engine.abort

    def recording_abort(request_id: str) -> None:
        engine.aborted.append(request_id)
        abort(request_id)

    engine.abort = recording_abort
    return engine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("gateway") / "tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: str) -> Iterator[Any]:
    """The real `AsyncEngine` over a tiny random Llama (real SmolLM2 tokenizer), shared."""
    from engine.async_engine import AsyncEngine
    from engine.config import CacheConfig, EngineConfig

    config = EngineConfig(model=tiny_model_dir, dtype="float32", cache=CacheConfig(num_blocks=512))
    engine = spy_aborts(AsyncEngine.from_config(config))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def app(engine: FakeEngine) -> Starlette:
    return create_app(make_settings(), engine)


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@contextmanager
def running_server(app: Starlette) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    state: GatewayState | None = getattr(app.state, "gateway", None)  # None: an engine replica
    options: dict[str, Any] = {"log_level": "warning", "lifespan": "on"}
    if state is None:  # as `prefixgate engine` serves it
        config = replica_server_config(app, **options)
    else:
        config = uvicorn_config(app, state.limits, access_log=False, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def serve() -> Callable[[Starlette], Any]:
    return running_server


def wait_until(predicate: Callable[[], bool]) -> bool:
    """Poll until `predicate()` holds. No deadline of its own: a busy machine only makes it
    wait longer, and a test whose condition never comes fails on pytest's timeout."""
    while not predicate():
        time.sleep(0.01)
    return True


@pytest.fixture
def redis_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Redis DB 12, with `PREFIXGATE_REDIS_KEY_PREFIX` set to a prefix of this test's own, so
    every app the test builds keeps its keys apart from other test runs sharing the Redis (no
    FLUSHDB); those keys are deleted afterwards."""
    prefix = unique_prefix()
    monkeypatch.setenv("PREFIXGATE_REDIS_KEY_PREFIX", prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"Redis is not reachable at {REDIS_URL} (start it with `make redis`): {exc}")
    yield REDIS_URL
    names = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if names:
        client.delete(*names)
    client.close()


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(redis_url: str) -> AsyncIterator[MakeGateway]:
    """`await make_gateway(engine=None, clock=None, **settings)`: an app over Redis with the
    admin key set, its lifespan running (tenant service started), and an httpx client on it.
    With a `clock`, the tenant service (quota windows, leases, the store's breaker) runs on it."""
    async with AsyncExitStack() as stack:

        async def make(
            engine: Any = None, clock: Callable[[], float] | None = None, **overrides: Any
        ) -> Gateway:
            # a loaded 2-core machine can take longer than the default 0.5 s for one round trip;
            # tests that exercise the deadline itself pass their own redis_timeout_s
            defaults = {"redis_url": redis_url, "admin_key": ADMIN_KEY, "redis_timeout_s": 5.0}
            overrides = defaults | overrides
            engine = engine if engine is not None else FakeEngine()
            settings = make_settings(**overrides)
            tenants = None
            if clock is not None:
                tenants = build_service(settings.tenants_config(), clock=clock)
                await tenants.start()
                stack.push_async_callback(tenants.aclose)
            app = create_app(settings, engine, tenants=tenants)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://gateway")
            await stack.enter_async_context(client)
            return Gateway(app, client, engine)

        yield make
