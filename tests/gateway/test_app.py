"""The factory's lifespan: embedded engine loading, readiness, shutdown."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from engine.config import EngineConfig
from gateway.app import create_app
from tests.gateway.conftest import make_settings, running_server
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.openai.test_routes import chat_body


def test_ready_only_once_the_engine_is_loaded() -> None:
    release = threading.Event()
    engines: list[FakeEngine] = []
    configs: list[EngineConfig] = []

    def loader(config: EngineConfig) -> FakeEngine:
        configs.append(config)
        assert release.wait(10)
        engines.append(FakeEngine())
        return engines[-1]

    ready_calls: list[bool] = []
    settings = make_settings(served_model_name="fake-model", num_blocks=77)
    app = create_app(
        settings, engine_loader=loader, on_engine_ready=lambda: ready_calls.append(True)
    )
    with (
        running_server(app) as url,
        httpx.Client(base_url=url) as http,
    ):
        assert http.get("/health").status_code == 200
        r = http.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = http.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"
        assert r.headers["retry-after"] == "1"
        assert http.get("/v1/models").json()["data"][0]["id"] == "fake-model"
        assert not ready_calls
        release.set()
        for _ in range(500):
            if http.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.01)
        assert http.get("/ready").json() == {
            "status": "ready",
            "model": "fake-model",
            "detail": None,
        }
        assert engines[0].started
        assert ready_calls == [True]  # before /ready said so, once
        assert configs[0].cache.num_blocks == 77
        assert http.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
    assert not engines[0].started  # the app owned it: shut down with the server


def ready_after_failure(http: httpx.Client, errors: list[BaseException]) -> Any:
    """`/ready`'s body once the load has failed (`on_engine_error` was called)."""
    for _ in range(500):
        if errors:
            break
        threading.Event().wait(0.01)
    r = http.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    return r.json()


def test_engine_that_fails_to_load() -> None:
    errors: list[BaseException] = []

    def loader(config: EngineConfig) -> Any:
        raise RuntimeError("no such model")

    ready_calls: list[bool] = []
    app = create_app(
        make_settings(),
        engine_loader=loader,
        on_engine_error=errors.append,
        on_engine_ready=lambda: ready_calls.append(True),
    )
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        assert "no such model" in ready_after_failure(http, errors)["detail"]
        assert not ready_calls
        r = http.post("/v1/chat/completions", json=chat_body(model="smollm2"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"


def test_a_failing_ready_hook_fails_the_load_and_stops_the_engine() -> None:
    engines: list[FakeEngine] = []
    errors: list[BaseException] = []

    def loader(config: EngineConfig) -> FakeEngine:
        engines.append(FakeEngine())
        return engines[-1]

    def on_ready() -> None:
        assert engines[0].started  # called once the engine runs
        raise RuntimeError("hook broke")

    app = create_app(
        make_settings(), engine_loader=loader, on_engine_error=errors.append,
        on_engine_ready=on_ready,
    )  # fmt: skip
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        assert "hook broke" in ready_after_failure(http, errors)["detail"]
    assert not engines[0].started


def test_injected_engine_is_left_to_its_owner() -> None:
    engine = FakeEngine()
    engine.start()
    with running_server(create_app(make_settings(), engine)):
        pass
    assert engine.started
