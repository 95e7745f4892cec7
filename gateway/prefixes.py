"""Registered prefixes in the gateway: rendered, stored, warmed and pinned, used by reference.

```
register   body -> token ids (the chat template without the generation prompt, or the text)
           -> tenants.register_prefix (max_prefixes / max_pinned_blocks, atomic in the store)
           -> engine.warm_prefix (one prefill; pinned: pinned under "<owner>/<name>")
           an engine refusal (pin cap: 409) puts the registry back as it was
use        tenants.use_prefix (the tenant's own name, else a public one; counts the request and
           extends the lease) -> extend the engine pin (re-pin it if this engine lost it)
           -> prompt = prefix + request; settle adds the cached tokens to its counters
start      every registered prefix warmed (pinned ones pinned) before /ready turns 200
```

Cache namespaces: a tenant's prefix is warmed in the tenant's namespace, the one its requests
use, so its own requests hit it and nobody else's can. A public prefix lives in
`PUBLIC_NAMESPACE`: any request whose prompt starts with a public prefix's full blocks hashes
those blocks there (`shared_blocks`), and the blocks after them in its own namespace again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.block_manager import PUBLIC_NAMESPACE
from engine.errors import EngineDeadError, InvalidRequestError, PinRefusedError
from gateway.engine_client import EngineClient
from gateway.errors import bad_request, from_engine_error
from gateway.hooks import GenerationHooks, GenerationInfo, Outcome, UsageCounts
from gateway.metrics import GatewayMetrics
from gateway.openai.chat import render_conversation, template_messages
from gateway.openai.schemas import ChatMessage
from gateway.tenancy.auth import Principal, cache_namespace
from tenants import (
    Prefix,
    PrefixNotFound,
    PrefixSpec,
    StoreUnavailable,
    Tenant,
    TenantNotFound,
    TenantService,
)
from tenants.models import PREFIX_NAME_PATTERN, PositiveCount, PrefixName, one_content

logger = logging.getLogger("prefixgate.prefixes")
_ENGINE_REFUSALS = (PinRefusedError, InvalidRequestError, EngineDeadError)

PUBLIC_OWNER_LABEL = "(public)"  # engine tenant and metric label of public prefixes
_NAME = re.compile(PREFIX_NAME_PATTERN)
_PUBLIC_REFRESH_S = 10.0  # how stale this process's index of public prefixes may get


# -- wire models -------------------------------------------------------------------------------


class PrefixCreate(BaseModel):
    """Body of `POST /v1/prefixes` and `POST /admin/prefixes`: exactly one of `messages` (chat
    messages, rendered with the model's chat template) and `text`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: PrefixName
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    text: str | None = Field(default=None, min_length=1)
    pin: bool = False
    ttl_seconds: PositiveCount | None = None  # unused this long, the prefix is forgotten

    @model_validator(mode="after")
    def _one_content(self) -> PrefixCreate:
        return one_content(self)


class PrefixObject(BaseModel):
    """A registered prefix as the API shows it (never its token ids)."""

    object: Literal["prefix"] = "prefix"
    name: str
    public: bool
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    token_count: int
    num_blocks: int  # full KV blocks: what a request can be served from the cache
    pinned: bool
    ttl_seconds: int | None = None
    expires_at: int | None = None  # unix seconds; moved by every use; None: never
    created_at: int  # unix seconds
    requests: int  # requests that used it by reference
    cached_tokens: int  # of its tokens, served from the cache to those requests

    @classmethod
    def of(cls, prefix: Prefix) -> PrefixObject:
        return cls(
            name=prefix.name,
            public=prefix.owner is None,
            messages=prefix.messages,
            text=prefix.text,
            token_count=prefix.token_count,
            num_blocks=prefix.num_blocks,
            pinned=prefix.pinned,
            ttl_seconds=prefix.ttl_seconds,
            expires_at=_unix(prefix.expires_at.timestamp()) if prefix.expires_at else None,
            created_at=_unix(prefix.created_at.timestamp()),
            requests=prefix.requests,
            cached_tokens=prefix.cached_tokens,
        )


class PrefixList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PrefixObject]


class PrefixDeleted(BaseModel):
    name: str
    object: Literal["prefix"] = "prefix"
    deleted: Literal[True] = True


def _unix(seconds: float) -> int:
    return int(seconds)


# -- the registry ------------------------------------------------------------------------------


def pin_key(owner: str | None, name: str) -> str:
    """The engine pin of a prefix. Tenant ids start with a letter or digit, so "*" is free."""
    return f"{owner if owner is not None else '*'}/{name}"


def lease_end(prefix: Prefix) -> float | None:
    return prefix.expires_at.timestamp() if prefix.expires_at is not None else None


