"""Bounds on everything a request carries: each list and number a 400 naming the field; body
size 413, slow body 408, header size 431, invalid UTF-8 and deep nesting 400; all OpenAI-shaped.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.limits import (
    MAX_CONTENT_PARTS,
    MAX_LOGIT_BIAS,
    MAX_NAME_CHARS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS,
    MAX_TOP_LOGPROBS,
    MAX_USER_CHARS,
    RequestLimits,
)
from gateway.middleware import BodyLimitMiddleware, ErrorMiddleware
from tests.gateway.conftest import MODEL, make_settings, running_server
from tests.gateway.fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | fields


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi"} | fields


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


OVER_LIMITS = [
    # (name, path, body, param)
    ("stop count", CHAT, chat(stop=["x"] * (MAX_STOP + 1)), "stop"),
    ("10,000 stop strings", COMPLETIONS, completion(stop=["s"] * 10_000), "stop"),
    ("stop string length", CHAT, chat(stop="x" * (MAX_STOP_CHARS + 1)), "stop"),
    ("stop list string length", CHAT, chat(stop=["x" * (MAX_STOP_CHARS + 1)]), "stop[0]"),
    ("stop_token_ids", CHAT, chat(stop_token_ids=[5] * (MAX_STOP_TOKEN_IDS + 1)),
     "stop_token_ids"),
    ("n", CHAT, chat(n=17), "n"),
    ("n huge", COMPLETIONS, completion(n=10**30), "n"),
    ("top_logprobs", CHAT, chat(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1),
     "top_logprobs"),
    ("logprobs", COMPLETIONS, completion(logprobs=MAX_TOP_LOGPROBS + 1), "logprobs"),
    ("logit_bias size", CHAT, chat(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}),
     "logit_bias"),
    ("max_tokens", CHAT, chat(max_tokens=MAX_TOKENS + 1), "max_tokens"),
    ("max_tokens huge", COMPLETIONS, completion(max_tokens=10**40), "max_tokens"),
    ("max_completion_tokens", CHAT, chat(max_completion_tokens=MAX_TOKENS + 1),
     "max_completion_tokens"),
    ("min_tokens", CHAT, chat(min_tokens=MAX_TOKENS + 1), "min_tokens"),
    ("model name", CHAT, chat(model="m" * (MAX_NAME_CHARS + 1)), "model"),
    ("user", CHAT, chat(user="u" * (MAX_USER_CHARS + 1)), "user"),
    ("message name", CHAT, chat(messages=[user("x") | {"name": "n" * (MAX_NAME_CHARS + 1)}]),
     "messages[0].name"),
    ("content parts", CHAT,
     chat(messages=[user([{"type": "text", "text": "x"}] * (MAX_CONTENT_PARTS + 1))]),
     "messages[0].content"),
    ("messages count", CHAT, chat(messages=[user("x")] * 9), "messages"),
    ("content length", CHAT, chat(messages=[user("x" * 60), user("y" * 41)]),
     "messages[1].content"),
    ("content parts length", CHAT,
     chat(messages=[user([{"type": "text", "text": "x" * 60}] * 2)]), "messages[0].content"),
    ("prompt length", COMPLETIONS, completion(prompt="p" * 101), "prompt"),
    ("prompt token ids", COMPLETIONS, completion(prompt=[5] * 101), "prompt"),
]  # fmt: skip


@pytest.fixture
async def small(engine: FakeEngine) -> Iterator[httpx.AsyncClient]:
    """A client on an app with small deployer limits: 8 messages, 100 prompt characters."""
    settings = make_settings(max_messages=8, max_prompt_chars=100)
    transport = httpx.ASGITransport(app=create_app(settings, engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.mark.parametrize(
    ("name", "path", "body", "param"), OVER_LIMITS, ids=[c[0] for c in OVER_LIMITS]
)
async def test_over_a_limit_is_a_400_naming_the_field(
    small: httpx.AsyncClient, name: str, path: str, body: dict[str, Any], param: str
) -> None:
    r = await small.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


AT_LIMITS = [
    ("stop count", CHAT, chat(stop=["x"] * MAX_STOP)),
    ("stop string length", CHAT, chat(stop="x" * MAX_STOP_CHARS)),
    ("messages count", CHAT, chat(messages=[user("x")] * 8)),
    ("content length", CHAT, chat(messages=[user("x" * 60), user("y" * 40)])),
    ("prompt length", COMPLETIONS, completion(prompt="p" * 100)),
    ("top_logprobs", CHAT, chat(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS)),
]


@pytest.mark.parametrize(("name", "path", "body"), AT_LIMITS, ids=[c[0] for c in AT_LIMITS])
async def test_at_a_limit_is_served(
    small: httpx.AsyncClient, name: str, path: str, body: dict[str, Any]
) -> None:
    r = await small.post(path, json=body | {"max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "fake-model", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "fake-model", "response_format": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
    ],
    ids=["invalid UTF-8", "lone surrogate", "nested lists", "nested objects"],
)
async def test_bad_json_is_a_400(client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


async def test_a_body_that_never_completes_is_a_408() -> None:
    """The ASGI `receive` of a client that sent part of its body and then nothing."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b'{"model":', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio_sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    await ErrorMiddleware(BodyLimitMiddleware(app, max_bytes=1000, timeout_s=0.05))(
        scope, receive, send
    )
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"


