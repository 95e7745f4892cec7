"""Pydantic models of the tenant domain: Tenant, Quota, ApiKey, Usage, Prefix, and the admin
payloads.

Models that are stored (Tenant, Quota, ApiKey) are frozen: a change is a `model_copy(update=...)`
written back through the store, so a model handed out can never alias the store's state.
All timestamps are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

# Tenant ids appear inside Redis key names and URLs: no braces, colons, spaces or glob characters.
TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TenantId = Annotated[str, Field(pattern=TENANT_ID_PATTERN)]
# Counts stay far below 2**53 so that Lua's doubles hold them exactly.
MAX_COUNT = 10**15
MAX_KEY_LIFETIME_S = 100 * 365 * 86400
PositiveCount = Annotated[StrictInt, Field(gt=0, le=MAX_COUNT)]
MAX_PRIORITY = 1000
MAX_WEIGHT = 1000

DEFAULT_TENANT_ID = "default"


class Quota(BaseModel):
    """Limits of one tenant, and its share of the engine. Every field is optional: absent or
    null means unlimited, or for `priority` and `weight` the default (0 and 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: PositiveCount | None = None
    tokens_per_minute: PositiveCount | None = None  # prompt + completion, reserved at admission
    max_concurrent_requests: PositiveCount | None = None
    tokens_per_day: PositiveCount | None = None  # UTC calendar day
    tokens_per_month: PositiveCount | None = None  # UTC calendar month
    max_tokens_per_request: PositiveCount | None = None  # bound on the request's `max_tokens`
    max_prefixes: PositiveCount | None = None  # registered prefixes (`/v1/prefixes`)
    max_pinned_blocks: PositiveCount | None = None  # KV blocks held by the tenant's pinned prefixes
    # The tenant's share of the engine (docs/fairness.md): KV blocks its running requests may
    # hold at once, its order under the priority policy (lower first), its weight under fair.
    max_kv_blocks: PositiveCount | None = None
    priority: Annotated[StrictInt, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] | None = None
    weight: Annotated[StrictInt, Field(ge=1, le=MAX_WEIGHT)] | None = None

    def limits(self) -> dict[str, int]:
        """The limits that are set, by field name."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Tenant(BaseModel):
    """A customer of the service. Its quota lives in the same stored document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: TenantId
    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, str] = Field(default_factory=dict)
    quota: Quota = Field(default_factory=Quota)
    disabled: bool = False  # a disabled tenant's keys fail authentication
    created_at: datetime
    updated_at: datetime


class TenantCreate(BaseModel):
    """Body of `POST /admin/tenants`."""

    model_config = ConfigDict(extra="forbid")

    id: TenantId
    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, str] = Field(default_factory=dict)
    quota: Quota = Field(default_factory=Quota)
    disabled: bool = False


class TenantUpdate(BaseModel):
    """Body of `PATCH /admin/tenants/{id}`: only the fields present are changed."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, str] | None = None
    quota: Quota | None = None
    disabled: bool | None = None

    def changes(self) -> dict[str, Any]:
        """The fields the client sent (null `name` clears it; null elsewhere is ignored)."""
        out: dict[str, Any] = {}
        for field in self.model_fields_set:
            value = getattr(self, field)
            if value is not None or field == "name":
                out[field] = value
        return out


class ApiKey(BaseModel):
    """What is stored about an API key: never the key itself, only its SHA-256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str
    tenant_id: TenantId
    key_hash: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    prefix: str  # first characters of the key, for display ("pg-AbCd")
    name: str | None = None
    created_at: datetime
    expires_at: datetime | None = None
    revoked: bool = False
    revoked_at: datetime | None = None

    def is_active(self, now: datetime) -> bool:
        """Not revoked and not expired at `now`."""
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, Any]:
        """JSON-ready view for the admin API (the hash is not shown)."""
        return self.model_dump(mode="json", exclude={"key_hash"})


