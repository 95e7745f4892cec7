"""The OpenAPI 3.1 document, built from the pydantic request and response models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

import gateway
from gateway.admin_protocol import (
    ApiKeyInfo,
    ApiKeyList,
    IssuedApiKey,
    RotateKey,
    TenantDeleted,
    TenantList,
    TenantUsage,
)
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
from tenants import KeyCreate, Quota, Tenant, TenantCreate, TenantUpdate

_REQUESTS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    TenantCreate,
    TenantUpdate,
    Quota,
    KeyCreate,
    RotateKey,
)
_RESPONSES: tuple[type[BaseModel], ...] = (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ModelList,
    ModelCard,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    Tenant,
    TenantList,
    TenantDeleted,
    ApiKeyInfo,
    ApiKeyList,
    IssuedApiKey,
    TenantUsage,
)
API_KEY: list[dict[str, list[str]]] = [{"apiKey": []}]  # tenant key; optional in anonymous mode
ADMIN_KEY: list[dict[str, list[str]]] = [{"adminKey": []}]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


_ERROR_TEXT = {
    400: "Invalid request",
    401: "Missing, unknown, revoked or expired API key (`invalid_api_key`)",
    403: "A tenant key on the admin API (`permission_denied`)",
    404: "Unknown model",
    409: "Already exists (`tenant_exists`)",
    413: "Body too large",
    429: "Quota exceeded (`rate_limit_exceeded`, `insufficient_quota`; see retry-after)",
    503: "Engine loading or overloaded, or the tenant store unavailable (see retry-after)",
}


def _errors(*statuses: int, **texts: str) -> dict[str, Any]:
    """Error responses; `texts` overrides a description (`_404="Unknown tenant"`)."""
    return {str(s): _json(ErrorResponse, texts.get(f"_{s}", _ERROR_TEXT[s])) for s in statuses}


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
            "security": API_KEY,
            "responses": {"200": ok, **_errors(400, 401, 404, 413, 429, 503)},
        }
    }


def _get(summary: str, op_id: str, responses: dict[str, Any], tag: str) -> dict[str, Any]:
    return {
        "get": {"summary": summary, "operationId": op_id, "tags": [tag], "responses": responses}
    }


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
    ]


def _admin_op(
    summary: str,
    op_id: str,
    result: type[BaseModel],
    *,
    body: type[BaseModel] | None = None,
    body_required: bool = True,
    status: int = 200,
    errors: tuple[int, ...] = (401, 403, 404, 503),
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": op_id,
        "tags": ["Admin"],
        "security": ADMIN_KEY,
        "responses": {
            str(status): _json(result, summary),
            **_errors(*sorted({400, *errors} if body else errors), _404="Unknown tenant or key"),
        },
    }
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return op


def _admin_paths() -> dict[str, Any]:
    tenant, key = _path_params("tenant_id"), _path_params("tenant_id", "key_id")
    usage = _admin_op("Usage of the tenant", "getTenantUsage", TenantUsage)
    reset = _admin_op("Reset today's and this month's usage", "resetTenantUsage", TenantUsage)
    return {
        "/admin/tenants": {
            "post": _admin_op(
                "Create a tenant",
                "createTenant",
                Tenant,
                body=TenantCreate,
                status=201,
                errors=(401, 403, 409, 503),
            ),
            "get": _admin_op("List tenants", "listTenants", TenantList, errors=(401, 403, 503)),
        },
        "/admin/tenants/{tenant_id}": {
            "parameters": tenant,
            "get": _admin_op("Describe a tenant", "getTenant", Tenant),
            "patch": _admin_op(
                "Change some fields (merge patch; quota limits sent change, null = unlimited)",
                "updateTenant",
                Tenant,
                body=TenantUpdate,
            ),
            "delete": _admin_op(
                "Delete a tenant, its keys and usage", "deleteTenant", TenantDeleted
            ),
        },
        "/admin/tenants/{tenant_id}/quota": {
            "parameters": tenant,
            "put": _admin_op("Replace the quota", "setTenantQuota", Tenant, body=Quota),
        },
        "/admin/tenants/{tenant_id}/keys": {
            "parameters": tenant,
            "post": _admin_op(
                "Issue an API key (the key is shown only here)",
                "issueApiKey",
                IssuedApiKey,
                body=KeyCreate,
                body_required=False,
                status=201,
            ),
            "get": _admin_op("List the tenant's keys", "listApiKeys", ApiKeyList),
        },
        "/admin/tenants/{tenant_id}/keys/{key_id}": {
            "parameters": key,
            "get": _admin_op("Describe an API key", "getApiKey", ApiKeyInfo),
            "delete": _admin_op("Revoke an API key", "revokeApiKey", ApiKeyInfo),
        },
        "/admin/tenants/{tenant_id}/keys/{key_id}/rotate": {
            "parameters": key,
            "post": _admin_op(
                "Issue a replacement key and revoke this one (after grace_s)",
                "rotateApiKey",
                IssuedApiKey,
                body=RotateKey,
                body_required=False,
                status=201,
            ),
        },
        "/admin/tenants/{tenant_id}/usage": {
            "parameters": tenant,
            "get": usage,
            "delete": {**reset, "operationId": "deleteTenantUsage"},
        },
        "/admin/tenants/{tenant_id}/usage/reset": {"parameters": tenant, "post": reset},
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
        {"200": _json(ModelCard, "The model"), **_errors(401, 404, 503)},
        "OpenAI",
    )
    retrieve["get"]["parameters"] = [model_param]
    list_models = _get(
        "List models",
        "listModels",
        {"200": _json(ModelList, "Served models"), **_errors(401, 503)},
        "OpenAI",
    )
    usage = _get(
        "Your usage: today, this month, the last hour by minute, and your quota",
        "getUsage",
        {"200": _json(TenantUsage, "Usage of the caller's tenant"), **_errors(401, 503)},
        "Tenants",
    )
    for op in (list_models, retrieve, usage):
        op["get"]["security"] = API_KEY
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
        "/v1/models": list_models,
        "/v1/models/{model}": retrieve,
        "/v1/usage": usage,
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
        "paths": {**paths, **_admin_paths()},
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
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
            },
        },
    }
