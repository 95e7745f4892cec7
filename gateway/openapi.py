"""The OpenAPI 3.1 document, built from the pydantic request and response models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

import gateway
from gateway.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    ReadyResponse,
)

_REQUESTS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest)
_RESPONSES: tuple[type[BaseModel], ...] = (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ModelList,
    ModelCard,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Invalid request",
        404: "Unknown model",
        413: "Body too large",
        503: "Engine loading or overloaded (see retry-after)",
    }
    return {str(s): _json(ErrorResponse, text[s]) for s in statuses}


def _generation_path(
    summary: str,
    op_id: str,
    request: type[BaseModel],
    result: type[BaseModel],
    chunk: type[BaseModel],
) -> dict[str, Any]:
    ok = _json(result, f"A {result.__name__} (or server-sent events when `stream` is true)")
    ok["content"]["text/event-stream"] = {
        "schema": {
            "type": "string",
            "description": f"`data: <{chunk.__name__} JSON>` events, then `data: [DONE]`",
        },
        "x-event-schema": _ref(chunk),
    }
    return {
        "post": {
            "summary": summary,
            "operationId": op_id,
            "tags": ["OpenAI"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {"200": ok, **_errors(400, 404, 413, 503)},
        }
    }


def _get(summary: str, op_id: str, responses: dict[str, Any], tag: str) -> dict[str, Any]:
    return {
        "get": {"summary": summary, "operationId": op_id, "tags": [tag], "responses": responses}
    }


@functools.cache
def build_openapi() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in _REQUESTS]
    models += [(m, "serialization") for m in _RESPONSES]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")
    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    metrics_ok = {
        "description": "Prometheus text format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    retrieve = _get(
        "Describe the model",
        "retrieveModel",
        {"200": _json(ModelCard, "The model"), **_errors(404)},
        "OpenAI",
    )
    retrieve["get"]["parameters"] = [model_param]
    paths = {
        "/v1/chat/completions": _generation_path(
            "Create a chat completion",
            "createChatCompletion",
            ChatCompletionRequest,
            ChatCompletion,
            ChatCompletionChunk,
        ),
        "/v1/completions": _generation_path(
            "Create a text completion",
            "createCompletion",
            CompletionRequest,
            Completion,
            Completion,
        ),
        "/v1/models": _get(
            "List models", "listModels", {"200": _json(ModelList, "Served models")}, "OpenAI"
        ),
        "/v1/models/{model}": retrieve,
        "/health": _get(
            "Process is up", "health", {"200": _json(HealthResponse, "Up")}, "Operations"
        ),
        "/ready": _get(
            "Engine is loaded",
            "ready",
            {
                "200": _json(ReadyResponse, "Ready"),
                "503": _json(ReadyResponse, "Loading or failed"),
            },
            "Operations",
        ),
        "/metrics": _get("Prometheus metrics", "metrics", {"200": metrics_ok}, "Operations"),
        "/openapi.json": _get(
            "This document", "openapi", {"200": {"description": "OpenAPI 3.1"}}, "Operations"
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "prefixgate",
            "version": getattr(gateway, "__version__", "0.1.0"),
            "description": "OpenAI-compatible API served by the prefixgate engine.",
        },
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {})},
    }
