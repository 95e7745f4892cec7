"""The same greedy request returns the same text plain, streamed, after its system prompt was
cached and beside other requests: the real bfloat16 engine behind uvicorn (docs/determinism.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.app import create_app
from kernels import cpu_attention, cpu_ops
from tests.gateway.conftest import make_settings, running_server


@pytest.fixture(scope="module")
def url(tiny_model_dir: str) -> Iterator[str]:
    from engine.async_engine import AsyncEngine
    from engine.config import CacheConfig, EngineConfig

    config = EngineConfig(model=tiny_model_dir, dtype="bfloat16", cache=CacheConfig(num_blocks=512))
    engine = AsyncEngine.from_config(config)
    kv = engine.engine.runner.kv_caches[0]
    if not (cpu_ops.linear_bf16_available() and cpu_attention.one_kernel_for_all_rows(kv)):
        pytest.skip("batch invariance needs AVX512-BF16 or AMX (docs/determinism.md)")
    engine.start()
    try:
        with running_server(create_app(make_settings(), engine)) as base:
            yield base
    finally:
        engine.shutdown()


async def test_greedy_chat_is_the_same_plain_streamed_cached_and_batched(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = (await client.models.list()).data[0].id
    kwargs: dict[str, Any] = dict(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
        temperature=0,
    )  # fmt: skip
    plain = await client.chat.completions.create(**kwargs)
    stream = await client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    # the chat template's default system prompt came from the prefix cache this time
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens
    assert streamed == plain.choices[0].message.content
    others = [
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Count to {n}, slowly."}],
            max_tokens=16,
            temperature=0.8,
        )
        for n in range(6)
    ]
    batched, *_ = await asyncio.gather(client.chat.completions.create(**kwargs), *others)
    assert batched.choices[0].message.content == plain.choices[0].message.content
    await client.close()
