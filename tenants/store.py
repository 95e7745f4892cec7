"""The `Store` protocol and the plain data its primitives exchange.

Two implementations keep the same semantics, checked by one contract suite:
`RedisStore` (shared by any number of gateway processes; each primitive is one round trip, the
admission and settlement ones a single Lua script) and `MemoryStore` (one process).

State of one tenant, as both stores hold it (Redis key names in brackets, `T` = `pg:{tenant}`)::

    tenant document            [T:tenant]        JSON of `Tenant`, quota included
    key records                [pg:key:<sha256>] JSON of `ApiKey`; [T:keys] key_id -> sha256
    requests window            [T:rpm]           bucket second -> requests admitted
    tokens window              [T:tpm]           bucket second -> tokens reserved / settled
    concurrency leases         [T:leases]        member -> expiry ms (zset)
    day / month counters       [T:day:<id>]      charged, reserved, requests, prompt_tokens,
                               [T:month:<id>]    completion_tokens, cached_tokens
    minute counters            [T:min:<minute>]  requests, prompt/completion/cached tokens
    prefixes                   [T:prefixes]      name -> JSON of `Prefix` (content, token ids)
    prefix state               [T:prefix_state]  <name>:pinned (blocks; pinned ones only),
                                                 <name>:ttl_ms (leased ones only),
                                                 <name>:requests, <name>:cached_tokens
    prefix leases              [T:prefix_leases] name -> lease end ms (zset; leased ones only)

Public prefixes (registered by the admin, usable by every tenant) have the same three keys under
`pg:public:` (no braces, so no tenant id can reach them).

A lease member is `lease_id|reserved|day|month`, so that reclaiming an expired lease knows which
reservation to release without another lookup.

Invariants:
- `charged` = settled tokens + reservations of admitted, unsettled requests; the budget check is
  `charged + cost <= limit`. `reserved` is the in-flight part of `charged`.
- A lease that expires unsettled is reclaimed by the next admission or usage read: its slot is
  freed and its reservation stays charged in full (`reserved` drops, `charged` does not). A late
  settlement still replaces the reservation with the real usage.
- Settlement charges the period and minute-window bucket of the *admission*; a tokens-window
  bucket that has already left the window is not adjusted.
- A prefix whose lease ended (`lease end <= now`) is forgotten, document, state and lease, by
  the next prefix call of its owner; until then no read returns it. Every use by reference moves
  its lease end to now + ttl. Registering a name again replaces the registration (counters
  start again from zero).
- A tenant's prefixes number at most `max_prefixes`, and its pinned prefixes' blocks sum to at
  most `max_pinned_blocks`, checked and stored in one step; a registration that does not grow a
  count is accepted even when a lowered quota is already exceeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .models import ApiKey, Prefix, Tenant
from .periods import Periods


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """Arguments of one admission; `periods.now_ms` is the instant of the decision."""

    tenant_id: str
    lease_id: str
    prompt_tokens: int
    max_tokens: int
    lease_ttl_ms: int
    periods: Periods

    @property
    def cost(self) -> int:
        """Tokens reserved: the most the request may use."""
        return self.prompt_tokens + self.max_tokens

    @property
    def member(self) -> str:
        """The lease member stored in the leases set."""
        p = self.periods
        return f"{self.lease_id}|{self.cost}|{p.day}|{p.month}"


@dataclass(slots=True)
class Ticket:
    """An admitted request: what settlement and lease renewal need. Kept by the gateway."""

    tenant_id: str
    lease_id: str
    member: str
    reserved: int
    day: str
    month: str
    tpm_bucket: int  # second the tokens were reserved in; -1: tokens_per_minute not tracked
    expires_ms: int  # lease expiry
    local: bool = False  # admitted by the local fallback store while Redis was down
    settled: bool = False


@dataclass(frozen=True, slots=True)
class WindowState:
    """One per-minute limit at decision time (after the charge when admitted)."""

    limit: int
    used: int
    reset_ms: int  # until the window holds nothing (OpenAI: "resets to its initial state")

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)


@dataclass(frozen=True, slots=True)
class Refusal:
    """One limit that refused a request."""

    limit: str  # Quota field name
    retry_ms: int | None  # until the request would fit; None: it never fits in this limit
    hard: bool  # budget spent by settled usage (insufficient_quota), not by requests in flight
    value: int  # the limit
    used: int  # what counts against it now
    requested: int  # what this request asked for


@dataclass(frozen=True, slots=True)
class AdmitResult:
    """Raw outcome of an admission; `quotas.decide` turns it into an `AdmissionDecision`."""

    admitted: bool
    requests: WindowState | None  # None: requests_per_minute unlimited
    tokens: WindowState | None  # None: tokens_per_minute unlimited
    in_flight: int  # live leases after the decision
    refusals: tuple[Refusal, ...] = ()  # in priority order; empty when admitted
    ticket: Ticket | None = None


@dataclass(frozen=True, slots=True)
class Consumption:
    """What a finished request really used (cached tokens are part of prompt tokens)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """Result of an authentication lookup: the key record and its tenant."""

    key: ApiKey
    tenant: Tenant | None  # None if the tenant vanished


