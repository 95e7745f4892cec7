"""Registered prefixes end to end on the real engine (tiny random Llama, float32) behind a real
uvicorn server, Redis holding the registry: isolation between tenants, public prefixes, outputs
equal to transformers', a pinned prefix through a flood that evicts an unpinned one, and a
restarted server serving the pinned prefix as a hit on its first request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from gateway.app import create_app
from gateway.openai.template import render_chat
from tests.engine.conftest import hf_greedy, hf_model
from tests.gateway.conftest import make_settings, running_server
from tests.gateway.tenancy.helpers import ADMIN, ADMIN_KEY, bearer, tenant_key_sync

BS = 16


def small_engine(model_dir: str) -> AsyncEngine:
    """64 blocks of 16 tokens; max_model_len 256 leaves a pin cap of 32 blocks."""
    config = EngineConfig(
        model=model_dir,
        dtype="float32",
        cache=CacheConfig(num_blocks=64, block_size=BS),
        scheduler=SchedulerConfig(max_model_len=256),
    )
    engine = AsyncEngine.from_config(config)
    engine.start()
    return engine


@pytest.fixture
def engine(tiny_model_dir: str) -> Iterator[AsyncEngine]:
    engine = small_engine(tiny_model_dir)
    yield engine
    engine.shutdown()


def serve(engine: AsyncEngine, redis_url: str) -> Any:
    return running_server(
        create_app(make_settings(redis_url=redis_url, admin_key=ADMIN_KEY), engine)
    )


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": f"[{time.time_ns()}] {text}"}


def ask(url: str, key: str, model: str, messages: list[Any], **fields: Any) -> tuple[str, int]:
    body = {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True} | fields  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key), timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ]


def register(url: str, key: str | None, body: dict[str, Any]) -> dict[str, Any]:
    path, headers = ("/v1/prefixes", bearer(key)) if key else ("/admin/prefixes", ADMIN)
    r = httpx.post(url + path, json=body, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_isolation_public_prefixes_and_exact_outputs(
    engine: AsyncEngine, redis_url: str, tiny_model_dir: str
) -> None:
    model = engine.model_name
    sys_a = system("You answer questions about the Acme warehouse, briefly and exactly. " * 3)
    question = {"role": "user", "content": "Which aisle holds the spare parts for model X?"}
    with serve(engine, redis_url) as url:
        alpha, bravo = tenant_key_sync(url, "alpha"), tenant_key_sync(url, "bravo")
        made = register(url, alpha, {"name": "support", "messages": [sys_a], "pin": True})
        full = made["num_blocks"] * BS
        # Another tenant sending the identical messages hits nothing of alpha's.
        assert ask(url, bravo, model, [sys_a, question])[1] == 0
        text, cached = ask(url, alpha, model, [sys_a, question])
        assert cached == full
        by_ref, cached = ask(url, alpha, model, [question], prefix="support")
        assert cached >= full and by_ref == text
        # ...and equals transformers' greedy output for the same prompt.
        tokenizer = engine.tokenizer
        prompt = render_chat(tokenizer, [sys_a, question])
        expected = hf_greedy(hf_model(tiny_model_dir), prompt, 6)
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        # A public prefix: both tenants hit it; what follows it is not shared.
        house = system("Every answer of this service is in English and cites the manual. " * 3)
        shared = register(url, None, {"name": "house", "messages": [house]})
        public = shared["num_blocks"] * BS
        long_q = {"role": "user", "content": "Please list every step of the return process. " * 2}
        assert ask(url, alpha, model, [house, long_q])[1] == public
        assert ask(url, alpha, model, [house, long_q])[1] > public  # its own blocks after it
        assert ask(url, bravo, model, [house, long_q])[1] == public  # not alpha's
        assert ask(url, bravo, model, [long_q], prefix="house")[1] > public


def test_pinned_prefix_survives_a_flood_unpinned_does_not(
    engine: AsyncEngine, redis_url: str
) -> None:
    model = engine.model_name
    question = {"role": "user", "content": "Status?"}
    with serve(engine, redis_url) as url:
        alpha, flood = tenant_key_sync(url, "alpha"), tenant_key_sync(url, "flood")
        pinned = register(url, alpha, {"name": "pinned", "pin": True,
                                       "messages": [system("Pinned rules. " * 12)]})  # fmt: skip
        register(url, alpha, {"name": "plain", "messages": [system("Plain rules. " * 12)]})
        assert engine.stats().pinned_blocks_by_tenant == {"alpha": pinned["num_blocks"]}

        def unique(i: int) -> None:  # ~200 tokens each: 8 of them need twice the pool
            content = f"{i} " + " ".join(str(i * 1000 + j) for j in range(36))
            ask(url, flood, model, [{"role": "user", "content": content}], max_tokens=2)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(unique, range(8)))
        assert ask(url, alpha, model, [question], prefix="pinned")[1] == pinned["num_blocks"] * BS
        assert ask(url, alpha, model, [question], prefix="plain")[1] == 0  # evicted


def test_restarted_server_serves_the_pinned_prefix_as_a_hit(
    tiny_model_dir: str, redis_url: str
) -> None:
    first = small_engine(tiny_model_dir)
    sys_msg = system("Restart-proof instructions for the assistant. " * 4)
    try:
        with serve(first, redis_url) as url:
            key = tenant_key_sync(url, "alpha")
            made = register(url, key, {"name": "boot", "messages": [sys_msg], "pin": True})
    finally:
        first.shutdown()
    second = small_engine(tiny_model_dir)
    try:
        with serve(second, redis_url) as url:  # /ready only once the prefixes are warm
            question = {"role": "user", "content": "First request after the restart."}
            cached = ask(url, key, second.model_name, [question], prefix="boot")[1]
            assert cached == made["num_blocks"] * BS
    finally:
        second.shutdown()
