"""Wire models shared by every audience: the error body and the operations endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


def is_none(value: object) -> bool:
    """`exclude_if` predicate: leave a field out of the JSON while it is None."""
    return value is None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready", "loading", "failed", "unavailable"]
    model: str
    # With Redis configured only: whether it answers.
    tenant_store: Literal["ok", "unavailable"] | None = Field(default=None, exclude_if=is_none)
    detail: str | None = None
