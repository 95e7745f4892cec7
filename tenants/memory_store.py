"""In-process `Store`: the embedded default, and the per-process fallback when Redis is down.

It follows `lua/*.lua` step by step (same names, same order of checks), with the same
semantics as `RedisStore` (see `store.py`); the contract suite runs both. Every method runs to
completion without awaiting, so it is atomic for asyncio; a lock also makes it thread-safe.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .models import ApiKey, Prefix, Quota, Tenant
from .periods import (
    DAY_TTL_S,
    MINUTE_TTL_S,
    MONTH_TTL_S,
    Periods,
    bucket_expiry_ms,
    bucket_of,
    oldest_live_bucket,
    utc,
)
from .store import (
    AdmitRequest,
    AdmitResult,
    Consumption,
    KeyLookup,
    PrefixPut,
    RawUsage,
    Refusal,
    Ticket,
    WindowState,
)

RETRY_SOFT_MS = 1000  # retry hint when capacity is held by requests in flight


@dataclass(slots=True)
class _TenantState:
    tenant: Tenant
    key_ids: dict[str, str] = field(default_factory=dict)  # key_id -> sha256
    rpm: dict[int, int] = field(default_factory=dict)  # bucket -> requests
    tpm: dict[int, int] = field(default_factory=dict)  # bucket -> tokens
    leases: dict[str, int] = field(default_factory=dict)  # member -> expiry ms
    periods: dict[str, Counter[str]] = field(default_factory=dict)  # "day:<id>" -> counters
    period_expiry: dict[str, int] = field(default_factory=dict)  # "day:<id>" -> expiry ms
    minutes: dict[int, Counter[str]] = field(default_factory=dict)  # epoch minute -> counters
    prefixes: _PrefixTable = field(default_factory=lambda: _PrefixTable())


@dataclass(slots=True)
class _PrefixTable:
    """One owner's prefix registry; mirrors lua/*_prefix*.lua (same keys, same steps)."""

    docs: dict[str, Prefix] = field(default_factory=dict)  # name -> stored registration
    state: Counter[str] = field(default_factory=Counter)  # <name>:pinned / :ttl_ms / counters
    leases: dict[str, int] = field(default_factory=dict)  # name -> lease end ms

    def forget(self, name: str) -> None:
        self.docs.pop(name, None)
        for f in _PREFIX_FIELDS:
            self.state.pop(name + f, None)
        self.leases.pop(name, None)

    def purge(self, now: int) -> None:
        for name in [n for n, end in self.leases.items() if end <= now]:
            self.forget(name)

    def read(self, name: str) -> Prefix | None:
        doc = self.docs.get(name)
        if doc is None:
            return None
        end = self.leases.get(name)
        return doc.model_copy(
            update={
                "expires_at": utc(end) if end is not None else None,
                "requests": self.state[name + ":requests"],
                "cached_tokens": self.state[name + ":cached_tokens"],
            }
        )

    def put(self, prefix: Prefix, quota: Quota, now: int) -> PrefixPut:
        """Mirror of lua/put_prefix.lua."""
        self.purge(now)
        name = prefix.name
        old = self.docs.get(name)
        refusals: list[Refusal] = []
        count = len(self.docs)
        if quota.max_prefixes is not None and old is None and count + 1 > quota.max_prefixes:
            refusals.append(Refusal("max_prefixes", None, False, quota.max_prefixes, count, 1))
        pinned = prefix.pinned_blocks
        if quota.max_pinned_blocks is not None and pinned > 0:
            used = sum(
                v for k, v in self.state.items() if k.endswith(":pinned") and k != name + ":pinned"
            )
            if used + pinned > quota.max_pinned_blocks:
                limit = quota.max_pinned_blocks
                refusals.append(Refusal("max_pinned_blocks", None, False, limit, used, pinned))
        if refusals:
            return PrefixPut(stored=False, refusals=tuple(refusals))
        self.forget(name)
        self.docs[name] = prefix.model_copy(
            update={"expires_at": None, "requests": 0, "cached_tokens": 0}
        )
        if pinned > 0:
            self.state[name + ":pinned"] = pinned
        if prefix.ttl_seconds:
            ttl = prefix.ttl_seconds * 1000
            self.state[name + ":ttl_ms"] = ttl
            self.leases[name] = now + ttl
        return PrefixPut(stored=True, replaced=old)

    def use(self, name: str, now: int) -> Prefix | None:
        """One owner's part of lua/use_prefix.lua."""
        self.purge(now)
        if name not in self.docs:
            return None
        self.state[name + ":requests"] += 1
        ttl = self.state.get(name + ":ttl_ms")
        if ttl is not None:
            self.leases[name] = now + ttl
        return self.read(name)


