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
    methods: dict[str, set[str]] = {}  # several routes may share a path (one per method)
    for route in app.routes:
        assert isinstance(route, Route)
        path = route.path.replace("{model:path}", "{model}")
        methods.setdefault(path, {"parameters"} if "{" in path else set())
        methods[path] |= {m.lower() for m in route.methods or ()} - {"head"}
    for path, expected in methods.items():
        assert path in doc["paths"], path
        assert set(doc["paths"][path]) == expected, path
    assert set(doc["paths"]) == set(methods)
    schemas = doc["components"]["schemas"]
    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert set(chat["responses"]) == {"200", "400", "401", "404", "408", "413", "429", "503"}
    assert chat["security"] == [{"apiKey": []}]
    request = schemas["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(request["required"])
    assert request["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    usage = schemas["Usage"]
    assert "prompt_tokens_details" in usage["required"]
    delta = schemas["ChatDelta"]["properties"]
    assert set(delta) == {"role", "content", "tool_calls"}


async def test_openapi_documents_the_admin_api(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["adminKey"] == schemes["apiKey"] | {
        "description": schemes["adminKey"]["description"]
    }
    create = doc["paths"]["/admin/tenants"]["post"]
    assert create["security"] == [{"adminKey": []}]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TenantCreate"
    }
    assert set(create["responses"]) == {"201", "400", "401", "403", "408", "409", "413", "503"}
    issue = doc["paths"]["/admin/tenants/{tenant_id}/keys"]["post"]
    assert issue["requestBody"]["required"] is False
    schemas = doc["components"]["schemas"]
    assert "key" in schemas["IssuedApiKey"]["required"]
    assert "key_hash" not in schemas["ApiKeyInfo"]["properties"]
    quota = schemas["Quota"]["properties"]
    assert set(quota) == {
        "requests_per_minute", "tokens_per_minute", "max_concurrent_requests",
        "tokens_per_day", "tokens_per_month", "max_tokens_per_request", "max_prefixes",
        "max_pinned_blocks", "max_kv_blocks", "priority", "weight",
    }  # fmt: skip
    usage = doc["paths"]["/v1/usage"]["get"]["responses"]["200"]
    assert usage["content"]["application/json"]["schema"]["$ref"].endswith("/TenantUsage")
