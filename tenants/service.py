"""`TenantService`: what the gateway calls for auth, admission, settlement and the admin API.

Per request, the gateway makes three store round trips::

    caller = await svc.authenticate(bearer_token(headers.get("authorization")))   # 1
    decision = await svc.admit(caller.tenant_id, prompt_tokens=n, max_tokens=m)  # 1
    if not decision.admitted: refuse (the gateway: 429, or 400 for max_tokens_per_request)
    async with svc.hold(decision.ticket):        # renews the lease during long streams
        ... generate, stream, add decision.headers to the response ...
    await svc.settle(decision.ticket, prompt_tokens=..., completion_tokens=..., cached_tokens=...)
                                                                                  # 1, in `finally`

Errors are `TenantsError` subclasses (typed; the gateway picks their HTTP status and body).
While Redis is unreachable (see `failover.py`): in `closed` mode authenticate/admit raise
`StoreUnavailable` (503); in `open` mode keys seen before are accepted from a last-known cache
and admission runs on a per-process `MemoryStore` with the tenant's last-known quota (each
gateway process enforces the full limits on its own). Settlement never raises for an outage:
it is queued and replayed when Redis answers again. Admin operations raise `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import (
    AuthenticationError,
    ConflictError,
    InvalidError,
    KeyNotFound,
    PrefixLimitExceeded,
    PrefixNotFound,
    StoreUnavailable,
    TenantNotFound,
)
from .failover import FailureMode, StoreGuard
from .keys import digests_match, hash_key, new_api_key
from .memory_store import MemoryStore
from .models import (
    DEFAULT_TENANT_ID,
    MAX_COUNT,
    ApiKey,
    IssuedKey,
    KeyCreate,
    MinuteUsage,
    PeriodUsage,
    Prefix,
    PrefixSpec,
    Quota,
    Tenant,
    TenantCreate,
    TenantUpdate,
    Usage,
)
from .periods import UTC, Periods, to_ms, utc
from .quotas import AdmissionDecision, decide
from .store import AdmitRequest, Consumption, KeyLookup, Refusal, Store, Ticket

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("prefixgate.tenants")

_NO_MATCH = "0" * 64  # compared against on a miss, so a miss does the comparison too


@dataclass(frozen=True, slots=True)
class PrefixRegistration:
    """A registered prefix, and the registration of the same name it replaced (to unpin)."""

    prefix: Prefix
    replaced: Prefix | None = None


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller."""

    tenant: Tenant
    key_id: str
    degraded: bool = False  # accepted from the last-known cache while Redis was down

    @property
    def tenant_id(self) -> str:
        return self.tenant.id