_PREFIX_FIELDS = (":pinned", ":ttl_ms", ":requests", ":cached_tokens")


class MemoryStore:
    """A `Store` held in this process's memory."""

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantState] = {}
        self._keys: dict[str, ApiKey] = {}  # sha256 -> record
        self._public = _PrefixTable()  # public prefixes
        self._lock = threading.Lock()

    # -- tenants ------------------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant) -> bool:
        with self._lock:
            if tenant.id in self._tenants:
                return False
            self._tenants[tenant.id] = _TenantState(tenant)
            return True

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        st = self._tenants.get(tenant_id)
        return st.tenant if st else None

    async def list_tenants(self) -> list[Tenant]:
        with self._lock:
            return [self._tenants[t].tenant for t in sorted(self._tenants)]

    async def replace_tenant(self, tenant: Tenant) -> bool:
        with self._lock:
            st = self._tenants.get(tenant.id)
            if st is None:
                return False
            st.tenant = tenant
            return True

    async def delete_tenant(self, tenant_id: str) -> bool:
        with self._lock:
            st = self._tenants.pop(tenant_id, None)
            if st is None:
                return False
            for digest in st.key_ids.values():
                self._keys.pop(digest, None)
            return True

    # -- keys ---------------------------------------------------------------------------------

    async def add_key(self, key: ApiKey) -> bool:
        with self._lock:
            st = self._tenants.get(key.tenant_id)
            if st is None:
                return False
            self._keys[key.key_hash] = key
            st.key_ids[key.key_id] = key.key_hash
            return True

    async def replace_key(self, key: ApiKey) -> bool:
        with self._lock:
            if key.key_hash not in self._keys:
                return False
            self._keys[key.key_hash] = key
            return True

    async def get_key(self, tenant_id: str, key_id: str) -> ApiKey | None:
        st = self._tenants.get(tenant_id)
        digest = st.key_ids.get(key_id) if st else None
        return self._keys.get(digest) if digest else None

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        with self._lock:
            st = self._tenants.get(tenant_id)
            keys = [self._keys[d] for d in st.key_ids.values()] if st else []
            return sorted(keys, key=lambda k: (k.created_at, k.key_id))

    async def find_key(self, key_hash: str) -> KeyLookup | None:
        key = self._keys.get(key_hash)
        if key is None:
            return None
        st = self._tenants.get(key.tenant_id)
        return KeyLookup(key=key, tenant=st.tenant if st else None)

    # -- admission and settlement (mirror lua/admit.lua and lua/settle.lua) -------------------

    async def admit(self, req: AdmitRequest) -> AdmitResult | None:
        with self._lock:
            st = self._tenants.get(req.tenant_id)
            if st is None:
                return None
            return _admit(st, req)

    async def settle(self, ticket: Ticket, used: Consumption, periods: Periods) -> bool:
        with self._lock:
            st = self._tenants.get(ticket.tenant_id)
            if st is None:
                return False
            return _settle(st, ticket, used, periods)

    async def renew(self, ticket: Ticket, expires_ms: int, now_ms: int) -> bool:
        with self._lock:
            st = self._tenants.get(ticket.tenant_id)
            if st is None or st.leases.get(ticket.member, now_ms) <= now_ms:
                return False
            st.leases[ticket.member] = expires_ms
            return True

    # -- usage --------------------------------------------------------------------------------

    async def read_usage(self, tenant_id: str, periods: Periods) -> RawUsage:
        with self._lock:
            st = self._tenants.get(tenant_id)
            if st is None:
                return RawUsage(day={}, month={})
            _reclaim_leases(st, periods.now_ms)
            minutes = {m: dict(st.minutes[m]) for m in periods.recent_minutes() if m in st.minutes}
            return RawUsage(
                day=dict(st.periods.get(f"day:{periods.day}", {})),
                month=dict(st.periods.get(f"month:{periods.month}", {})),
                minutes=minutes,
                in_flight=len(st.leases),
            )

    async def reset_usage(self, tenant_id: str, periods: Periods) -> None:
        with self._lock:
            st = self._tenants.get(tenant_id)
            if st is None:
                return
            for name in (f"day:{periods.day}", f"month:{periods.month}"):
                reserved = st.periods.get(name, Counter())["reserved"]
                st.periods.pop(name, None)
                if reserved > 0:
                    st.periods[name] = Counter(charged=reserved, reserved=reserved)
            st.minutes.clear()
            st.rpm.clear()
            st.tpm.clear()

    # -- prefixes -----------------------------------------------------------------------------

    def _table(self, owner: str | None) -> _PrefixTable | None:
        if owner is None:
            return self._public
        st = self._tenants.get(owner)
        return st.prefixes if st else None

    async def put_prefix(self, prefix: Prefix, now_ms: int) -> PrefixPut | None:
        with self._lock:
            table = self._table(prefix.owner)
            if table is None:
                return None
            st = self._tenants.get(prefix.owner) if prefix.owner is not None else None
            return table.put(prefix, st.tenant.quota if st else Quota(), now_ms)

    async def get_prefix(self, owner: str | None, name: str, now_ms: int) -> Prefix | None:
        with self._lock:
            table = self._table(owner)
            if table is None:
                return None
            table.purge(now_ms)
            return table.read(name)

    async def list_prefixes(self, owner: str | None, now_ms: int) -> list[Prefix]:
        with self._lock:
            table = self._table(owner)
            if table is None:
                return []
            table.purge(now_ms)
            return [p for n in sorted(table.docs) if (p := table.read(n)) is not None]

    async def delete_prefix(self, owner: str | None, name: str, now_ms: int) -> Prefix | None:
        with self._lock:
            table = self._table(owner)
            if table is None:
                return None
            table.purge(now_ms)
            doc = table.docs.get(name)
            table.forget(name)
            return doc

    async def use_prefix(
        self, owners: Sequence[str | None], name: str, now_ms: int
    ) -> Prefix | None:
        with self._lock:
            for owner in owners:
                table = self._table(owner)
                found = table.use(name, now_ms) if table is not None else None
                if found is not None:
                    return found
            return None

    async def count_prefix_tokens(self, owner: str | None, name: str, cached_tokens: int) -> None:
        with self._lock:
            table = self._table(owner)
            if table is not None and name in table.docs:
                key = name + ":cached_tokens"
                table.state[key] = max(table.state[key] + cached_tokens, 0)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# -- the algorithms, as plain functions over one tenant's state --------------------------------


