"""`Store` on Redis (redis.asyncio): shared by every gateway process.

- Admission, settlement, renewal, authentication and usage reads are each ONE round trip: an
  EVALSHA of a script from `lua/` (helpers from `lua/_lib.lua` are prepended). Scripts are
  loaded once with SCRIPT LOAD (`load_scripts`, or on first use) and reloaded on NOSCRIPT,
  e.g. after Redis restarted.
- Nothing waits unboundedly: socket connect and read timeouts, a blocking pool that waits at
  most `pool_timeout` for a free connection, one immediate retry on a broken connection (a
  restarted Redis), and an overall deadline per operation. Any of these failing raises
  `StoreUnavailable`; a later call reconnects by itself. A resent admission is recognised by its
  lease and charged once; a settlement resent after its reply was lost (a connection cut at that
  very moment) would be applied twice.
- Times come from the caller (`Periods.now_ms`), never from Redis `TIME`, so tests drive them.
  Gateways must keep their clocks in sync (NTP): skew shifts windows by the skew.
- Key names carry the tenant in a hash tag (`pg:{acme}:rpm`), so one tenant's keys share a
  cluster slot; authentication and deletion still span slots, so use a single primary.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .errors import StoreUnavailable
from .models import ApiKey, Prefix, Tenant
from .periods import DAY_TTL_S, MINUTE_TTL_S, MONTH_TTL_S, Periods, utc
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

T = TypeVar("T")

# A syntactically valid key record, decoded by auth.lua on a miss so a miss costs what a hit does.
_PLACEHOLDER_KEY = json.dumps({"tenant_id": ""})
_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    OSError,
    asyncio.TimeoutError,
)


class LuaScript:
    """A script from `tenants/lua/`, called by EVALSHA and (re)loaded on NOSCRIPT."""

    def __init__(self, name: str) -> None:
        lua = resources.files(__package__).joinpath("lua")
        self.name = name
        self.source = lua.joinpath("_lib.lua").read_text() + lua.joinpath(f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def load(self, client: Redis) -> None:
        await client.execute_command("SCRIPT", "LOAD", self.source)

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await self.load(client)
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


SCRIPT_NAMES = (
    "admit",
    "settle",
    "renew",
    "auth",
    "read_usage",
    "reset_usage",
    "create_tenant",
    "add_key",
    "delete_tenant",
    "put_prefix",
    "read_prefixes",
    "use_prefix",
    "delete_prefix",
    "count_prefix",
)


class KeySpace:
    """Redis key names; `prefix` separates deployments sharing one Redis."""

    def __init__(self, prefix: str = "pg") -> None:
        self.prefix = prefix
        self.index = f"{prefix}:tenants"
        self.key_record_prefix = f"{prefix}:key:"

    def tenant_prefix(self, tenant_id: str) -> str:
        return f"{self.prefix}:{{{tenant_id}}}:"

    def tenant(self, tenant_id: str) -> str:
        return self.tenant_prefix(tenant_id) + "tenant"

    def of(self, tenant_id: str, name: str) -> str:
        """`pg:{tenant}:<name>`: keys, rpm, tpm, leases, day:<id>, month:<id>, min:<minute>."""
        return self.tenant_prefix(tenant_id) + name

    def key_record(self, key_hash: str) -> str:
        return self.key_record_prefix + key_hash

    def prefix_keys(self, owner: str | None) -> list[str]:
        """The owner's prefixes, prefix state and prefix leases; None: the public ones."""
        base = f"{self.prefix}:public:" if owner is None else self.tenant_prefix(owner)
        return [base + "prefixes", base + "prefix_state", base + "prefix_leases"]


