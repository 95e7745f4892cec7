"""Endpoints through httpx's ASGI transport, against the fake engine."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.gateway.conftest import MODEL
from tests.gateway.fake_engine import FakeEngine


def chat_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    return body | fields


def sse_events(text: str) -> list[Any]:
    """Parse an SSE body: JSON payloads, and the string "[DONE]"."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_chat_completion_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=7, temperature=0))
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"]) == 7
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert r.headers["x-request-id"]


async def test_chat_renders_template_and_maps_roles(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    r = await client.post("/v1/chat/completions", json=chat_body(messages=messages, max_tokens=1))
    assert r.status_code == 200
    _, prompt, _, tenant, namespace = engine.requests[-1]
    assert engine.tokenizer.decode(prompt) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (tenant, namespace) == ("default", None)


async def test_sampling_fields_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = chat_body(
        n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=11, stop=["x", "y"],
        max_completion_tokens=9, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.1, ignore_eos=True, user="u1", logprobs=True, top_logprobs=2,
        some_future_field={"ignored": True},
    )  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    params = engine.requests[-1][2]
    assert (params.n, params.temperature, params.top_p, params.top_k) == (3, 0.7, 0.9, 40)
    assert (params.min_p, params.seed, params.stop, params.max_tokens) == (0.05, 11, ["x", "y"], 9)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert (params.repetition_penalty, params.ignore_eos, params.logprobs) == (1.1, True, 2)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]


async def test_chat_max_tokens_defaults_to_the_rest_of_the_context(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.eos_after = 3
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    _, prompt, params, *_ = engine.requests[-1]
    assert params.max_tokens == engine.max_model_len - len(prompt)


async def test_chat_logprobs(client: httpx.AsyncClient) -> None:
    body = chat_body(max_tokens=3, logprobs=True, top_logprobs=2)
    r = await client.post("/v1/chat/completions", json=body)
    content = r.json()["choices"][0]["logprobs"]["content"]
    text = r.json()["choices"][0]["message"]["content"]
    assert "".join(t["token"] for t in content) == text
    for t in content:
        assert t["logprob"] == -0.25
        assert t["bytes"] == list(t["token"].encode())
        assert [a["logprob"] for a in t["top_logprobs"]] == [-0.25, -1.5]
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3, logprobs=False))
    assert r.json()["choices"][0]["logprobs"] is None


async def test_stop_string_is_not_returned(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=50, temperature=0))
    text = r.json()["choices"][0]["message"]["content"]
    stop = text[10:12]
    r = await client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=50, temperature=0, stop=stop)
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == text[: text.index(stop)]


async def test_completion_shape_and_prompt_forms(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    ids = engine.tokenizer.encode("Once upon")
    texts = []
    for prompt in ["Once upon", ["Once upon"], ids, [ids]]:
        r = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert engine.requests[-1][1] == ids
        assert body["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
        texts.append(body["choices"][0]["text"])
    assert len(set(texts)) == 1


async def test_completion_logprobs(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "logprobs": 1}
    r = await client.post("/v1/completions", json=body)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"] == [-0.25] * 4
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert all(len(top) == 1 for top in lp["top_logprobs"])


async def test_chat_stream(client: httpx.AsyncClient) -> None:
    body = chat_body(max_tokens=6, temperature=0, stream=True)
    r = await client.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)
    r2 = await client.post("/v1/chat/completions", json=chat_body(max_tokens=6, temperature=0))
    assert text == r2.json()["choices"][0]["message"]["content"]


async def test_stream_include_usage(client: httpx.AsyncClient) -> None:
    body = chat_body(max_tokens=4, n=2, stream=True, stream_options={"include_usage": True})
    events = sse_events((await client.post("/v1/chat/completions", json=body)).text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 8
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    roles = [c for c in events[:-2] if c["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(c["choices"][0]["index"] for c in roles) == [0, 1]


async def test_completion_stream(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "xyz", "max_tokens": 5, "temperature": 0}
    full = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    events = sse_events((await client.post("/v1/completions", json=body)).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 5
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_cached_tokens_reported(client: httpx.AsyncClient) -> None:
    system = {"role": "system", "content": "You are a helpful assistant. " * 8}
    usages = []
    for question in ("first?", "second?"):
        body = chat_body(messages=[system, {"role": "user", "content": question}], max_tokens=2)
        usages.append((await client.post("/v1/chat/completions", json=body)).json()["usage"])
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert len(system["content"]) < cached < usages[1]["prompt_tokens"]


async def test_models(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.json() == {
        "object": "list",
        "data": [
            {
                "id": MODEL,
                "object": "model",
                "created": r.json()["data"][0]["created"],
                "owned_by": "prefixgate",
                "max_model_len": 512,
            }
        ],
    }
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    r = await client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    r = await client.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
