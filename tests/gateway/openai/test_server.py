"""The official `openai` client against a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.engine_client import EngineClient
from tests.gateway.conftest import make_settings, running_server, wait_until
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.replicas.helpers import serve_remote

SYSTEM = "You are a careful assistant for a library. Answer in one short sentence. " * 4


@dataclass
class Served:
    url: str
    engine: Any
    model: str

    def sync_client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


def serve_engine(engine: EngineClient) -> Iterator[Served]:
    with running_server(create_app(make_settings(), engine)) as url:
        yield Served(url, engine, engine.model_name)


@pytest.fixture(params=["fake", "tiny", "remote"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """The same tests against the fake engine, the real engine with a tiny random model, and
    that engine as a replica behind the remote client (`prefixgate engine`'s API, over HTTP)."""
    if request.param == "fake":
        yield from serve_engine(FakeEngine(token_delay=0.002))
        return
    engine = request.getfixturevalue("tiny_engine")
    engine.aborted.clear()
    if request.param == "tiny":
        yield from serve_engine(engine)
        return
    with serve_remote(engine) as url:
        yield Served(url, engine, engine.model_name)


def messages(question: str, system: str = SYSTEM) -> list[Any]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def test_sync_client_chat_and_completions(served: Served) -> None:
    client = served.sync_client()
    chat = client.chat.completions.create(
        model=served.model, messages=messages("Hi?"), max_tokens=8, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens <= 8
    assert chat.usage.prompt_tokens_details is not None
    text = client.completions.create(model=served.model, prompt="Once", max_tokens=5)
    assert text.object == "text_completion" and text.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list()] == [served.model]


def test_sync_client_streaming(served: Served) -> None:
    client = served.sync_client()
    stream = client.chat.completions.create(
        model=served.model, messages=messages("Hi?"), max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=served.model, messages=messages("Hi?"), max_tokens=8, temperature=0
    )
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]

    text_chunks = list(
        client.completions.create(model=served.model, prompt="Once", max_tokens=5, stream=True)
    )
    assert text_chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_async_client_streamed_equals_non_streamed_with_seed(served: Served) -> None:
    client = served.async_client()
    kwargs: dict[str, Any] = dict(
        model=served.model, messages=messages("Tell me a story."), max_tokens=24,
        temperature=0.9, top_p=0.95, seed=1234,
    )  # fmt: skip
    whole = await client.chat.completions.create(**kwargs)
    stream = await client.chat.completions.create(**kwargs, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == whole.choices[0].message.content
    again = await client.chat.completions.create(**kwargs)
    assert again.choices[0].message.content == whole.choices[0].message.content
    await client.close()


async def test_cached_tokens_for_a_repeated_system_prompt(served: Served) -> None:
    client = served.async_client()
    system = f"[{time.time_ns()}] {SYSTEM}"  # not cached by an earlier test on a shared engine
    first = await client.chat.completions.create(
        model=served.model, messages=messages("First question?", system), max_tokens=4
    )
    second = await client.chat.completions.create(
        model=served.model, messages=messages("Second question?", system), max_tokens=4
    )
    assert first.usage and second.usage
    assert first.usage.prompt_tokens_details and second.usage.prompt_tokens_details
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached and 0.5 * second.usage.prompt_tokens < cached < second.usage.prompt_tokens
    await client.close()


def test_error_reaches_the_client_as_openai_error(served: Served) -> None:
    client = served.sync_client()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=messages("x"))
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=served.model, messages=messages("x"), temperature=5)
    assert bad.value.param == "temperature"


def _all_blocks_free(engine: Any) -> bool:
    stats = engine.stats()
    return bool(stats.num_free_blocks == stats.num_blocks and stats.num_running == 0)


@dataclass
class LongGeneration:
    """A request that only an abort can end early, and how to tell the engine is on it."""

    max_tokens: int
    steps: list[int] | None  # the real engine's step count since the test began; None: fake

    def generating(self, served: Served) -> bool:
        if self.steps is None:
            return bool(served.engine.requests)
        return self.steps[0] >= 3


