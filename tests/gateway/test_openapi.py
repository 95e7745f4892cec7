"""/openapi.json: every route documented, every $ref resolvable."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.routing import Route

from gateway.app import create_app
from tests.gateway.conftest import make_settings
from tests.gateway.fake_engine import FakeEngine


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


async def test_openapi_document(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    app = create_app(make_settings(), FakeEngine())
    for route in app.routes:
        assert isinstance(route, Route)
        path = route.path.replace("{model:path}", "{model}")
        assert path in doc["paths"], path
        assert set(doc["paths"][path]) == {m.lower() for m in route.methods or ()} - {"head"}
    schemas = doc["components"]["schemas"]
    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert set(chat["responses"]) == {"200", "400", "404", "413", "503"}
    request = schemas["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(request["required"])
    assert request["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    usage = schemas["Usage"]
    assert "prompt_tokens_details" in usage["required"]
    delta = schemas["ChatDelta"]["properties"]
    assert set(delta) == {"role", "content"}