class TenantService:
    """Tenants, keys, quotas and usage over a `Store`. One per gateway process.

    Args:
        store: `RedisStore` (shared) or `MemoryStore` (embedded); see `config.build_store`.
        clock: epoch seconds; tests pass a fake one. Every time the store sees comes from it.
        failure_mode: `closed` (default) or `open`, see the module docstring.
        lease_ttl_s: a concurrency slot is released this long after admission (or the last
            renewal) if the request is never settled, e.g. because its gateway crashed.
        breaker_cooldown_s: after a store failure, fail fast for this long before probing.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        failure_mode: FailureMode | str = FailureMode.CLOSED,
        lease_ttl_s: float = 300.0,
        breaker_cooldown_s: float = 1.0,
        max_pending_settlements: int = 10_000,
        known_keys_size: int = 10_000,
    ) -> None:
        self.store = store
        self.clock = clock
        self.failure_mode = FailureMode(failure_mode)
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self.guard = StoreGuard(
            store,
            clock=clock,
            failure_mode=self.failure_mode,
            cooldown_s=breaker_cooldown_s,
            max_pending=max_pending_settlements,
        )
        self.stats = self.guard.stats  # for the metrics exporter
        self._local = MemoryStore()  # per-process fallback (open mode)
        self._known_keys: OrderedDict[str, KeyLookup] = OrderedDict()  # sha256 -> last lookup
        self._known_keys_size = known_keys_size
        self._known_tenants: dict[str, Tenant] = {}
        self._last_fallback_log = float("-inf")

    def _now(self) -> tuple[float, datetime]:
        now = self.clock()
        return now, utc(to_ms(now))

    # -- authentication -----------------------------------------------------------------------

    async def authenticate(self, presented: str | None) -> Caller:
        """The caller of a bearer token (None or "" for a missing header).

        Missing, malformed, unknown, revoked and expired keys and disabled tenants all raise the
        same `AuthenticationError`, after the same work: one hash, one lookup, one comparison.

        Raises:
            AuthenticationError: 401.
            StoreUnavailable: 503 (in `open` mode only for keys this process has not seen).
        """
        digest = hash_key(presented or "")
        _, now = self._now()
        degraded = False
        try:
            found = await self.guard.call(lambda: self.store.find_key(digest))
        except StoreUnavailable:
            found = self._known_keys.get(digest) if self.failure_mode is FailureMode.OPEN else None
            if found is None:
                raise
            degraded = True
            self.stats.fallback_authentications_total += 1
        matches = digests_match(found.key.key_hash if found else _NO_MATCH, digest)
        if not (found and matches and found.tenant and found.key.is_active(now)):
            self._known_keys.pop(digest, None)
            raise AuthenticationError()
        if found.tenant.disabled:
            raise AuthenticationError()
        if not degraded:
            self._remember(digest, found)
        return Caller(tenant=found.tenant, key_id=found.key.key_id, degraded=degraded)

    async def default_caller(self) -> Caller:
        """Embedded mode without an admin key: requests without a key act as tenant `default`
        (created unlimited on first use). The gateway must not call this in any other mode."""
        tenant = await self.ensure_tenant(DEFAULT_TENANT_ID)
        self._known_tenants[tenant.id] = tenant
        return Caller(tenant=tenant, key_id="")

    def _remember(self, digest: str, found: KeyLookup) -> None:
        """Last-known good lookups, kept for `open` mode only (bounded, LRU)."""
        if self.failure_mode is not FailureMode.OPEN:
            return
        self._known_keys[digest] = found
        self._known_keys.move_to_end(digest)
        while len(self._known_keys) > self._known_keys_size:
            self._known_keys.popitem(last=False)
        if found.tenant:
            self._known_tenants[found.tenant.id] = found.tenant

    # -- admission, settlement, leases --------------------------------------------------------

    async def admit(
        self, tenant_id: str, *, prompt_tokens: int, max_tokens: int
    ) -> AdmissionDecision:
        """Check every limit and, if all pass, take a concurrency lease and reserve
        `prompt_tokens + max_tokens` tokens: one store round trip.

        Args:
            prompt_tokens: tokens of the rendered prompt (cached ones included).
            max_tokens: the most the request may generate; the gateway passes the request's
                `max_tokens`, or, when absent, what the context window leaves.

        Returns:
            The decision; when admitted, keep `decision.ticket` and settle it exactly once.

        Raises:
            TenantNotFound, InvalidError (negative counts), StoreUnavailable (closed mode).
        """
        for name, value in (("prompt_tokens", prompt_tokens), ("max_tokens", max_tokens)):
            if not 0 <= value <= MAX_COUNT:
                raise InvalidError(f"{name} must be between 0 and {MAX_COUNT}.", param=name)
        now, _ = self._now()
        req = AdmitRequest(
            tenant_id=tenant_id,
            lease_id=uuid.uuid4().hex,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            lease_ttl_ms=self.lease_ttl_ms,
            periods=Periods.at(now),
        )
        try:
            result = await self.guard.call(lambda: self.store.admit(req))
        except StoreUnavailable:
            if self.failure_mode is not FailureMode.OPEN:
                raise
            return await self._admit_locally(req)
        if result is None:
            raise TenantNotFound(tenant_id)
        return decide(tenant_id, result)

    async def _admit_locally(self, req: AdmitRequest) -> AdmissionDecision:
        tenant = self._known_tenants.get(req.tenant_id)
        if tenant is None:
            raise StoreUnavailable("tenant not known to this process")
        if not await self._local.replace_tenant(tenant):
            await self._local.create_tenant(tenant)
        result = await self._local.admit(req)
        assert result is not None
        if result.ticket is not None:
            result.ticket.local = True
        self.stats.fallback_admissions_total += 1
        if self.clock() - self._last_fallback_log >= 10.0:
            self._last_fallback_log = self.clock()
            log.warning("tenant store down: admitting with per-process limits (open mode)")
        return decide(req.tenant_id, result, degraded=True)

    async def settle(
        self, ticket: Ticket, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> None:
        """Release the lease and charge the real usage instead of the reservation. Call exactly
        once per admitted request, whatever its end (success, error, client disconnect: pass
        what was generated, possibly 0). Never raises for an outage: it is queued and replayed.
        A second call for the same ticket does nothing."""
        if ticket.settled:
            return
        ticket.settled = True
        used = Consumption(prompt_tokens, completion_tokens, cached_tokens)
        now, _ = self._now()
        periods = Periods.at(now)
        if ticket.local:
            await self._local.settle(ticket, used, periods)
            usage_only = Ticket(
                tenant_id=ticket.tenant_id,
                lease_id=ticket.lease_id,
                member="",
                reserved=0,
                day=ticket.day,
                month=ticket.month,
                tpm_bucket=-1,
                expires_ms=0,
            )
            self.guard.defer(usage_only, used, periods)
            return
        try:
            await self.guard.call(lambda: self.store.settle(ticket, used, periods))
        except StoreUnavailable:
            self.guard.defer(ticket, used, periods)

    async def renew(self, ticket: Ticket) -> bool:
        """Extend the ticket's lease by `lease_ttl_s` from now; False if it was lost."""
        now, _ = self._now()
        now_ms = to_ms(now)
        expires = now_ms + self.lease_ttl_ms
        try:
            if ticket.local:
                ok = await self._local.renew(ticket, expires, now_ms)
            else:
                ok = await self.guard.call(lambda: self.store.renew(ticket, expires, now_ms))
        except StoreUnavailable:
            return False
        if ok:
            ticket.expires_ms = expires
        return ok

    @contextlib.asynccontextmanager
    async def hold(self, ticket: Ticket | None) -> AsyncIterator[None]:
        """Renew the ticket's lease every third of its TTL while the block runs.

        Leaving the block stops the renewals without cancelling one in progress: it ends within
        the store's deadline. A cancellation landing in the middle of a Redis call can be
        swallowed by the client, and the loop then renewed for ever while the settlement that
        follows the block waited on it (bench/soak.py found such requests: lease held,
        reservation never replaced)."""
        if ticket is None:
            yield
            return
        stop = asyncio.Event()
        task = asyncio.ensure_future(self._keep_alive(ticket, stop))
        try:
            yield
        finally:
            stop.set()
            await task

    async def _keep_alive(self, ticket: Ticket, stop: asyncio.Event) -> None:
        while not ticket.settled:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease_ttl_ms / 3000)
            if stop.is_set():
                return
            if not ticket.settled and not await self.renew(ticket):
                log.warning("lease %s of tenant %s lost", ticket.lease_id, ticket.tenant_id)

    async def flush_pending(self) -> int:
        """Replay queued settlements now (they also replay by themselves after any successful
        store call); returns how many were replayed."""
        return await self.guard.flush()

    # -- tenants ------------------------------------------------------------------------------

    async def create_tenant(self, spec: TenantCreate | Mapping[str, Any]) -> Tenant:
        """Raises ConflictError if the id exists, InvalidError for a bad body."""
        spec = _parse(TenantCreate, spec)
        _, now = self._now()
        tenant = Tenant(**spec.model_dump(), created_at=now, updated_at=now)
        if not await self.guard.call(lambda: self.store.create_tenant(tenant)):
            raise ConflictError(f"Tenant '{spec.id}' already exists.", code="tenant_exists")
        return tenant

    async def ensure_tenant(self, tenant_id: str, quota: Quota | None = None) -> Tenant:
        """The tenant, created first if missing (the embedded `default` tenant)."""
        try:
            return await self.create_tenant(TenantCreate(id=tenant_id, quota=quota or Quota()))
        except ConflictError:
            return await self.get_tenant(tenant_id)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        tenant = await self.guard.call(lambda: self.store.get_tenant(tenant_id))
        if tenant is None:
            raise TenantNotFound(tenant_id)
        self._known_tenants[tenant_id] = tenant
        return tenant

    async def list_tenants(self) -> list[Tenant]:
        return await self.guard.call(self.store.list_tenants)

    async def update_tenant(
        self, tenant_id: str, patch: TenantUpdate | Mapping[str, Any]
    ) -> Tenant:
        """Change the fields present in `patch` (JSON merge patch: inside `quota`, only the
        limits sent change, and `null` makes one unlimited). Last writer wins."""
        update = _parse(TenantUpdate, patch)
        changes = update.changes()
        if update.quota is not None:
            current = await self.get_tenant(tenant_id)
            sent = update.quota.model_dump(include=update.quota.model_fields_set)
            changes["quota"] = Quota(**{**current.quota.model_dump(), **sent})
        return await self._replace(tenant_id, changes)

    async def set_quota(self, tenant_id: str, quota: Quota | Mapping[str, Any]) -> Tenant:
        """Replace the whole quota (PUT); takes effect at the next admission."""
        return await self._replace(tenant_id, {"quota": _parse(Quota, quota)})

    async def _replace(self, tenant_id: str, changes: dict[str, Any]) -> Tenant:
        current = await self.get_tenant(tenant_id)
        _, now = self._now()
        tenant = current.model_copy(update={**changes, "updated_at": now})
        tenant = Tenant.model_validate(tenant.model_dump())  # re-validate the merged document
        if not await self.guard.call(lambda: self.store.replace_tenant(tenant)):
            raise TenantNotFound(tenant_id)
        self._known_tenants[tenant_id] = tenant
        return tenant

    async def delete_tenant(self, tenant_id: str) -> None:
        """Delete the tenant, its keys (refused at once), windows, leases and usage."""
        if not await self.guard.call(lambda: self.store.delete_tenant(tenant_id)):
            raise TenantNotFound(tenant_id)
        self._forget(lambda k: k.tenant_id == tenant_id)
        self._known_tenants.pop(tenant_id, None)

    def _forget(self, match: Callable[[ApiKey], bool]) -> None:
        for digest in [d for d, f in self._known_keys.items() if match(f.key)]:
            del self._known_keys[digest]

    # -- keys ---------------------------------------------------------------------------------

    async def issue_key(
        self, tenant_id: str, spec: KeyCreate | Mapping[str, Any] | None = None
    ) -> IssuedKey:
        """A new key for the tenant; `IssuedKey.key` is the only time the secret is shown."""
        spec = _parse(KeyCreate, spec or {})
        _, now = self._now()
        expires_at = spec.expires_at
        if spec.expires_in_s is not None:
            expires_at = now + timedelta(seconds=spec.expires_in_s)
        if expires_at is not None:
            if expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=UTC)
            if expires_at <= now:
                raise InvalidError("expires_at must be in the future.", param="expires_at")
        key, record = new_api_key(tenant_id, now, spec.name, expires_at)
        if not await self.guard.call(lambda: self.store.add_key(record)):
            raise TenantNotFound(tenant_id)
        return IssuedKey(key=key, api_key=record)

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        await self.get_tenant(tenant_id)
        return await self.guard.call(lambda: self.store.list_keys(tenant_id))

    async def get_key(self, tenant_id: str, key_id: str) -> ApiKey:
        key = await self.guard.call(lambda: self.store.get_key(tenant_id, key_id))
        if key is None:
            raise KeyNotFound(tenant_id, key_id)
        return key

    async def revoke_key(self, tenant_id: str, key_id: str) -> ApiKey:
        """Revoke now: every gateway refuses the key from its next lookup on."""
        key = await self.get_key(tenant_id, key_id)
        if key.revoked:
            return key
        _, now = self._now()
        return await self._replace_key(key.model_copy(update={"revoked": True, "revoked_at": now}))

    async def rotate_key(self, tenant_id: str, key_id: str, *, grace_s: float = 0) -> IssuedKey:
        """Issue a new key with the old one's name, then revoke the old one (after `grace_s`
        seconds, through its expiry, if given)."""
        old = await self.get_key(tenant_id, key_id)
        issued = await self.issue_key(tenant_id, KeyCreate(name=old.name))
        if grace_s > 0:
            _, now = self._now()
            until = now + timedelta(seconds=grace_s)
            if old.expires_at is None or until < old.expires_at:
                await self._replace_key(old.model_copy(update={"expires_at": until}))
        else:
            await self.revoke_key(tenant_id, key_id)
        return issued

    async def _replace_key(self, key: ApiKey) -> ApiKey:
        if not await self.guard.call(lambda: self.store.replace_key(key)):
            raise KeyNotFound(key.tenant_id, key.key_id)
        self._forget(lambda k: k.key_id == key.key_id)
        return key

    # -- usage --------------------------------------------------------------------------------

    async def get_usage(self, tenant_id: str) -> Usage:
        """Today, this month (UTC) and the last hour by minute."""
        tenant = await self.get_tenant(tenant_id)
        now, as_of = self._now()
        periods = Periods.at(now)
        raw = await self.guard.call(lambda: self.store.read_usage(tenant_id, periods))
        q = tenant.quota
        return Usage(
            tenant_id=tenant_id,
            as_of=as_of,
            today=_period(periods.day, raw.day, q.tokens_per_day, periods.day_end_ms),
            this_month=_period(periods.month, raw.month, q.tokens_per_month, periods.month_end_ms),
            recent=[
                MinuteUsage(start=utc(m * 60_000), **_counters(c))
                for m, c in sorted(raw.minutes.items())
            ],
            in_flight=raw.in_flight,
            quota=q,
        )

    async def reset_usage(self, tenant_id: str) -> None:
        """Zero today's and this month's usage and the per-minute windows."""
        await self.get_tenant(tenant_id)
        now, _ = self._now()
        await self.guard.call(lambda: self.store.reset_usage(tenant_id, Periods.at(now)))

    # -- prefixes -----------------------------------------------------------------------------
    # `owner` is a tenant id, or None for the public prefixes (admin-registered).

    async def register_prefix(
        self,
        owner: str | None,
        spec: PrefixSpec | Mapping[str, Any],
        *,
        token_ids: list[int],
        block_size: int,
        model: str,
    ) -> PrefixRegistration:
        """Register (or replace) a prefix whose content the caller has rendered to `token_ids`.

        Raises:
            InvalidError: a bad spec. TenantNotFound: no such owner.
            PrefixLimitExceeded: over `max_prefixes` or `max_pinned_blocks` (the message says
                which and by how much).
        """
        spec = _parse(PrefixSpec, spec)
        now_ms = to_ms(self.clock())
        prefix = Prefix(
            name=spec.name,
            owner=owner,
            messages=spec.messages,
            text=spec.text,
            token_ids=token_ids,
            num_blocks=len(token_ids) // block_size,
            model=model,
            pinned=spec.pin,
            ttl_seconds=spec.ttl_seconds,
            created_at=utc(now_ms),
        )
        put = await self.guard.call(lambda: self.store.put_prefix(prefix, now_ms))
        if put is None:
            raise TenantNotFound(owner or "")
        if not put.stored:
            raise PrefixLimitExceeded(_prefix_refusal(prefix, put.refusals))
        expires = None if spec.ttl_seconds is None else utc(now_ms + spec.ttl_seconds * 1000)
        return PrefixRegistration(prefix.model_copy(update={"expires_at": expires}), put.replaced)

    async def restore_prefix(self, prefix: Prefix) -> None:
        """Put a registration back as it was (one that a refused replacement displaced); its
        lease starts again from now and its counters from zero."""
        now_ms = to_ms(self.clock())
        await self.guard.call(lambda: self.store.put_prefix(prefix, now_ms))

    async def get_prefix(self, owner: str | None, name: str) -> Prefix:
        """Raises PrefixNotFound (also for another owner's names)."""
        now_ms = to_ms(self.clock())
        found = await self.guard.call(lambda: self.store.get_prefix(owner, name, now_ms))
        if found is None:
            raise PrefixNotFound(name)
        return found

    async def list_prefixes(self, owner: str | None) -> list[Prefix]:
        now_ms = to_ms(self.clock())
        return await self.guard.call(lambda: self.store.list_prefixes(owner, now_ms))

    async def delete_prefix(self, owner: str | None, name: str) -> Prefix:
        """Forget a prefix; returns what it was (the caller unpins it). Raises PrefixNotFound."""
        now_ms = to_ms(self.clock())
        found = await self.guard.call(lambda: self.store.delete_prefix(owner, name, now_ms))
        if found is None:
            raise PrefixNotFound(name)
        return found

    async def use_prefix(self, tenant_id: str, name: str) -> Prefix:
        """Resolve `name` for a request of `tenant_id`: its own prefix, else a public one.
        Counts the request and extends the lease (one store round trip).

        Raises:
            PrefixNotFound: neither the tenant nor the public registry has it.
        """
        now_ms = to_ms(self.clock())
        owners = (tenant_id, None)
        found = await self.guard.call(lambda: self.store.use_prefix(owners, name, now_ms))
        if found is None:
            raise PrefixNotFound(name)
        return found

    async def count_prefix_tokens(self, prefix: Prefix, cached_tokens: int) -> None:
        """Add the cached tokens a request that used `prefix` was served. A counter: an outage
        drops it (logged) rather than fail the request."""
        try:
            await self.guard.call(
                lambda: self.store.count_prefix_tokens(prefix.owner, prefix.name, cached_tokens)
            )
        except StoreUnavailable as exc:
            log.warning("prefix counter of %r not recorded: %s", prefix.name, exc.detail)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """At gateway startup: load the Lua scripts into Redis. Never raises for an outage
        (logged; the scripts load on first use once Redis is back)."""
        load = getattr(self.store, "load_scripts", None)
        if load is None:
            return
        try:
            await self.guard.call(load)
        except StoreUnavailable as exc:
            log.error("could not load scripts at startup: %s", exc.detail)

    async def check(self) -> bool:
        """Readiness: whether the store answers now (through the breaker). Also lets queued
        settlements replay once the store is back, so a gateway may call it periodically."""
        try:
            await self.guard.call(self.store.ping)
        except StoreUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        """Stop background replay and close the store."""
        await self.guard.aclose()
        await self.store.aclose()


