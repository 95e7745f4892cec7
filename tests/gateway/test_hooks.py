"""The admission / settlement seam the tenants phase plugs into: settle runs exactly once."""

from __future__ import annotations

from collections.abc import Mapping

import httpx
import pytest

from gateway.app import create_app
from gateway.errors import APIError
from gateway.hooks import GenerationHooks, GenerationInfo, Outcome, UsageCounts
from gateway.tenancy.auth import PRINCIPAL_SCOPE_KEY, Principal
from tests.gateway.conftest import make_settings, running_server, wait_until
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.openai.test_routes import chat_body, sse_events


class RecordingHooks(GenerationHooks):
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.admitted: list[GenerationInfo] = []
        self.settled: list[tuple[str, UsageCounts, Outcome]] = []

    async def admit(self, info: GenerationInfo) -> Mapping[str, str]:
        if self.refuse:
            raise APIError(429, "Rate limit reached for requests per minute.",
                           code="rate_limit_exceeded", headers={"retry-after": "7"})  # fmt: skip
        self.admitted.append(info)
        return {"x-ratelimit-remaining-requests": "41"}

    async def settle(self, info: GenerationInfo, usage: UsageCounts, outcome: Outcome) -> None:
        self.settled.append((info.request_id, usage, outcome))


class TenantAuth:
    """Stands in for the tenants phase's API-key middleware."""

    def __init__(self, app):  # type: ignore[no-untyped-def]
        self.app = app

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        scope[PRINCIPAL_SCOPE_KEY] = Principal("acme", namespace="ns-acme", priority=2)
        await self.app(scope, receive, send)


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


async def _client(engine: FakeEngine, hooks: RecordingHooks) -> httpx.AsyncClient:
    app = create_app(make_settings(), engine, hooks=hooks, auth_middleware=TenantAuth)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.mark.parametrize("stream", [False, True])
async def test_finished_request_is_settled_once_with_real_usage(
    engine: FakeEngine, hooks: RecordingHooks, stream: bool
) -> None:
    async with await _client(engine, hooks) as client:
        r = await client.post(
            "/v1/chat/completions", json=chat_body(n=2, max_tokens=5, stream=stream)
        )
    assert r.headers["x-ratelimit-remaining-requests"] == "41"
    [info] = hooks.admitted
    assert (info.principal.tenant, info.route, info.max_completion_tokens) == ("acme", "chat", 10)
    [(request_id, usage, outcome)] = hooks.settled
    assert request_id == info.request_id and outcome == "finished"
    assert usage.completion_tokens == 10 and usage.prompt_tokens == info.prompt_tokens
    # The principal reaches the engine: tenant and cache namespace.
    assert engine.requests[0][3:] == ("acme", "ns-acme")


async def test_refused_admission_never_reaches_the_engine(engine: FakeEngine) -> None:
    hooks = RecordingHooks(refuse=True)
    async with await _client(engine, hooks) as client:
        r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert engine.requests == [] and hooks.settled == []


async def test_engine_refusal_is_settled_as_rejected(
    engine: FakeEngine, hooks: RecordingHooks
) -> None:
    engine.max_active = 0
    async with await _client(engine, hooks) as client:
        r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503
    assert [(u, o) for _, u, o in hooks.settled] == [(UsageCounts(), "rejected")]


async def test_engine_error_is_settled_as_error(engine: FakeEngine, hooks: RecordingHooks) -> None:
    engine.fail_after = 2
    async with await _client(engine, hooks) as client:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=9))
    assert sse_events(r.text)[-2]["error"]["code"] == "engine_dead"
    [(_, usage, outcome)] = hooks.settled
    assert outcome == "error" and usage.completion_tokens == 2


def test_disconnect_is_settled_as_disconnected(hooks: RecordingHooks) -> None:
    engine = FakeEngine(token_delay=0.05)
    app = create_app(make_settings(), engine, hooks=hooks)
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        body = chat_body(stream=True, max_tokens=100)
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            next(response.iter_lines())
        assert wait_until(lambda: len(hooks.settled) == 1)
    [(_, usage, outcome)] = hooks.settled
    assert outcome == "disconnected" and usage.completion_tokens < 100
