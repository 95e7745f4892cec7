"""Quotas around each generation: `TenantService.admit` before the engine, `settle` after.

Per request: one admission (checks every limit, takes a concurrency lease, reserves
`prompt_tokens + max_tokens x n`), the lease renewed while the request runs (`svc.hold`), and
one settlement with the real usage whatever the end (finished, error, client disconnect,
engine refusal). A refusal is answered with the decision's status (429, or 400 for
`max_tokens_per_request`), OpenAI's error body and the `x-ratelimit-*` / `retry-after` headers;
an admitted request carries the `x-ratelimit-*` headers on its JSON or SSE response.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import APIError, from_refusal, from_tenants_error
from gateway.hooks import GenerationHooks, GenerationInfo, Outcome, UsageCounts
from gateway.metrics import GatewayMetrics
from tenants import (
    AdmissionDecision,
    AuthenticationError,
    TenantNotFound,
    TenantsError,
    TenantService,
    Ticket,
)


@dataclass(slots=True)
class _Admitted:
    ticket: Ticket
    lease: contextlib.AsyncExitStack  # holds `svc.hold(ticket)`: lease renewal until settled


class QuotaHooks(GenerationHooks):
    """`GenerationHooks` over a `TenantService`; one per app."""

    def __init__(self, tenants: TenantService, metrics: GatewayMetrics) -> None:
        self.tenants = tenants
        self.metrics = metrics
        self._admitted: dict[str, _Admitted] = {}  # request id -> ticket, until settled

    @property
    def in_flight(self) -> int:
        """Admitted requests not settled yet."""
        return len(self._admitted)

    async def admit(self, info: GenerationInfo) -> Mapping[str, str]:
        tenant = info.principal.tenant
        try:
            decision = await self.tenants.admit(
                tenant, prompt_tokens=info.prompt_tokens, max_tokens=info.max_completion_tokens
            )
        except TenantNotFound:  # deleted since its key was checked: the key is dead too
            raise from_tenants_error(AuthenticationError()) from None
        except TenantsError as exc:
            raise from_tenants_error(exc) from None
        if not decision.admitted:
            raise self._refusal(tenant, decision)
        assert decision.ticket is not None
        lease = contextlib.AsyncExitStack()
        await lease.enter_async_context(self.tenants.hold(decision.ticket))
        self._admitted[info.request_id] = _Admitted(decision.ticket, lease)
        return decision.headers

    def _refusal(self, tenant: str, decision: AdmissionDecision) -> APIError:
        limit = decision.limit.value if decision.limit is not None else "unknown"
        self.metrics.rate_limited.labels(tenant, limit).inc()
        return from_refusal(decision)

    async def settle(self, info: GenerationInfo, usage: UsageCounts, outcome: Outcome) -> None:
        admitted = self._admitted.pop(info.request_id, None)
        if admitted is None:  # never admitted, or settled already
            return
        try:
            await admitted.lease.aclose()
        finally:
            await self.tenants.settle(
                admitted.ticket,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
            )
