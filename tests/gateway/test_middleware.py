"""Access log, request ids, error middleware, body limit."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from gateway.app import create_app
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.middleware import (
    AccessLogMiddleware,
    BodyLimitMiddleware,
    ErrorMiddleware,
    log_fields,
)
from tests.gateway.conftest import make_settings
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.openai.test_routes import chat_body


async def test_access_log_is_one_json_line(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(access_log=True), engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with caplog.at_level(logging.INFO, logger="prefixgate.access"):
            r = await client.post(
                "/v1/chat/completions",
                json=chat_body(max_tokens=3),
                headers={"x-request-id": "req-42"},
            )
    assert r.headers["x-request-id"] == "req-42"
    [record] = [r for r in caplog.records if r.name == "prefixgate.access"]
    line = json.loads(record.getMessage())
    assert line["request_id"] == "req-42"
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert line["route"] == "/v1/chat/completions"
    assert line["status"] == 200 and line["tenant"] == "default"
    assert line["completion_id"].startswith("chatcmpl-")
    assert (line["completion_tokens"], line["outcome"]) == (3, "finished")
    assert line["duration_ms"] >= 0 and line["ttft_ms"] >= 0


async def test_access_log_of_an_engine_refusal_says_rejected(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A request the engine refuses is settled (one request, no tokens): its line says so, as
    every settled request's does (bench/soak.py reconciles Redis's counters with these lines)."""
    engine.max_active = 0
    app = create_app(make_settings(access_log=True), engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with caplog.at_level(logging.INFO, logger="prefixgate.access"):
            r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    assert r.status_code == 503
    [record] = [r for r in caplog.records if r.name == "prefixgate.access"]
    line = json.loads(record.getMessage())
    assert line["status"] == 503 and line["outcome"] == "rejected"
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_tokens"]) == (0, 0, 0)


async def test_unsafe_client_request_id_is_replaced(client: httpx.AsyncClient) -> None:
    r = await client.get("/health", headers={"x-request-id": "bad id\twith spaces"})
    rid = r.headers["x-request-id"]
    assert rid != "bad id\twith spaces" and len(rid) == 32
    r2 = await client.get("/health")
    assert r2.headers["x-request-id"] != rid


async def _collect(app, scope: Scope, body_chunks: list[bytes]) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
        for i, c in enumerate(body_chunks)
    ]
    sent: list[dict] = []  # type: ignore[type-arg]

    async def receive():  # type: ignore[no-untyped-def]
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def _scope(headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {"type": "http", "method": "POST", "path": "/x", "headers": headers or []}


async def _read_all(scope: Scope, receive: Receive, send: Send) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_body_limit_by_content_length_does_not_call_the_app() -> None:
    called = False

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal called
        called = True

    mw = BodyLimitMiddleware(app, max_bytes=10, timeout_s=30)
    status, body = await _collect(mw, _scope([(b"content-length", b"11")]), [b"x" * 11])
    assert (status, called) == (413, False)
    assert json.loads(body)["error"]["code"] == "request_too_large"


async def test_body_limit_counts_chunks() -> None:
    mw = ErrorMiddleware(BodyLimitMiddleware(_read_all, max_bytes=10, timeout_s=30))
    assert (await _collect(mw, _scope(), [b"x" * 6, b"x" * 4]))[0] == 200
    assert (await _collect(mw, _scope(), [b"x" * 6, b"x" * 5]))[0] == 413


async def test_error_middleware_shapes_api_errors_and_bugs() -> None:
    async def refuses(scope: Scope, receive: Receive, send: Send) -> None:
        raise APIError(429, "slow down", code="rate_limit_exceeded", headers={"retry-after": "3"})

    async def buggy(scope: Scope, receive: Receive, send: Send) -> None:
        raise KeyError("oops")

    status, body = await _collect(ErrorMiddleware(refuses), _scope(), [b""])
    assert status == 429 and json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    status, body = await _collect(ErrorMiddleware(buggy), _scope(), [b""])
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"


async def test_access_log_middleware_counts_requests(caplog: pytest.LogCaptureFixture) -> None:
    metrics = GatewayMetrics(lambda: None)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        log_fields(scope)["model"] = "m"
        await _read_all(scope, receive, send)

    mw = AccessLogMiddleware(app, metrics)
    with caplog.at_level(logging.INFO, logger="prefixgate.access"):
        await _collect(mw, {**_scope(), "client": ("1.2.3.4", 5)}, [b""])
    line = json.loads(caplog.records[-1].getMessage())
    assert (line["model"], line["client"], line["route"]) == ("m", "1.2.3.4:5", "unmatched")
    sample = metrics.registry.get_sample_value(
        "prefixgate_http_requests_total",
        {"route": "unmatched", "method": "POST", "status": "200", "tenant": "default"},
    )
    assert sample == 1.0