async def anyio_sleep_forever() -> None:
    import anyio

    await anyio.sleep_forever()


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_messages"):
        RequestLimits(max_messages=0)


# -- through a real server (uvicorn with the gateway's protocol) ------------------------------


@pytest.fixture
def url(engine: FakeEngine) -> Iterator[str]:
    settings = make_settings(body_timeout_s=0.2, max_header_bytes=4096)
    with running_server(create_app(settings, engine)) as base:
        yield base


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(30)  # a safety net against a hang, not a measurement
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_slow_body_is_a_408_and_the_connection_closes(url: str) -> None:
    with _raw(url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n" + b'{"model": "fake'
        )
        status, body = _read_response(sock)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert sock.recv(1) == b""  # closed
    assert httpx.get(url + "/health").status_code == 200


def test_headers_over_the_limit_are_a_431_before_they_end(url: str) -> None:
    with _raw(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\nx-big: ")
        sent = 0
        try:
            while sent < 16 * 1024 * 1024:  # an endless header, as far as the server knows
                sock.sendall(b"a" * 4096)
                sent += 4096
        except OSError:  # the server answered and closed
            pass
        status, body = _read_response(sock)
    assert status == 431 and body["error"]["code"] == "request_header_fields_too_large"
    assert sent < 16 * 1024 * 1024


def test_slow_headers_are_a_408_and_the_connection_closes(url: str) -> None:
    with _raw(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\nx-slow: ")  # and nothing more
        status, body = _read_response(sock)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert "headers" in body["error"]["message"]
        assert sock.recv(1) == b""  # closed


def test_a_silent_connection_is_closed(url: str) -> None:
    with _raw(url) as sock:
        status, _ = _read_response(sock)  # sends nothing at all
        assert status == 408 and sock.recv(1) == b""


def test_a_long_stream_outlives_the_header_deadline(url: str, engine: FakeEngine) -> None:
    """The header deadline ends with the headers: a response that takes longer than it (40
    tokens, 0.02 s apart: four deadlines) streams to the end, twice on one connection."""
    engine.token_delay = 0.02
    body = chat(stream=True, max_tokens=40, ignore_eos=True)
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(2):
            with client.stream("POST", CHAT, json=body) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) > 40


def test_headers_under_the_limit_and_keep_alive(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        for _ in range(3):  # one connection, several requests: the count restarts each time
            r = client.get("/health", headers={"x-pad": "a" * 3000})
            assert r.status_code == 200
