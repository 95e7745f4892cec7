"""Bodies of the admin API that the tenants library does not define itself.

Requests reuse `tenants.TenantCreate`, `TenantUpdate`, `Quota` and `KeyCreate`; responses reuse
`Tenant` and `Usage`. An API key is shown without its hash (`ApiKeyInfo`), and with its secret
only in the response that issues it (`IssuedApiKey`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tenants import ApiKey, IssuedKey, Tenant, Usage


class ApiKeyInfo(BaseModel):
    """An API key as the admin API shows it: never the key, never its hash."""

    key_id: str
    tenant_id: str
    prefix: str  # first characters of the key ("pg-AbCd"), to recognise it
    name: str | None = None
    created_at: datetime
    expires_at: datetime | None = None
    revoked: bool = False
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyInfo:
        return cls.model_validate(key.public())


class IssuedApiKey(ApiKeyInfo):
    """A new key: `key` is the only time the secret is ever shown."""

    key: str

    @classmethod
    def issued(cls, issued: IssuedKey) -> IssuedApiKey:
        return cls.model_validate(issued.response())


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Tenant]


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyInfo]


class TenantDeleted(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    deleted: Literal[True] = True


class RotateKey(BaseModel):
    """Body of `POST /admin/tenants/{id}/keys/{key_id}/rotate` (optional)."""

    model_config = ConfigDict(extra="forbid")

    grace_s: float = Field(default=0, ge=0, le=30 * 86400)  # old key stays valid this long


class TenantUsage(Usage):
    """`tenants.Usage` under its API name (the OpenAI `Usage` of a completion is another)."""
