"""Bad input: OpenAI's error shape with 400 / 404 / 413, never a 500; overload: 503."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.errors import APIError, from_engine_error, from_refusal, from_tenants_error
from tenants import (
    AdmissionDecision,
    AuthenticationError,
    ConflictError,
    InvalidError,
    KeyNotFound,
    Limit,
    StoreUnavailable,
    TenantNotFound,
    TenantsError,
)
from tests.gateway.conftest import MODEL, make_settings
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.openai.test_routes import chat_body, sse_events

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LONG = "word " * 200  # 1000 characters: over the fake engine's 512-token context


def raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


BAD_REQUESTS = [
    # (name, path, body, status, param, code)
    ("malformed json", CHAT, b'{"model": "fake-model", "messages": [', 400, None, "invalid_json"),
    ("empty body", CHAT, b"", 400, None, "invalid_json"),
    ("not an object", CHAT, b"[1, 2]", 400, None, "invalid_json"),
    ("missing model", CHAT, {"messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages", None),
    ("wrong type: n", CHAT, chat_body(n="2"), 400, "n", None),
    ("wrong type: temperature", CHAT, chat_body(temperature="hot"), 400, "temperature", None),
    ("wrong type: stream", CHAT, chat_body(stream="yes"), 400, "stream", None),
    ("wrong type: messages", CHAT, chat_body(messages="hi"), 400, "messages", None),
    ("wrong type: content", CHAT, chat_body(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content", None),
    ("wrong type: prompt", COMPLETIONS, {"model": MODEL, "prompt": 5}, 400, "prompt", None),
    ("unknown model", CHAT, chat_body(model="gpt-9"), 404, "model", "model_not_found"),
    ("empty messages", CHAT, chat_body(messages=[]), 400, "messages", None),
    ("unknown role", CHAT, chat_body(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages[0].role", None),
    ("function role", CHAT, chat_body(messages=[{"role": "function", "content": "x"}]), 400,
     "messages[0].role", None),
    ("missing content", CHAT, chat_body(messages=[{"role": "user"}]), 400,
     "messages[0].content", None),
    ("image part", CHAT,
     chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content[0]", None),
    ("prompt too long", CHAT, chat_body(messages=[{"role": "user", "content": LONG}]), 400,
     "messages", "context_length_exceeded"),
    ("prompt too long (completions)", COMPLETIONS, {"model": MODEL, "prompt": LONG}, 400,
     "prompt", "context_length_exceeded"),
    ("max_tokens over context", CHAT, chat_body(max_tokens=600), 400, "max_tokens",
     "context_length_exceeded"),
    ("max_completion_tokens over context", CHAT, chat_body(max_completion_tokens=600), 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("max_tokens zero", CHAT, chat_body(max_tokens=0), 400, "max_tokens", None),
    ("n above limit", CHAT, chat_body(n=17), 400, "n", None),
    ("n zero", CHAT, chat_body(n=0), 400, "n", None),
    ("temperature too high", CHAT, chat_body(temperature=2.5), 400, "temperature", None),
    ("temperature negative", CHAT, chat_body(temperature=-1), 400, "temperature", None),
    ("top_p zero", CHAT, chat_body(top_p=0), 400, "top_p", None),
    ("top_p above one", COMPLETIONS, {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400,
     "top_p", None),
    ("seed over int64", CHAT, chat_body(seed=2**64), 400, "seed", None),
    ("top_k huge", CHAT, chat_body(top_k=10**30), 400, "top_k", None),
    ("repetition_penalty infinite", CHAT, b'{"model": "fake-model", "messages": '
     b'[{"role": "user", "content": "x"}], "repetition_penalty": 1e999}', 400,
     "repetition_penalty", None),
    ("penalty out of range", CHAT, chat_body(presence_penalty=3), 400, "presence_penalty", None),
    ("top_logprobs too big", CHAT, chat_body(logprobs=True, top_logprobs=21), 400,
     "top_logprobs", None),
    ("top_logprobs without logprobs", CHAT, chat_body(top_logprobs=2), 400, "top_logprobs",
     None),
    ("stop not strings", CHAT, chat_body(stop=[1]), 400, "stop", None),
    ("empty stop string", CHAT, chat_body(stop=[""]), 400, "stop", None),
    ("stream_options without stream", CHAT, chat_body(stream_options={"include_usage": True}),
     400, "stream_options", None),
    ("tool_choice names an unknown tool", CHAT, chat_body(
     tools=[{"type": "function", "function": {"name": "f"}}],
     tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice", None),
    ("tool_choice without tools", CHAT, chat_body(tool_choice="required"), 400, "tool_choice",
     None),
    ("tool message without its call id", CHAT, chat_body(messages=[
     {"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]), 400,
     "messages[1].tool_call_id", None),
    ("bad tool name", CHAT, chat_body(tools=[{"type": "function", "function": {"name": "a b"}}]),
     400, "tools[0].function.name", None),
    ("logit_bias not a token id", CHAT, chat_body(logit_bias={"x50": 10}), 400, "logit_bias",
     None),
    ("logit_bias over 100", CHAT, chat_body(logit_bias={"50": 101}), 400, "logit_bias", None),
    ("two output constraints", COMPLETIONS, {"model": MODEL, "prompt": "x", "guided_regex": "a",
     "guided_choice": ["a"]}, 400, "guided_choice", None),
    ("guided_json not JSON", COMPLETIONS, {"model": MODEL, "prompt": "x", "guided_json": "{"},
     400, "guided_json", None),
    ("json_schema format without a schema", CHAT, chat_body(response_format={
     "type": "json_schema"}), 400, "response_format.json_schema", None),
    ("unknown response_format", CHAT, chat_body(response_format={"type": "yaml"}), 400,
     "response_format.type", None),
    ("best_of below n", COMPLETIONS, {"model": MODEL, "prompt": "x", "n": 3, "best_of": 2}, 400,
     "best_of", None),
    ("best_of streamed", COMPLETIONS, {"model": MODEL, "prompt": "x", "best_of": 2,
     "stream": True}, 400, "best_of", None),
    ("best_of over max_n", COMPLETIONS, {"model": MODEL, "prompt": "x", "best_of": 17}, 400,
     "best_of", None),
    ("batched prompts", COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("empty prompt", COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "prompt", None),
    ("token id outside vocab", COMPLETIONS, {"model": MODEL, "prompt": [1, 99999]}, 400,
     "prompt", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_request(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    path: str,
    body: Any,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    r = await client.post(path, content=raw(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert engine.requests == []  # refused before reaching the engine


async def test_body_over_limit_is_413(engine: FakeEngine) -> None:
    app = create_app(make_settings(max_body_bytes=1000), engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = chat_body(messages=[{"role": "user", "content": "x" * 2000}])
        r = await client.post(CHAT, json=body)
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "invalid_request_error"

        async def chunks():  # no content-length: counted while reading
            for _ in range(5):
                yield b" " * 400

        r = await client.post(CHAT, content=chunks())
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        assert (await client.post(CHAT, json=chat_body(max_tokens=1))).status_code == 200


async def test_unknown_path_and_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.get(CHAT)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


async def test_queue_full_is_503_with_retry_after(engine: FakeEngine) -> None:
    engine.max_active = 0
    app = create_app(make_settings(), engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(CHAT, json=chat_body())
    assert r.status_code == 503
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "engine_overloaded"


async def test_engine_error_mid_stream_becomes_error_event(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.fail_after = 3
    r = await client.post(CHAT, json=chat_body(max_tokens=10, stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_dead"
    r = await client.post(CHAT, json=chat_body(max_tokens=10))
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


async def test_engine_error_non_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 2
    r = await client.post(CHAT, json=chat_body(max_tokens=10))
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


async def test_engine_abort_is_503(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.token_delay = 3600.0  # never finishes by itself: only the shutdown ends it

    async def abort_soon() -> None:
        while not engine.requests:
            await asyncio.sleep(0.001)
        engine.shutdown()

    task = asyncio.ensure_future(abort_soon())
    r = await client.post(CHAT, json=chat_body(max_tokens=100))
    await task
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_aborted"


def test_unexpected_engine_exception_maps_to_500() -> None:
    error = from_engine_error(RuntimeError("boom"))
    assert isinstance(error, APIError) and error.status == 500
    assert "boom" not in error.message


async def test_bug_in_handler_is_a_shaped_500(engine: FakeEngine) -> None:
    app = create_app(make_settings(), engine)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")

    engine.add_request = broken  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(CHAT, json=chat_body())
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "bug" not in r.text


@pytest.mark.parametrize(
    ("error", "status", "type_", "code", "headers"),
    [
        (InvalidError("bad", param="id"), 400, "invalid_request_error", "invalid_value", {}),
        (AuthenticationError(), 401, "invalid_request_error", "invalid_api_key",
         {"www-authenticate": "Bearer"}),
        (TenantNotFound("acme"), 404, "invalid_request_error", "tenant_not_found", {}),
        (KeyNotFound("acme", "key_1"), 404, "invalid_request_error", "api_key_not_found", {}),
        (ConflictError("exists", code="tenant_exists"), 409, "invalid_request_error",
         "tenant_exists", {}),
        (StoreUnavailable("redis down"), 503, "server_error", "store_unavailable",
         {"retry-after": "1"}),
        (TenantsError("other"), 500, "server_error", None, {}),
    ],
)  # fmt: skip
def test_tenants_errors_get_their_status_here(
    error: TenantsError, status: int, type_: str, code: str | None, headers: dict[str, str]
) -> None:
    api = from_tenants_error(error)
    assert (api.status, api.type, api.code, api.headers) == (status, type_, code, headers)
    assert api.body() == {
        "error": {"message": error.message, "type": type_, "param": error.param, "code": code}
    }
    assert "redis down" not in api.body_bytes().decode()  # the detail is for logs only


@pytest.mark.parametrize(
    ("limit", "hard", "status", "type_", "code", "param"),
    [
        (Limit.MAX_TOKENS_PER_REQUEST, False, 400, "invalid_request_error", "invalid_value",
         "max_tokens"),
        (Limit.REQUESTS_PER_MINUTE, False, 429, "requests", "rate_limit_exceeded", None),
        (Limit.MAX_CONCURRENT_REQUESTS, False, 429, "requests", "rate_limit_exceeded", None),
        (Limit.TOKENS_PER_MINUTE, False, 429, "tokens", "rate_limit_exceeded", None),
        (Limit.TOKENS_PER_DAY, False, 429, "tokens", "rate_limit_exceeded", None),
        (Limit.TOKENS_PER_DAY, True, 429, "insufficient_quota", "insufficient_quota", None),
        (Limit.TOKENS_PER_MONTH, True, 429, "insufficient_quota", "insufficient_quota", None),
    ],
)  # fmt: skip
def test_quota_refusals_get_their_status_here(
    limit: Limit, hard: bool, status: int, type_: str, code: str, param: str | None
) -> None:
    headers = {"retry-after": "2", "x-ratelimit-limit-requests": "3"}
    decision = AdmissionDecision(
        admitted=False, limit=limit, hard=hard, message="refused", headers=headers
    )
    api = from_refusal(decision)
    assert (api.status, api.type, api.code, api.param) == (status, type_, code, param)
    assert api.message == "refused" and api.headers == headers
