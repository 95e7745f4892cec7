"""Structured outputs with the real bundled SmolLM2-135M-Instruct behind uvicorn, through the
official `openai` client: 50 json_schema requests (nested object, enums, array, required
fields), half streamed, all parse and validate; the same requests without the constraint mostly
do not (10 of them: they run to max_tokens). Bad schemas are 400s naming `response_format`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import openai
import pytest

from tests.gateway.openai.test_server import Served, serve_engine

pytestmark = pytest.mark.slow

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "enum": ["red", "green", "blue"]},
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                "country": {"type": "string", "enum": ["FR", "DE", "US"]},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
PEOPLE = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goro", "Hana", "Ivan", "Jo"]
CITIES = ["Paris", "Berlin", "Boston", "Lyon", "Munich"]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig

    engine = AsyncEngine.from_config(EngineConfig())
    engine.start()
    try:
        yield from serve_engine(engine)
    finally:
        engine.shutdown()


def _messages(i: int) -> list[Any]:
    person, city = PEOPLE[i % len(PEOPLE)], CITIES[i % len(CITIES)]
    return [
        {"role": "system", "content": "You describe users of a web site."},
        {"role": "user", "content": f"Describe {person}, {20 + i} years old, from {city}."},
    ]


async def _ask(client: openai.AsyncOpenAI, model: str, i: int, constrained: bool) -> str:
    kwargs: dict[str, Any] = dict(
        model=model, messages=_messages(i), max_tokens=160, temperature=0.8, seed=i
    )
    if constrained:
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "user", "schema": SCHEMA, "strict": True},
        }
    if i % 2:
        stream = await client.chat.completions.create(stream=True, **kwargs)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    reply = await client.chat.completions.create(**kwargs)
    if constrained:  # a complete object ends the reply; free text may run to max_tokens
        assert reply.choices[0].finish_reason == "stop"
    return reply.choices[0].message.content or ""


def _valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return bool(jsonschema_rs.validator_for(SCHEMA).is_valid(value))


async def test_50_json_schema_requests_parse_and_validate(served: Served) -> None:
    client = served.async_client()
    texts = await asyncio.gather(*(_ask(client, served.model, i, True) for i in range(50)))
    invalid = [t for t in texts if not _valid(t)]
    assert invalid == []
    free = await asyncio.gather(*(_ask(client, served.model, i, False) for i in range(10)))
    assert sum(not _valid(t) for t in free) >= 8  # the check can fail: unconstrained, it does
    await client.close()


async def test_json_object_and_deterministic_with_a_schema(served: Served) -> None:
    client = served.async_client()
    reply = await client.chat.completions.create(
        model=served.model, messages=_messages(3), max_tokens=64, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    alone = await _ask(client, served.model, 4, True)
    together = await asyncio.gather(*(_ask(client, served.model, i, True) for i in (4, 5, 6, 4)))
    assert together[0] == together[3] == alone
    await client.close()


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
        {"type": "json_schema"},
        {"type": "yaml"},
    ],
    ids=["unknown-type", "dangling-ref", "no-json-schema", "unknown-format"],
)
def test_bad_response_format_is_a_400_naming_it(served: Served, response_format: Any) -> None:
    client = served.sync_client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=served.model, messages=_messages(0), max_tokens=4,
            response_format=response_format,
        )  # fmt: skip
    body = err.value.body
    assert isinstance(body, dict) and str(body["param"]).startswith("response_format")
    assert body["message"]
