"""Tenants end to end: the official `openai` client with tenant keys against a real uvicorn
server in front of the real engine (tiny random Llama), with Redis holding keys and quotas."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from tests.gateway.conftest import make_settings, running_server
from tests.gateway.openai.test_server import SYSTEM
from tests.gateway.tenancy.helpers import ADMIN_KEY, bearer, tenant_key_sync


@pytest.fixture
def url(tiny_engine: Any, redis_url: str) -> Iterator[str]:
    app = create_app(make_settings(redis_url=redis_url, admin_key=ADMIN_KEY), tiny_engine)
    with running_server(app) as base:
        yield base


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_openai_client_with_a_tenant_key(url: str, tiny_engine: Any) -> None:
    model = tiny_engine.model_name
    key = tenant_key_sync(url, "acme", requests_per_minute=3)
    c = client(url, key)
    messages: Any = [{"role": "user", "content": "Hi?"}]
    raw = c.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=3)
    assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"
    chat = raw.parse()
    assert chat.usage is not None and chat.usage.completion_tokens == 3
    stream = c.chat.completions.create(
        model=model, messages=messages, max_tokens=3, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None
    text = c.completions.create(model=model, prompt="Once", max_tokens=2)
    assert text.usage is not None

    with pytest.raises(openai.RateLimitError) as refused:
        c.chat.completions.create(model=model, messages=messages, max_tokens=3)
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.AuthenticationError) as denied:
        client(url, "pg-not-a-key").models.list()
    assert denied.value.code == "invalid_api_key"

    usage = httpx.get(f"{url}/v1/usage", headers=bearer(key)).json()
    assert usage["today"]["requests"] == 3
    assert usage["today"]["completion_tokens"] == 3 + chunks[-1].usage.completion_tokens + 2


def ask(url: str, key: str, model: str, system: str, question: str) -> tuple[int, int]:
    """(prompt tokens, cached tokens) of one chat completion."""
    messages: Any = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    reply = client(url, key).chat.completions.create(model=model, messages=messages, max_tokens=1)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    return reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens or 0


def test_tenants_never_share_cached_blocks(url: str, tiny_engine: Any) -> None:
    model = tiny_engine.model_name
    alpha, bravo = tenant_key_sync(url, "alpha"), tenant_key_sync(url, "bravo")
    system = f"[{time.time_ns()}] {SYSTEM}"  # not cached by an earlier test on the shared engine
    prompt, cached = ask(url, alpha, model, system, "First question?")
    assert prompt > 3 * 16 and cached == 0
    # The same tenant again: its long system prompt comes from the cache.
    assert ask(url, alpha, model, system, "Second question?")[1] > 0
    # Another tenant, the very same prompt: nothing cached (and nothing to time).
    assert ask(url, bravo, model, system, "First question?") == (prompt, 0)
    # Its own second request hits its own blocks.
    assert ask(url, bravo, model, system, "First question?")[1] > 0