class RedisStore:
    """A `Store` in Redis. Build with `RedisStore.from_url`; close with `aclose`."""

    def __init__(self, client: Redis, *, prefix: str = "pg", op_timeout: float = 2.0) -> None:
        self.client = client
        self.keys = KeySpace(prefix)
        self.op_timeout = op_timeout
        self.scripts = {name: LuaScript(name) for name in SCRIPT_NAMES}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "pg",
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        max_connections: int = 64,
        pool_timeout: float = 1.0,
        op_timeout: float = 2.0,
    ) -> RedisStore:
        """A store with its own connection pool (`redis://host:port/db`, `rediss://`, ...)."""
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            # One immediate retry when a pooled connection turns out broken (Redis restarted,
            # idle connection dropped); never after a read timeout, when the script may have run.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
            decode_responses=True,
        )
        return cls(Redis.from_pool(pool), prefix=prefix, op_timeout=op_timeout)

    async def _do(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run one operation under the deadline, mapping transport failures."""
        try:
            if sys.version_info >= (3, 11):  # no extra task per call, unlike wait_for
                async with asyncio.timeout(self.op_timeout):
                    return await op()
            return await asyncio.wait_for(op(), self.op_timeout)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._do(lambda: self.scripts[name](self.client, keys, args))

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script (optional: a first call loads on NOSCRIPT too)."""
        for script in self.scripts.values():
            await self._do(lambda s=script: s.load(self.client))  # type: ignore[misc]

    # -- tenants ------------------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant) -> bool:
        keys = [self.keys.tenant(tenant.id), self.keys.index]
        return bool(
            await self._script("create_tenant", keys, [tenant.model_dump_json(), tenant.id])
        )

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        doc = await self._do(
            lambda: self.client.execute_command("GET", self.keys.tenant(tenant_id))
        )
        return Tenant.model_validate_json(doc) if doc else None

    async def list_tenants(self) -> list[Tenant]:
        ids = sorted(
            await self._do(lambda: self.client.execute_command("SMEMBERS", self.keys.index))
        )
        if not ids:
            return []
        names = [self.keys.tenant(t) for t in ids]
        docs = await self._do(lambda: self.client.execute_command("MGET", *names))
        return [Tenant.model_validate_json(d) for d in docs if d]

    async def replace_tenant(self, tenant: Tenant) -> bool:
        name, doc = self.keys.tenant(tenant.id), tenant.model_dump_json()
        return bool(await self._do(lambda: self.client.execute_command("SET", name, doc, "XX")))

    async def delete_tenant(self, tenant_id: str) -> bool:
        keys = [self.keys.tenant(tenant_id), self.keys.of(tenant_id, "keys"), self.keys.index]
        args = [tenant_id, self.keys.key_record_prefix]
        existed = bool(await self._script("delete_tenant", keys, args))
        await self._do(lambda: self._delete_matching(self.keys.tenant_prefix(tenant_id) + "*"))
        return existed

    async def _delete_matching(self, pattern: str) -> None:
        cursor = 0
        while True:
            cursor, found = await self.client.execute_command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", 500
            )
            if found:
                await self.client.execute_command("UNLINK", *found)
            if int(cursor) == 0:
                return

    # -- keys ---------------------------------------------------------------------------------

    async def add_key(self, key: ApiKey) -> bool:
        keys = [
            self.keys.tenant(key.tenant_id),
            self.keys.key_record(key.key_hash),
            self.keys.of(key.tenant_id, "keys"),
        ]
        return bool(
            await self._script("add_key", keys, [key.model_dump_json(), key.key_id, key.key_hash])
        )

    async def replace_key(self, key: ApiKey) -> bool:
        name, doc = self.keys.key_record(key.key_hash), key.model_dump_json()
        return bool(await self._do(lambda: self.client.execute_command("SET", name, doc, "XX")))

    async def get_key(self, tenant_id: str, key_id: str) -> ApiKey | None:
        ids = self.keys.of(tenant_id, "keys")
        digest = await self._do(lambda: self.client.execute_command("HGET", ids, key_id))
        if not digest:
            return None
        doc = await self._do(
            lambda: self.client.execute_command("GET", self.keys.key_record(digest))
        )
        return ApiKey.model_validate_json(doc) if doc else None

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        ids = self.keys.of(tenant_id, "keys")
        digests = await self._do(lambda: self.client.execute_command("HVALS", ids))
        if not digests:
            return []
        names = [self.keys.key_record(d) for d in digests]
        docs = await self._do(lambda: self.client.execute_command("MGET", *names))
        keys = [ApiKey.model_validate_json(d) for d in docs if d]
        return sorted(keys, key=lambda k: (k.created_at, k.key_id))

    async def find_key(self, key_hash: str) -> KeyLookup | None:
        keys = [self.keys.key_record(key_hash)]
        args = [f"{self.keys.prefix}:", _PLACEHOLDER_KEY]
        key_doc, tenant_doc = await self._script("auth", keys, args)
        if not key_doc:
            return None
        tenant = Tenant.model_validate_json(tenant_doc) if tenant_doc else None
        return KeyLookup(key=ApiKey.model_validate_json(key_doc), tenant=tenant)

    # -- admission and settlement -------------------------------------------------------------

    async def admit(self, req: AdmitRequest) -> AdmitResult | None:
        t, p = req.tenant_id, req.periods
        keys = [
            self.keys.tenant(t),
            self.keys.of(t, "rpm"),
            self.keys.of(t, "tpm"),
            self.keys.of(t, "leases"),
            self.keys.of(t, f"day:{p.day}"),
            self.keys.of(t, f"month:{p.month}"),
        ]
        args = [
            p.now_ms,
            req.member,
            p.now_ms + req.lease_ttl_ms,
            req.prompt_tokens,
            req.max_tokens,
            p.day_end_ms,
            p.month_end_ms,
            DAY_TTL_S,
            MONTH_TTL_S,
            self.keys.tenant_prefix(t),
        ]
        reply = await self._script("admit", keys, args)
        return _parse_admit(req, reply)

    async def settle(self, ticket: Ticket, used: Consumption, periods: Periods) -> bool:
        t = ticket.tenant_id
        keys = [
            self.keys.tenant(t),
            self.keys.of(t, "leases"),
            self.keys.of(t, "tpm"),
            self.keys.of(t, f"day:{ticket.day}"),
            self.keys.of(t, f"month:{ticket.month}"),
            self.keys.of(t, f"min:{periods.minute}"),
        ]
        args = [
            periods.now_ms,
            ticket.member,
            ticket.reserved,
            ticket.tpm_bucket,
            used.prompt_tokens,
            used.completion_tokens,
            used.cached_tokens,
            DAY_TTL_S,
            MONTH_TTL_S,
            MINUTE_TTL_S,
        ]
        return bool(await self._script("settle", keys, args))

    async def renew(self, ticket: Ticket, expires_ms: int, now_ms: int) -> bool:
        keys = [self.keys.of(ticket.tenant_id, "leases")]
        return bool(await self._script("renew", keys, [ticket.member, expires_ms, now_ms]))

    # -- usage --------------------------------------------------------------------------------

    async def read_usage(self, tenant_id: str, periods: Periods) -> RawUsage:
        minutes = periods.recent_minutes()
        keys = [
            self.keys.of(tenant_id, "leases"),
            self.keys.of(tenant_id, f"day:{periods.day}"),
            self.keys.of(tenant_id, f"month:{periods.month}"),
            *(self.keys.of(tenant_id, f"min:{m}") for m in minutes),
        ]
        reply = await self._script(
            "read_usage", keys, [periods.now_ms, self.keys.tenant_prefix(tenant_id)]
        )
        by_minute = {m: _ints(flat) for m, flat in zip(minutes, reply[3:], strict=True) if flat}
        return RawUsage(
            day=_ints(reply[1]), month=_ints(reply[2]), minutes=by_minute, in_flight=int(reply[0])
        )

    async def reset_usage(self, tenant_id: str, periods: Periods) -> None:
        minutes = periods.recent_minutes(MINUTE_TTL_S // 60 + 1)
        keys = [
            self.keys.of(tenant_id, f"day:{periods.day}"),
            self.keys.of(tenant_id, f"month:{periods.month}"),
            self.keys.of(tenant_id, "rpm"),
            self.keys.of(tenant_id, "tpm"),
            *(self.keys.of(tenant_id, f"min:{m}") for m in minutes),
        ]
        await self._script("reset_usage", keys, [DAY_TTL_S, MONTH_TTL_S])

    # -- prefixes -----------------------------------------------------------------------------

    async def put_prefix(self, prefix: Prefix, now_ms: int) -> PrefixPut | None:
        owner = prefix.owner
        tenant_doc = self.keys.tenant(owner) if owner is not None else self.keys.index
        keys = [tenant_doc, *self.keys.prefix_keys(owner)]
        ttl_ms = (prefix.ttl_seconds or 0) * 1000
        flag = 0 if owner is None else 1
        args = [now_ms, prefix.name, prefix.document(), prefix.pinned_blocks, ttl_ms, flag]
        reply = await self._script("put_prefix", keys, args)
        status = int(reply[0])
        if status < 0:
            return None
        if status == 1:
            return PrefixPut(stored=True, replaced=_prefix(reply[1]) if reply[1] else None)
        refusals = tuple(
            Refusal(
                str(reply[i]), None, False, int(reply[i + 1]), int(reply[i + 2]), int(reply[i + 3])
            )
            for i in range(2, 2 + 4 * int(reply[1]), 4)
        )
        return PrefixPut(stored=False, refusals=refusals)

    async def get_prefix(self, owner: str | None, name: str, now_ms: int) -> Prefix | None:
        found = await self._read_prefixes(owner, name, now_ms)
        return found[0] if found else None

    async def list_prefixes(self, owner: str | None, now_ms: int) -> list[Prefix]:
        return sorted(await self._read_prefixes(owner, "", now_ms), key=lambda p: p.name)

    async def _read_prefixes(self, owner: str | None, name: str, now_ms: int) -> list[Prefix]:
        flat = await self._script("read_prefixes", self.keys.prefix_keys(owner), [now_ms, name])
        return [_prefix(*flat[i + 1 : i + 5]) for i in range(0, len(flat), 5)]

    async def delete_prefix(self, owner: str | None, name: str, now_ms: int) -> Prefix | None:
        doc = await self._script("delete_prefix", self.keys.prefix_keys(owner), [now_ms, name])
        return _prefix(doc) if doc else None

    async def use_prefix(
        self, owners: Sequence[str | None], name: str, now_ms: int
    ) -> Prefix | None:
        keys = [k for owner in owners for k in self.keys.prefix_keys(owner)]
        reply = await self._script("use_prefix", keys, [now_ms, name])
        return _prefix(*reply[1:5]) if reply else None

    async def count_prefix_tokens(self, owner: str | None, name: str, cached_tokens: int) -> None:
        keys = self.keys.prefix_keys(owner)[:2]
        await self._script("count_prefix", keys, [name, cached_tokens])

    async def ping(self) -> None:
        await self._do(lambda: self.client.execute_command("PING"))

    async def aclose(self) -> None:
        await self.client.aclose()


def _prefix(doc: str, lease_ms: Any = -1, requests: Any = 0, cached_tokens: Any = 0) -> Prefix:
    """A stored prefix document plus the live part read beside it."""
    lease = int(lease_ms)
    live = {
        "expires_at": utc(lease) if lease >= 0 else None,
        "requests": int(requests),
        "cached_tokens": int(cached_tokens),
    }
    return Prefix.model_validate_json(doc).model_copy(update=live)


def _ints(flat: Sequence[Any]) -> dict[str, int]:
    """HGETALL's flat [field, value, ...] as a dict of ints."""
    return {str(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _window(limit: int, used: int, reset: int) -> WindowState | None:
    return None if limit < 0 else WindowState(limit=limit, used=used, reset_ms=reset)


def _parse_admit(req: AdmitRequest, r: list[Any]) -> AdmitResult | None:
    """Decode admit.lua's flat reply (layout in the script's header)."""
    if int(r[0]) < 0:
        return None
    refusals = tuple(
        Refusal(
            limit=str(r[i]),
            retry_ms=None if int(r[i + 1]) < 0 else int(r[i + 1]),
            hard=bool(int(r[i + 2])),
            value=int(r[i + 3]),
            used=int(r[i + 4]),
            requested=int(r[i + 5]),
        )
        for i in range(11, 11 + 6 * int(r[10]), 6)
    )
    admitted = bool(int(r[0]))
    ticket = None
    if admitted:
        ticket = Ticket(
            tenant_id=req.tenant_id,
            lease_id=req.lease_id,
            member=req.member,
            reserved=req.cost,
            day=req.periods.day,
            month=req.periods.month,
            tpm_bucket=int(r[2]),
            expires_ms=int(r[1]),
        )
    return AdmitResult(
        admitted=admitted,
        requests=_window(int(r[3]), int(r[4]), int(r[5])),
        tokens=_window(int(r[6]), int(r[7]), int(r[8])),
        in_flight=int(r[9]),
        refusals=refusals,
        ticket=ticket,
    )