@dataclass(frozen=True, slots=True)
class RawUsage:
    """Counters as stored, read in one go; fields are the stored counter names."""

    day: dict[str, int]
    month: dict[str, int]
    minutes: dict[int, dict[str, int]] = field(default_factory=dict)  # epoch minute -> counters
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class PrefixPut:
    """Outcome of registering a prefix: stored (with the registration it replaced, if any), or
    refused by the owner's prefix limits (`Refusal.limit`: max_prefixes, max_pinned_blocks)."""

    stored: bool
    replaced: Prefix | None = None
    refusals: tuple[Refusal, ...] = ()


@runtime_checkable
class Store(Protocol):
    """Primitives the tenant service is written against. Every method may raise
    `StoreUnavailable` (only `RedisStore` does). Times come from the caller, never the store."""

    async def create_tenant(self, tenant: Tenant) -> bool:
        """Insert; False if a tenant with this id exists."""
        ...

    async def get_tenant(self, tenant_id: str) -> Tenant | None: ...

    async def list_tenants(self) -> list[Tenant]:
        """All tenants, sorted by id."""
        ...

    async def replace_tenant(self, tenant: Tenant) -> bool:
        """Overwrite an existing tenant; False if it does not exist."""
        ...

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete a tenant with its keys, windows, leases and usage; False if absent."""
        ...

    async def add_key(self, key: ApiKey) -> bool:
        """Store a new key record; False if its tenant does not exist."""
        ...

    async def replace_key(self, key: ApiKey) -> bool:
        """Overwrite an existing key record (revoke, change expiry); False if absent."""
        ...

    async def get_key(self, tenant_id: str, key_id: str) -> ApiKey | None: ...

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        """Keys of a tenant, sorted by creation time."""
        ...

    async def find_key(self, key_hash: str) -> KeyLookup | None:
        """Authentication lookup by SHA-256 hex: one round trip, same work found or not."""
        ...

    async def admit(self, req: AdmitRequest) -> AdmitResult | None:
        """Check every limit and, if all pass, take a lease and reserve `req.cost` tokens,
        atomically. None if the tenant does not exist."""
        ...

    async def settle(self, ticket: Ticket, used: Consumption, periods: Periods) -> bool:
        """Release the lease and replace the reservation with `used`, atomically.
        `periods` is the instant of settlement (its minute gets the usage). A ticket with an
        empty member and 0 reserved just records usage. Returns whether the lease was live."""
        ...

    async def renew(self, ticket: Ticket, expires_ms: int, now_ms: int) -> bool:
        """Extend a live lease to `expires_ms`; False if it has expired or been settled."""
        ...

    async def read_usage(self, tenant_id: str, periods: Periods) -> RawUsage:
        """Counters of the day, month and recent minutes of `periods` (reclaims expired leases)."""
        ...

    async def reset_usage(self, tenant_id: str, periods: Periods) -> None:
        """Zero the day, month and minute counters and the per-minute windows. Reservations of
        requests in flight stay, so their settlement remains exact."""
        ...

    async def put_prefix(self, prefix: Prefix, now_ms: int) -> PrefixPut | None:
        """Register `prefix` under `prefix.owner` (None: public), replacing a registration of the
        same name, within the owner's `max_prefixes` and `max_pinned_blocks`, atomically. Its
        lease, if it has a TTL, ends at `now_ms + ttl`. None if the owner tenant does not exist."""
        ...

    async def get_prefix(self, owner: str | None, name: str, now_ms: int) -> Prefix | None:
        """A live prefix with its lease end and counters, or None."""
        ...

    async def list_prefixes(self, owner: str | None, now_ms: int) -> list[Prefix]:
        """The owner's live prefixes, sorted by name."""
        ...

    async def delete_prefix(self, owner: str | None, name: str, now_ms: int) -> Prefix | None:
        """Forget a prefix; returns the registration it was (None if absent)."""
        ...

    async def use_prefix(
        self, owners: Sequence[str | None], name: str, now_ms: int
    ) -> Prefix | None:
        """Resolve `name` for a request: the first of `owners` holding it (a tenant's own names
        shadow public ones), counting the request and extending its lease, in one step."""
        ...

    async def count_prefix_tokens(self, owner: str | None, name: str, cached_tokens: int) -> None:
        """Add the cached tokens a request that used the prefix was served (if it still exists)."""
        ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` if the store cannot answer."""
        ...

    async def aclose(self) -> None: ...