def _parse(model: type[M], data: M | Mapping[str, Any]) -> M:
    """Validate an admin body, mapping pydantic errors to `InvalidError` (400)."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise InvalidError(f"Invalid value for '{param}': {err['msg']}.", param=param) from None


_PREFIX_LIMIT_UNITS = {"max_prefixes": "Registered", "max_pinned_blocks": "Pinned"}


def _prefix_refusal(prefix: Prefix, refusals: tuple[Refusal, ...]) -> str:
    """Which limits refused the registration, and by how much."""
    whose = "the public registry" if prefix.owner is None else f"tenant '{prefix.owner}'"
    parts = [
        f"{r.limit} of {whose} by {r.used + r.requested - r.value} (Limit {r.value}, "
        f"{_PREFIX_LIMIT_UNITS.get(r.limit, 'Used')} {r.used}, Requested {r.requested})"
        for r in refusals
    ]
    return f"Registering prefix '{prefix.name}' would exceed " + " and ".join(parts) + "."


def _counters(raw: Mapping[str, int]) -> dict[str, int]:
    prompt, completion = raw.get("prompt_tokens", 0), raw.get("completion_tokens", 0)
    return {
        "requests": raw.get("requests", 0),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": raw.get("cached_tokens", 0),
        "total_tokens": raw.get("charged", prompt + completion) - raw.get("reserved", 0),
        "reserved_tokens": raw.get("reserved", 0),
    }


def _period(name: str, raw: Mapping[str, int], limit: int | None, end_ms: int) -> PeriodUsage:
    counters = _counters(raw)
    remaining = None
    if limit is not None:
        remaining = max(limit - raw.get("charged", 0), 0)
    return PeriodUsage(
        period=name, limit=limit, remaining=remaining, resets_at=utc(end_ms), **counters
    )