class IssuedKey(BaseModel):
    """A freshly issued key: `key` is the only time the secret is ever available."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(repr=False)
    api_key: ApiKey

    def response(self) -> dict[str, Any]:
        """Body of `POST /admin/tenants/{id}/keys`: `{"key": "pg-...", "key_id": ..., ...}`."""
        return {"key": self.key, **self.api_key.public()}


class KeyCreate(BaseModel):
    """Body of `POST /admin/tenants/{id}/keys` (all optional)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    expires_at: datetime | None = None
    # Alternative to expires_at; at most a century (a datetime past year 9999 cannot exist).
    expires_in_s: Annotated[StrictInt, Field(gt=0, le=MAX_KEY_LIFETIME_S)] | None = None


class UsageCounters(BaseModel):
    """Counters of settled requests. `total_tokens` is what counts against the budgets."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # part of prompt_tokens served from the prefix cache
    total_tokens: int = 0  # settled charge (prompt + completion, full reservation if never settled)
    reserved_tokens: int = 0  # held by requests in flight, not yet settled


class PeriodUsage(UsageCounters):
    """Usage of one UTC calendar period (day "2025-01-31" or month "2025-01")."""

    period: str
    limit: int | None = None  # tokens_per_day / tokens_per_month
    remaining: int | None = None  # limit - total - reserved, floored at 0
    resets_at: datetime


class MinuteUsage(UsageCounters):
    """Usage settled during one UTC minute starting at `start`."""

    start: datetime


class Usage(BaseModel):
    """Body of `GET /admin/tenants/{id}/usage` and `GET /v1/usage`."""

    tenant_id: str
    as_of: datetime
    today: PeriodUsage
    this_month: PeriodUsage
    recent: list[MinuteUsage]  # minutes with activity, oldest first, last hour
    in_flight: int  # live concurrency leases
    quota: Quota


# Prefix names appear inside Redis hash fields and URLs.
PREFIX_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
PrefixName = Annotated[str, Field(pattern=PREFIX_NAME_PATTERN)]


def one_content(body: Any) -> Any:
    """A prefix body's check: exactly one of `messages` and `text`."""
    if (body.messages is None) == (body.text is None):
        raise ValueError("exactly one of 'messages' and 'text' is required")
    return body


class PrefixSpec(BaseModel):
    """What registering a prefix says: a name, its content (chat messages or text), whether to
    pin it, and its lease. Body of `POST /v1/prefixes` and `POST /admin/prefixes`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PrefixName
    messages: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    text: str | None = Field(default=None, min_length=1)
    pin: bool = False
    # The registration's lease: unused for this long, the prefix is forgotten and its pin ends.
    ttl_seconds: PositiveCount | None = None

    @model_validator(mode="after")
    def _one_content(self) -> PrefixSpec:
        return one_content(self)


class Prefix(BaseModel):
    """A registered prefix as stored, with its tokens, plus the live part a read adds
    (`expires_at`, counters: `LIVE_FIELDS`, kept apart from the document in the store)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    LIVE_FIELDS: ClassVar[frozenset[str]] = frozenset({"expires_at", "requests", "cached_tokens"})

    name: PrefixName
    owner: TenantId | None  # None: a public prefix (admin-registered, usable by every tenant)
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    token_ids: list[int]  # rendered by the gateway with the model's chat template
    num_blocks: int  # full KV blocks: what a hit can serve, and what a pin holds
    model: str  # whose tokenizer rendered token_ids
    pinned: bool = False
    ttl_seconds: int | None = None
    created_at: datetime
    expires_at: datetime | None = None  # the lease's end (moved by every use); None: never
    requests: int = 0  # requests that used it by reference
    cached_tokens: int = 0  # tokens those requests were served from the cache

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    @property
    def pinned_blocks(self) -> int:
        """What the prefix counts against `max_pinned_blocks`."""
        return self.num_blocks if self.pinned else 0

    def document(self) -> str:
        """The stored JSON: everything but the live fields."""
        return self.model_dump_json(exclude=set(self.LIVE_FIELDS))

    def public(self) -> dict[str, Any]:
        """JSON-ready view for the API: the content and state, not the token ids."""
        out = self.model_dump(mode="json", exclude={"token_ids", "owner", "model"})
        out["token_count"] = self.token_count
        out["public"] = self.owner is None
        return out