def _long_generation(served: Served, monkeypatch: pytest.MonkeyPatch) -> LongGeneration:
    """150 tokens of the fake (7.5 s), or 420 steps of the tiny model (nearly its whole
    512-token context), whose steps are counted: freed after a few steps, only the abort can
    have done it."""
    if isinstance(served.engine, FakeEngine):
        served.engine.token_delay = 0.05
        return LongGeneration(150, None)
    steps = [0]
    engine = served.engine.engine
    real_step = engine.step

    def step() -> Any:
        steps[0] += 1
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    return LongGeneration(420, steps)


def _assert_aborted(served: Served, long: LongGeneration) -> None:
    assert wait_until(lambda: _all_blocks_free(served.engine))
    assert len(served.engine.aborted) == 1
    if long.steps is not None:
        assert long.steps[0] < long.max_tokens // 2, f"freed after {long.steps[0]} steps"


def test_disconnect_mid_stream_frees_blocks(served: Served, monkeypatch) -> None:
    long = _long_generation(served, monkeypatch)
    body = {
        "model": served.model, "messages": messages("Go on forever."),
        "max_tokens": long.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
    }  # fmt: skip
    with (
        httpx.Client(base_url=served.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data: {") for line in received)
        assert served.engine.stats().num_free_blocks < served.engine.stats().num_blocks
    # The connection is closed here, long before max_tokens.
    _assert_aborted(served, long)


def test_disconnect_while_waiting_for_a_non_streamed_result(served: Served, monkeypatch) -> None:
    long = _long_generation(served, monkeypatch)
    body = json.dumps({
        "model": served.model, "messages": messages("Long answer."),
        "max_tokens": long.max_tokens, "temperature": 0, "ignore_eos": True,
    }).encode()  # fmt: skip
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_until(lambda: long.generating(served))
    # Hung up while the answer is being generated.
    _assert_aborted(served, long)


async def test_32_concurrent_streams_are_independent(served: Served) -> None:
    client = served.async_client()
    questions = [f"Question number {i}: what is {i} squared?" for i in range(32)]

    async def ask(question: str, stream: bool) -> str:
        kwargs: dict[str, Any] = dict(
            model=served.model, messages=messages(question), max_tokens=16, temperature=0
        )
        if not stream:
            out = await client.chat.completions.create(**kwargs)
            return out.choices[0].message.content or ""
        chunks = await client.chat.completions.create(**kwargs, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    sequential = [await ask(q, stream=False) for q in questions]
    concurrent = await asyncio.gather(*(ask(q, stream=True) for q in questions))
    assert list(concurrent) == sequential
    assert len(set(sequential)) > 1  # different prompts, different outputs
    await client.close()
    assert wait_until(lambda: _all_blocks_free(served.engine))


@pytest.mark.slow
def test_bundled_smollm2() -> None:
    """The real bundled SmolLM2-135M-Instruct behind the gateway, through the openai client."""
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig

    engine = AsyncEngine.from_config(EngineConfig())
    engine.start()
    try:
        for served in serve_engine(engine):
            assert served.model == "smollm2"
            client = served.sync_client()
            question = [{"role": "user", "content": "What is the capital of France?"}]
            reply = client.chat.completions.create(
                model="smollm2",
                messages=question,
                max_tokens=16,
                temperature=0,
            )
            assert "Paris" in (reply.choices[0].message.content or "")
            assert reply.choices[0].finish_reason == "stop"
            stream = client.chat.completions.create(
                model="smollm2", messages=question, max_tokens=16, temperature=0, stream=True,
            )  # fmt: skip
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert streamed == reply.choices[0].message.content
            again = client.chat.completions.create(
                model="smollm2",
                messages=question,
                max_tokens=4,
                temperature=0,
            )
            assert again.usage and again.usage.prompt_tokens_details
            assert again.usage.prompt_tokens_details.cached_tokens >= 16
    finally:
        engine.shutdown()