Window = tuple[int, list[tuple[int, int]]]  # (used, live buckets oldest first)


def _admit(st: _TenantState, req: AdmitRequest) -> AdmitResult:
    """Mirror of lua/admit.lua."""
    now = req.periods.now_ms
    _reclaim_leases(st, now)
    rpm, tpm = _window(st.rpm, now), _window(st.tpm, now)
    if req.member in st.leases:  # a resent admission: admitted already, charge nothing
        return _admitted(st, req, rpm, tpm, st.leases[req.member])
    refusals = _refusals(st, req, rpm, tpm)
    if refusals:
        quota = st.tenant.quota
        return AdmitResult(
            admitted=False,
            requests=_state(quota.requests_per_minute, rpm, now),
            tokens=_state(quota.tokens_per_minute, tpm, now),
            in_flight=len(st.leases),
            refusals=tuple(refusals),
        )
    return _take(st, req, rpm, tpm)


def _refusals(st: _TenantState, req: AdmitRequest, rpm: Window, tpm: Window) -> list[Refusal]:
    """Every limit the request breaks, in `quotas.Limit` order."""
    quota, cost, p = st.tenant.quota, req.cost, req.periods
    now = p.now_ms
    out: list[Refusal] = []
    limit = quota.max_tokens_per_request
    if limit is not None and req.max_tokens > limit:
        out.append(Refusal("max_tokens_per_request", None, False, limit, 0, req.max_tokens))
    month = st.periods.get(f"month:{p.month}", Counter())
    _check_budget(
        out, "tokens_per_month", quota.tokens_per_month, month, cost, p.month_end_ms - now
    )
    day = st.periods.get(f"day:{p.day}", Counter())
    _check_budget(out, "tokens_per_day", quota.tokens_per_day, day, cost, p.day_end_ms - now)
    limit, in_flight = quota.max_concurrent_requests, len(st.leases)
    if limit is not None and in_flight + 1 > limit:
        out.append(Refusal("max_concurrent_requests", RETRY_SOFT_MS, False, limit, in_flight, 1))
    _check_window(out, "requests_per_minute", quota.requests_per_minute, rpm, 1, now)
    _check_window(out, "tokens_per_minute", quota.tokens_per_minute, tpm, cost, now)
    return out


