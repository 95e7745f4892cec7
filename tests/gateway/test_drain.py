"""Graceful drain (`gateway.drain`): the middleware and server in process, then SIGTERM to a
`prefixgate serve` process and to a `prefixgate engine` replica behind a gateway: streams in
flight (queued ones too) finish, new requests get a 503 in OpenAI's shape, exit code 0; and a
stream still open at the deadline is cut, aborted in the engine and settled."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.service import protocol
from gateway.app import create_app, error_response
from gateway.drain import (
    GATEWAY_ANSWERED,
    Drain,
    DrainingServer,
    DrainMiddleware,
    draining_server,
)
from gateway.errors import shutting_down
from gateway.limits import RequestLimits
from gateway.replicas import replicas_loader
from gateway.server import uvicorn_config
from tests.gateway.conftest import make_settings, running_server, wait_until
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.replicas.helpers import (
    CliProcess,
    cli_process,
    free_port,
    serve_gateway,
    serve_replica,
)
from tests.gateway.replicas.test_cluster import sse_events

OPENAI_ERROR = {"message", "type", "param", "code"}
MODEL = "tiny"
STREAMS = 3  # with --max-num-seqs 1: one runs, two wait in the engine's queue
# A replica's drain lasts as long as its streams, ~1.3 ms a token for the tiny model: 3 x 300
# tokens ended it within ~1.2 s, so a gateway probing every 1 s could miss that it drained.
REPLICA_STREAMS = 10
MAX_TOKENS = 300


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def slow_app(release: asyncio.Event) -> Starlette:
    async def slow(request: Request) -> Response:
        await release.wait()
        return JSONResponse({"done": True})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/slow", slow), Route("/health", health)])


async def test_in_flight_requests_finish_new_ones_get_503() -> None:
    release = asyncio.Event()
    drain = Drain(timeout_s=30)
    refuse = error_response(shutting_down())
    app = DrainMiddleware(slow_app(release), drain, refuse, GATEWAY_ANSWERED.__contains__)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        slow = asyncio.create_task(client.get("/slow"))
        while drain.in_flight == 0:
            await asyncio.sleep(0.001)
        drain.start()
        assert not drain.done()
        refused = await client.get("/slow")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert set(refused.json()["error"]) == OPENAI_ERROR
        assert (await client.get("/health")).status_code == 200  # liveness still answers
        release.set()
        assert (await slow).json() == {"done": True}
    assert drain.in_flight == 0 and drain.done()


def test_the_first_signal_drains_until_idle_or_the_deadline() -> None:
    clock = FakeClock()
    drain = Drain(timeout_s=10, clock=clock)
    server = DrainingServer(uvicorn.Config(slow_app(asyncio.Event())), drain)
    drain.in_flight = 1
    server.handle_exit(signal.SIGTERM, None)
    assert drain.draining and not server.should_exit
    asyncio.run(server.on_tick(1))
    assert not server.should_exit  # one request still in flight
    clock.now = 10.0
    asyncio.run(server.on_tick(2))
    assert server.should_exit  # the deadline passed
    drain = Drain(timeout_s=10, clock=clock)
    server = DrainingServer(uvicorn.Config(slow_app(asyncio.Event())), drain)
    drain.in_flight = 1
    server.handle_exit(signal.SIGINT, None)
    server.handle_exit(signal.SIGTERM, None)  # a second signal: stop now
    assert server.should_exit


# ---- real processes -------------------------------------------------------------------------


def stream_chat(url: str, results: list[Any], started: threading.Event) -> None:
    """One streamed chat completion; appends its SSE events (or the exception) to results."""
    question = [{"role": "user", "content": "Tell me everything."}]
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "messages": question}  # fmt: skip
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            started.set()
            results.append(sse_events("\n\n".join(line for line in r.iter_lines() if line)))
    except Exception as exc:
        started.set()
        results.append(exc)


def start_streams(url: str, count: int = STREAMS) -> tuple[list[Any], list[threading.Thread]]:
    """`count` streams sent at once (one after another, each waiting for its 200, gave the first
    time to finish before the last one was sent on a slow machine)."""
    results: list[Any] = []
    threads, started = [], [threading.Event() for _ in range(count)]
    for event in started:
        thread = threading.Thread(target=stream_chat, args=(url, results, event), daemon=True)
        thread.start()
        threads.append(thread)
    assert all(event.wait(timeout=120) for event in started)
    return results, threads


def assert_streams_finished(results: list[Any], threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == len(threads)
    for events in results:
        assert isinstance(events, list), events
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-2]
        chunks = [e for e in events[:-1] if e["choices"]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def terminate(process: CliProcess) -> None:
    """SIGTERM, then wait until the process logs that it drains."""
    process.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: process.logged("draining:") or process.proc.poll() is not None)
    assert process.proc.poll() is None, "exited before the streams finished"


@pytest.fixture
def engine_args(tiny_model_dir: str) -> list[str]:
    return ["--model", tiny_model_dir, "--served-model-name", MODEL, "--dtype", "float32",
            "--num-blocks", "128", "--max-num-seqs", "1"]  # fmt: skip


ENV = {"PREFIXGATE_DRAIN_TIMEOUT_S": "120", "PREFIXGATE_LOG_LEVEL": "warning"}


def test_sigterm_drains_the_gateway(engine_args: list[str]) -> None:
    env = ENV | {"PREFIXGATE_REDIS_URL": "", "PREFIXGATE_ADMIN_KEY": ""}
    with cli_process("serve", engine_args, env) as gateway:
        results, threads = start_streams(gateway.url)
        terminate(gateway)
        refused = httpx.get(f"{gateway.url}/v1/models", timeout=30)
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert set(refused.json()["error"]) == OPENAI_ERROR
        assert_streams_finished(results, threads)
        assert gateway.proc.wait(timeout=60) == 0


@pytest.fixture
def replica(engine_args: list[str]) -> Iterator[CliProcess]:
    with cli_process("engine", engine_args, ENV | {"PREFIXGATE_REDIS_URL": ""}) as process:
        yield process


def all_in_engine(replica_url: str, results: list[Any]) -> bool:
    """Whether every stream was seen running or waiting in the replica's engine at once. Polled
    on one connection, 20 ms apart: a client (and its TLS context) per call every 10 ms took
    most of a core from the processes under test. A stream that failed fails the test; all of
    them finished before they were seen together returns False rather than waiting forever."""
    with httpx.Client(timeout=30) as client:
        while True:
            assert not [r for r in results if isinstance(r, Exception)], results
            stats = client.get(f"{replica_url}{protocol.STATS}").json()
            if int(stats["num_running"]) + int(stats["num_waiting"]) == REPLICA_STREAMS:
                return True
            if len(results) == REPLICA_STREAMS:
                return False
            time.sleep(0.02)


@contextmanager
def gateway_app(engine_urls: list[str]) -> Iterator[tuple[str, Any]]:
    """(URL, app) of a gateway over the replicas at `engine_urls`, once it has joined them all."""
    settings = make_settings(served_model_name=MODEL, engine_urls=",".join(engine_urls))
    app = create_app(settings, engine_loader=replicas_loader(settings))
    with running_server(app) as url:
        state = app.state.gateway
        assert wait_until(lambda: state.engine is not None)
        assert wait_until(lambda: len(state.engine.replicas) == len(engine_urls))
        yield url, app


def test_sigterm_drains_an_engine_replica(replica: CliProcess, tiny_engine: Any) -> None:
    """Gateway 1 has only the draining replica: 503. Gateway 2 also has another one: once the
    draining replica's stats say so, every new request goes to the other."""
    with ExitStack() as stack:
        url = stack.enter_context(serve_gateway([replica.url], MODEL))
        other = stack.enter_context(serve_replica(tiny_engine, "in-process"))
        url_2, app_2 = stack.enter_context(gateway_app([replica.url, other]))
        results, threads = start_streams(url, REPLICA_STREAMS)
        # The gateway answers 200 before its call to the replica lands: wait for all of them.
        assert all_in_engine(replica.url, results)
        terminate(replica)
        body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "engine_overloaded"
        assert set(refused.json()["error"]) == OPENAI_ERROR
        pool = app_2.state.gateway.engine
        [draining] = [e for e in pool.replicas.values() if e.replica_id != "in-process"]
        assert wait_until(lambda: draining.last_stats.draining)  # its stats say so
        assert [e.replica_id for e in pool.live()] == ["in-process"]
        for _ in range(3):
            r = httpx.post(f"{url_2}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
        assert_streams_finished(results, threads)
        assert replica.proc.wait(timeout=60) == 0


def test_a_stream_past_the_deadline_is_cut_aborted_and_settled() -> None:
    engine = FakeEngine(token_delay=0.05)  # 400 tokens: 20 s, far past the 0.5 s drain
    app = create_app(make_settings(), engine)
    port = free_port()
    config = uvicorn_config(
        app, RequestLimits(), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    refuse = error_response(shutting_down())
    server = draining_server(config, Drain(0.5), refuse, GATEWAY_ANSWERED.__contains__)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started or not thread.is_alive())
    body = {"model": "fake-model", "max_tokens": 400, "stream": True,
            "messages": [{"role": "user", "content": "Go on."}]}  # fmt: skip
    seen = []
    with contextlib.suppress(httpx.HTTPError):  # the connection ends mid-answer
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            for line in response.iter_lines():
                seen.append(line)
                if len(seen) == 1:
                    server.handle_exit(signal.SIGTERM, None)
    thread.join(timeout=60)
    assert not thread.is_alive() and "data: [DONE]" not in seen
    assert len(engine.aborted) == 1  # the engine stopped computing it
    assert app.state.gateway.hooks.in_flight == 0  # its quota was settled
