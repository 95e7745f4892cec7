"""The OpenAPI 3.1 document, generated from the route table (`routing.Endpoint`) and the pydantic
request and response models the endpoints name."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

import gateway
from gateway.routing import Endpoint

ERROR_TEXTS = {
    400: "Invalid request",
    401: "Missing, unknown, revoked or expired API key (`invalid_api_key`)",
    403: "A tenant key on the admin API (`permission_denied`)",
    404: "Unknown model",
    408: "The body did not arrive in time (`request_timeout`)",
    409: "Already exists (`tenant_exists`)",
    413: "Body too large (`request_too_large`)",
    429: "Quota exceeded (`rate_limit_exceeded`, `insufficient_quota`; see retry-after)",
    503: "Engine loading or overloaded, or the tenant store unavailable (see retry-after)",
}

SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A tenant's API key (`pg-...`); not needed in anonymous mode.",
    },
    "adminKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin key, PREFIXGATE_ADMIN_KEY.",
    },
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _success(e: Endpoint) -> dict[str, Any]:
    description = e.description or e.summary
    if e.response is None:
        if e.media_type == "application/json":
            return {"description": description}
        return {
            "description": description,
            "content": {e.media_type: {"schema": {"type": "string"}}},
        }
    ok = _json(e.response, description)
    if e.stream is not None:
        ok["content"]["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": f"`data: <{e.stream.__name__} JSON>` events, then `data: [DONE]`",
            },
            "x-event-schema": _ref(e.stream),
        }
    return ok


def _operation(e: Endpoint) -> dict[str, Any]:
    responses = {str(e.status): _success(e)}
    for status in e.error_statuses:
        responses[str(status)] = _json(
            e.error_model, e.error_texts.get(status, ERROR_TEXTS[status])
        )
    op: dict[str, Any] = {
        "summary": e.summary,
        "operationId": e.operation_id,
        "tags": [e.tag],
        "responses": responses,
    }
    if e.security is not None:
        op["security"] = [{e.security: []}]
    if e.body is not None:
        op["requestBody"] = {
            "required": e.body_required,
            "content": {"application/json": {"schema": _ref(e.body)}},
        }
    return op


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
    ]


def _paths(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for e in endpoints:
        item = paths.setdefault(e.openapi_path, {})
        if params := _path_params(e.openapi_path):
            item["parameters"] = params
        item[e.method.lower()] = _operation(e)
    return paths


def _schemas(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
    for e in endpoints:
        if e.body is not None:
            models[(e.body, "validation")] = None
        for model in (e.response, e.stream, e.error_model if e.error_statuses else None):
            if model is not None:
                models[(model, "serialization")] = None
    _, schemas = models_json_schema(list(models), ref_template="#/components/schemas/{model}")
    defs: dict[str, Any] = schemas.get("$defs", {})
    return defs


def build_openapi(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """The document for these endpoints (the app's whole route table)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "prefixgate",
            "version": getattr(gateway, "__version__", "0.1.0"),
            "description": "OpenAI-compatible API served by the prefixgate engine.",
        },
        "paths": _paths(endpoints),
        "components": {"schemas": _schemas(endpoints), "securitySchemes": SECURITY_SCHEMES},
    }