def _take(st: _TenantState, req: AdmitRequest, rpm: Window, tpm: Window) -> AdmitResult:
    """All limits passed: lease, window charges, reservation."""
    now, quota, cost = req.periods.now_ms, st.tenant.quota, req.cost
    bucket = bucket_of(now)
    st.leases[req.member] = now + req.lease_ttl_ms
    if quota.requests_per_minute is not None:
        st.rpm[bucket] = st.rpm.get(bucket, 0) + 1
        rpm = (rpm[0] + 1, [*rpm[1], (bucket, 1)])
    if quota.tokens_per_minute is not None:
        st.tpm[bucket] = st.tpm.get(bucket, 0) + cost
        tpm = (tpm[0] + cost, [*tpm[1], (bucket, cost)])
    for name, ttl_s in (
        (f"day:{req.periods.day}", DAY_TTL_S),
        (f"month:{req.periods.month}", MONTH_TTL_S),
    ):
        counters = _counters(st, name, now + ttl_s * 1000)
        counters["charged"] += cost
        counters["reserved"] += cost
    return _admitted(st, req, rpm, tpm, now + req.lease_ttl_ms)


def _admitted(
    st: _TenantState, req: AdmitRequest, rpm: Window, tpm: Window, expires_ms: int
) -> AdmitResult:
    now, quota = req.periods.now_ms, st.tenant.quota
    ticket = Ticket(
        tenant_id=req.tenant_id,
        lease_id=req.lease_id,
        member=req.member,
        reserved=req.cost,
        day=req.periods.day,
        month=req.periods.month,
        tpm_bucket=bucket_of(now) if quota.tokens_per_minute is not None else -1,
        expires_ms=expires_ms,
    )
    return AdmitResult(
        admitted=True,
        requests=_state(quota.requests_per_minute, rpm, now),
        tokens=_state(quota.tokens_per_minute, tpm, now),
        in_flight=len(st.leases),
        ticket=ticket,
    )


