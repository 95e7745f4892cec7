"""A KV pool far too small for the load, behind a real server: the engine preempts, every
request completes (with the tokens it would have had alone) or gets a clear 400, nothing
crashes or hangs, and every block is free at the end."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import CacheConfig, EngineConfig
from gateway.app import create_app
from tests.gateway.conftest import make_settings, running_server
from tests.gateway.replicas.test_cluster import sse_events

NUM_BLOCKS = 8  # of 16 tokens: 128 tokens in all, so the context is capped at 128 too
MAX_TOKENS = 60  # a prompt of ~20 tokens + 60: 5 blocks, so at most one or two run at once
CLIENTS = 8


@pytest.fixture
def engine(tiny_model_dir: str) -> Iterator[AsyncEngine]:
    config = EngineConfig(
        model=tiny_model_dir, dtype="float32", cache=CacheConfig(num_blocks=NUM_BLOCKS)
    )
    engine = AsyncEngine.from_config(config)
    engine.start()
    yield engine
    engine.shutdown()


def body(model: str, i: int, **fields: Any) -> dict[str, Any]:
    question = f"Question {i % 4}: what happens when the cache is full?"
    return {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": question}]} | fields  # fmt: skip


async def one(client: httpx.AsyncClient, model: str, i: int) -> tuple[int, str]:
    """(status, generated text) of request i: streamed when i is odd."""
    if i % 2 == 0:
        r = await client.post("/v1/chat/completions", json=body(model, i))
        if r.status_code != 200:
            return r.status_code, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
        return 200, choice["message"]["content"]
    r = await client.post("/v1/chat/completions", json=body(model, i, stream=True))
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-2]
    chunks = [e["choices"][0] for e in events[:-1] if e["choices"]]
    assert chunks[-1]["finish_reason"] == "length"
    return r.status_code, "".join(c["delta"].get("content") or "" for c in chunks)


async def load(url: str, model: str) -> tuple[list[tuple[int, str]], httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        answers = await asyncio.gather(*(one(client, model, i) for i in range(CLIENTS)))
        too_long = await client.post("/v1/chat/completions", json=body(model, 0, max_tokens=200))
    return list(answers), too_long


def test_a_pool_too_small_for_the_load(engine: AsyncEngine) -> None:
    model = engine.model_name
    with running_server(create_app(make_settings(), engine)) as url:
        alone = asyncio.run(load_alone(url, model))
        answers, too_long = asyncio.run(load(url, model))
    assert [status for status, _ in answers] == [200] * CLIENTS
    # Preempted and recomputed, each reply is the one its prompt gets alone.
    assert [text for _, text in answers] == [alone[i % 4] for i in range(CLIENTS)]
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_blocks == NUM_BLOCKS  # no leaked block


async def load_alone(url: str, model: str) -> list[str]:
    """The reply each of the four questions gets with the engine to itself."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return [(await one(client, model, i))[1] for i in range(4)]