class PrefixRegistry:
    """The gateway's side of the prefix registry (see the module docstring). One per app.

    Args:
        tenants: where prefixes are stored.
        metrics: prefix hit counters.
        anonymous: embedded mode without keys, where tenant `default` uses the global namespace.
    """

    def __init__(self, tenants: TenantService, metrics: GatewayMetrics, anonymous: bool) -> None:
        self.tenants = tenants
        self.metrics = metrics
        self.anonymous = anonymous
        self._public: list[Prefix] = []  # this process's copy of the public prefixes
        self._public_at = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- namespaces -----------------------------------------------------------------------
    def namespace(self, tenant: Tenant | None) -> str | None:
        """The cache namespace a prefix of `tenant` is warmed in (None: a public prefix): the
        one `gateway.tenancy.auth` gives the tenant's requests."""
        if tenant is None:
            return PUBLIC_NAMESPACE
        return None if self.anonymous else cache_namespace(tenant)

    # ---- register / delete ----------------------------------------------------------------
    @staticmethod
    def spec(body: PrefixCreate) -> PrefixSpec:
        """The spec the store keeps, messages checked like a request's."""
        messages = None if body.messages is None else template_messages(body.messages)
        return PrefixSpec(
            name=body.name, messages=messages, text=body.text, pin=body.pin,
            ttl_seconds=body.ttl_seconds,
        )  # fmt: skip

    @staticmethod
    def token_ids(engine: EngineClient, spec: PrefixSpec) -> list[int]:
        """The prefix's tokens: what a request's prompt starts with when it uses it."""
        tokenizer = engine.tokenizer
        if spec.messages is not None:
            ids = render_conversation(tokenizer, spec.messages, add_generation_prompt=False)
            param = "messages"
        else:
            ids = list(tokenizer.encode(spec.text or ""))
            param = "text"
        if not ids:
            raise bad_request("The prefix renders to no tokens.", param=param)
        if len(ids) >= engine.max_model_len:
            raise bad_request(
                f"The prefix has {len(ids)} tokens; this model's context is {engine.max_model_len} "
                "and a request must add at least one.",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    async def register(
        self, engine: EngineClient, owner: str | None, namespace: str | None, body: PrefixCreate
    ) -> Prefix:
        """Store, then warm (and pin) in the engine; see the module docstring.

        Args:
            owner: a tenant id, or None for a public prefix (namespace: PUBLIC_NAMESPACE).
            namespace: the owner's cache namespace.

        Raises:
            APIError / TenantsError: 400 (content), 404 (owner), 409 (limits, engine pin cap).
        """
        spec = self.spec(body)
        token_ids = self.token_ids(engine, spec)
        reg = await self.tenants.register_prefix(
            owner, spec, token_ids=token_ids, block_size=engine.block_size,
            model=engine.model_name,
        )  # fmt: skip
        if reg.replaced is not None and reg.replaced.pinned and not spec.pin:
            await engine.unpin_prefix(pin_key(owner, spec.name))
        try:
            await self._warm(engine, reg.prefix, namespace)
        except _ENGINE_REFUSALS as exc:
            await self._put_back(owner, spec.name, reg.replaced)
            raise from_engine_error(exc) from exc
        if owner is None:
            self._public = await self.tenants.list_prefixes(None)
        return reg.prefix

    async def _warm(self, engine: EngineClient, prefix: Prefix, namespace: str | None) -> None:
        key = pin_key(prefix.owner, prefix.name) if prefix.pinned else None
        await engine.warm_prefix(
            prefix.token_ids, key=key, tenant=prefix.owner or PUBLIC_OWNER_LABEL,
            namespace=namespace, expires_at=lease_end(prefix),
        )  # fmt: skip

    async def _put_back(self, owner: str | None, name: str, replaced: Prefix | None) -> None:
        """Undo a registration the engine refused: the one it replaced comes back."""
        if replaced is None:
            await self.tenants.delete_prefix(owner, name)
        else:
            await self.tenants.restore_prefix(replaced)

    async def delete(self, engine: EngineClient | None, owner: str | None, name: str) -> Prefix:
        """Forget a prefix and end its pin (its blocks stay cached until evicted)."""
        prefix = await self.tenants.delete_prefix(owner, name)
        if prefix.pinned and engine is not None:
            await engine.unpin_prefix(pin_key(owner, name))
        if owner is None:
            self._public = await self.tenants.list_prefixes(None)
        return prefix

    async def delete_tenant(self, engine: EngineClient | None, tenant_id: str) -> None:
        """Delete a tenant (its prefixes with it) and end its pins."""
        prefixes = await self.tenants.list_prefixes(tenant_id)
        await self.tenants.delete_tenant(tenant_id)
        if engine is None:
            return
        for prefix in prefixes:
            if prefix.pinned:
                await engine.unpin_prefix(pin_key(tenant_id, prefix.name))

    # ---- warm-up --------------------------------------------------------------------------
    async def warm_all(self, engine: EngineClient) -> None:
        """Startup: every registered prefix computed into the cache, pinned ones pinned. An
        outage of the store or a refused pin is logged, never fatal."""
        try:
            tenants = await self.tenants.list_tenants()
            for tenant in tenants:
                await self.warm_tenant(engine, tenant)
            public = await self.tenants.list_prefixes(None)
        except StoreUnavailable as exc:
            logger.error("prefixes not warmed: the tenant store is unavailable (%s)", exc.detail)
            return
        self._public = public
        self._public_at = time.monotonic()
        await self._warm_each(engine, public, PUBLIC_NAMESPACE)

    async def warm_tenant(self, engine: EngineClient, tenant: Tenant | str) -> None:
        """Warm (and re-pin) one tenant's prefixes: at startup and after its quota changed."""
        if isinstance(tenant, str):
            try:
                tenant = await self.tenants.get_tenant(tenant)
            except TenantNotFound:
                return
        prefixes = await self.tenants.list_prefixes(tenant.id)
        await self._warm_each(engine, prefixes, self.namespace(tenant))

    async def _warm_each(
        self, engine: EngineClient, prefixes: list[Prefix], namespace: str | None
    ) -> None:
        for prefix in prefixes:
            try:
                await self._warm(engine, prefix, namespace)
            except _ENGINE_REFUSALS as exc:
                logger.warning("prefix %r of %s not warmed: %s", prefix.name, prefix.owner, exc)

    # ---- use by reference -----------------------------------------------------------------
    async def resolve(
        self,
        engine: EngineClient,
        principal: Principal,
        name: str | None,
        cache_key: str | None,
    ) -> Prefix | None:
        """The prefix a request names with `prefix` (unknown: 404 on `prefix`) or with
        `prompt_cache_key` (unknown: an ordinary request). Counts the use, extends the lease."""
        if name is None:
            if cache_key is None or not _NAME.fullmatch(cache_key):
                return None
            try:
                return await self.resolve(engine, principal, cache_key, None)
            except PrefixNotFound:
                return None
        if not _NAME.fullmatch(name):
            raise PrefixNotFound(name)
        prefix = await self.tenants.use_prefix(principal.tenant, name)
        scope = "public" if prefix.owner is None else "private"
        self.metrics.prefix_requests.labels(principal.tenant, scope).inc()
        if prefix.pinned:
            namespace = PUBLIC_NAMESPACE if prefix.owner is None else principal.namespace
            self._keep_pinned(engine, prefix, namespace)
        return prefix

    def _keep_pinned(self, engine: EngineClient, prefix: Prefix, namespace: str | None) -> None:
        """Move the engine pin's lease end; if this engine does not hold the pin (registered
        through another gateway, or expired here first), pin it again. In the background: the
        engine thread answers between steps, and the request must not wait for one."""
        key = pin_key(prefix.owner, prefix.name)

        async def extend_or_pin() -> None:
            if not await engine.extend_pin(key, lease_end(prefix)):
                await self._warm(engine, prefix, namespace)

        self._spawn(extend_or_pin())

    def shared_blocks(self, engine: EngineClient, prompt: list[int], used: Prefix | None) -> int:
        """Leading blocks of `prompt` that are a public prefix's (the longest one it starts
        with): they are hashed in the public namespace, the rest in the tenant's."""
        self._refresh_public_soon()
        bs = engine.block_size
        candidates = (
            [*self._public, used] if used is not None and used.owner is None else self._public
        )
        best = 0
        for p in candidates:
            n = p.num_blocks * bs
            if p.num_blocks > best and len(prompt) > n and prompt[:n] == p.token_ids[:n]:
                best = p.num_blocks
        return best

    def hooks(self, inner: GenerationHooks, prefix: Prefix | None) -> GenerationHooks:
        return inner if prefix is None else PrefixUseHooks(inner, self, prefix)

    async def record(self, prefix: Prefix, tenant: str, cached_tokens: int) -> None:
        """A request that used `prefix` was served `cached_tokens` from the cache."""
        served = min(cached_tokens, prefix.token_count)
        self.metrics.prefix_cached_tokens.labels(tenant).inc(served)
        await self.tenants.count_prefix_tokens(prefix, served)

    # ---- this process's copy of the public prefixes (for automatic hits) -------------------
    def _refresh_public_soon(self) -> None:
        if time.monotonic() - self._public_at < _PUBLIC_REFRESH_S:
            return
        self._public_at = time.monotonic()  # one refresh at a time
        self._spawn(self._refresh_public())

    async def _refresh_public(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # the stale copy serves; the next retries
            self._public = await self.tenants.list_prefixes(None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("prefix background task failed: %r", task.exception())


class PrefixUseHooks(GenerationHooks):
    """The request's hooks, plus the prefix's counters at settlement."""

    def __init__(self, inner: GenerationHooks, registry: PrefixRegistry, prefix: Prefix) -> None:
        self.inner = inner
        self.registry = registry
        self.prefix = prefix

    async def admit(self, info: GenerationInfo) -> Mapping[str, str]:
        return await self.inner.admit(info)

    async def settle(self, info: GenerationInfo, usage: UsageCounts, outcome: Outcome) -> None:
        await self.inner.settle(info, usage, outcome)
        if outcome != "rejected":
            await self.registry.record(self.prefix, info.principal.tenant, usage.cached_tokens)