def _settle(st: _TenantState, ticket: Ticket, used: Consumption, periods: Periods) -> bool:
    """Mirror of lua/settle.lua."""
    now = periods.now_ms
    live = st.leases.pop(ticket.member, None) is not None if ticket.member else False
    names = (f"day:{ticket.day}", f"month:{ticket.month}")
    if live:
        for name in names:
            _release_reservation(st, name, ticket.reserved)
    delta = used.total - ticket.reserved
    for name, ttl_s in zip(names, (DAY_TTL_S, MONTH_TTL_S), strict=True):
        counters = _counters(st, name, now + ttl_s * 1000)
        counters["charged"] = max(counters["charged"] + delta, 0)
        _record(counters, used)
    _record(st.minutes.setdefault(periods.minute, Counter()), used)
    b = ticket.tpm_bucket
    if b >= 0 and b >= oldest_live_bucket(now) and b in st.tpm:
        st.tpm[b] = max(st.tpm[b] + delta, 0)
    _expire(st, periods)
    return live


def _record(counters: Counter[str], used: Consumption) -> None:
    counters["requests"] += 1
    counters["prompt_tokens"] += used.prompt_tokens
    counters["completion_tokens"] += used.completion_tokens
    counters["cached_tokens"] += used.cached_tokens


def _check_budget(
    refusals: list[Refusal],
    name: str,
    limit: int | None,
    counters: Counter[str],
    cost: int,
    until_end_ms: int,
) -> None:
    charged, reserved = counters["charged"], counters["reserved"]
    if limit is None or charged + cost <= limit:
        return
    hard = charged - reserved + cost > limit
    retry = None if cost > limit else (until_end_ms if hard else RETRY_SOFT_MS)
    refusals.append(Refusal(name, retry, hard, limit, charged, cost))


def _check_window(
    refusals: list[Refusal], name: str, limit: int | None, window: Window, cost: int, now: int
) -> None:
    used, live = window
    if limit is None or used + cost <= limit:
        return
    refusals.append(Refusal(name, _wait_ms(live, used, cost, limit, now), False, limit, used, cost))


def _window(buckets: dict[int, int], now: int) -> Window:
    """Prune buckets that left the window; return (used, live buckets oldest first)."""
    oldest = oldest_live_bucket(now)
    for b in [b for b in buckets if b < oldest]:
        del buckets[b]
    live = sorted(buckets.items())
    return sum(c for _, c in live), live


def _wait_ms(live: list[tuple[int, int]], used: int, cost: int, limit: int, now: int) -> int | None:
    """Until enough old buckets leave the window for `cost` to fit; None if it never fits."""
    if cost > limit:
        return None
    freed = 0
    for b, c in live:
        freed += c
        if used - freed + cost <= limit:
            return bucket_expiry_ms(b) - now
    return None


def _state(limit: int | None, window: Window, now: int) -> WindowState | None:
    """Header state: the window resets when its newest non-empty bucket leaves it."""
    if limit is None:
        return None
    used, live = window
    newest = max((b for b, c in live if c > 0), default=None)
    reset = bucket_expiry_ms(newest) - now if newest is not None else 0
    return WindowState(limit=limit, used=used, reset_ms=reset)


def _reclaim_leases(st: _TenantState, now: int) -> None:
    """Drop expired leases; their reservations stay charged but are no longer in flight."""
    for member in [m for m, exp in st.leases.items() if exp <= now]:
        del st.leases[member]
        _, reserved, day, month = member.split("|")
        for name in (f"day:{day}", f"month:{month}"):
            _release_reservation(st, name, int(reserved))


def _release_reservation(st: _TenantState, name: str, amount: int) -> None:
    counters = st.periods.get(name)
    if counters is not None:
        counters["reserved"] = max(counters["reserved"] - amount, 0)


def _counters(st: _TenantState, name: str, expires_ms: int) -> Counter[str]:
    st.period_expiry[name] = expires_ms
    return st.periods.setdefault(name, Counter())


def _expire(st: _TenantState, periods: Periods) -> None:
    """Forget counters past their retention, as Redis TTLs do."""
    now = periods.now_ms
    for name in [n for n, exp in st.period_expiry.items() if exp <= now]:
        st.periods.pop(name, None)
        del st.period_expiry[name]
    oldest_minute = periods.minute - MINUTE_TTL_S // 60
    for m in [m for m in st.minutes if m < oldest_minute]:
        del st.minutes[m]
