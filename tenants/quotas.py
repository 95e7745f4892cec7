"""Admission decisions: which limit refused and why, and the `x-ratelimit-*` headers.

Windows (the semantics both stores implement; see `periods.py` for the arithmetic):

- `requests_per_minute` and `tokens_per_minute` are sliding windows of 60 one-second buckets:
  at any instant the requests (tokens) admitted in the current second and the 59 before it are at
  most the limit. No burst of twice the limit across a minute boundary, as fixed windows allow.
  Tokens are reserved at admission (prompt + max_tokens) and replaced by the real usage at
  settlement, in the bucket of the admission while that bucket is still in the window.
- `tokens_per_day` and `tokens_per_month` are fixed UTC calendar periods; reservations count
  against them until settled. A request is charged to the period it was admitted in.
- `max_concurrent_requests` counts leases: a lease expires `lease_ttl` after admission unless
  renewed, so a crashed gateway cannot hold slots forever (its reservations stay charged).
- `max_tokens_per_request` bounds the request's `max_tokens`.

Headers (OpenAI's names; only for the per-minute limits that are set):
`x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests`
and the `-tokens` trio. `reset` is the time until the window holds nothing again ("resets to its
initial state"), in OpenAI's format ("1s", "6m0s"). A refusal adds `retry-after` (whole seconds,
rounded up): the time until this request would fit, absent when it can never fit. The HTTP
status and error body of a refusal are the gateway's (`gateway.errors.from_refusal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from .periods import format_duration
from .store import AdmitResult, Refusal, Ticket, WindowState


class Limit(str, Enum):
    """Quota fields that can refuse a request, in the order they are reported."""

    MAX_TOKENS_PER_REQUEST = "max_tokens_per_request"
    TOKENS_PER_MONTH = "tokens_per_month"
    TOKENS_PER_DAY = "tokens_per_day"
    MAX_CONCURRENT_REQUESTS = "max_concurrent_requests"
    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"


_DESCRIPTIONS = {
    Limit.MAX_TOKENS_PER_REQUEST: "max tokens per request",
    Limit.TOKENS_PER_MONTH: "tokens per month",
    Limit.TOKENS_PER_DAY: "tokens per day",
    Limit.MAX_CONCURRENT_REQUESTS: "concurrent requests",
    Limit.REQUESTS_PER_MINUTE: "requests per minute",
    Limit.TOKENS_PER_MINUTE: "tokens per minute",
}


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    """Admit (keep `ticket`, settle it later) or refuse (`limit`, `hard`, `message`).

    `headers` go on the response either way; on refusal they include `retry-after` when a retry
    can succeed.
    """

    admitted: bool
    ticket: Ticket | None = None
    limit: Limit | None = None  # the limit reported: one it never fits, else first in `Limit` order
    hard: bool = False  # that limit's budget is spent by settled usage, not by requests in flight
    message: str | None = None
    retry_after: float | None = None  # seconds; None on admission or when it never fits
    headers: dict[str, str] = field(default_factory=dict)
    degraded: bool = False  # decided by the per-process fallback while Redis was down


def decide(tenant_id: str, result: AdmitResult, *, degraded: bool = False) -> AdmissionDecision:
    """Turn a store's raw admission result into the decision the gateway answers with."""
    headers = rate_limit_headers(result.requests, result.tokens)
    if result.admitted:
        return AdmissionDecision(
            admitted=True, ticket=result.ticket, headers=headers, degraded=degraded
        )
    # A limit the request can never fit decides; otherwise wait for the slowest limit to free.
    never = [r for r in result.refusals if r.retry_ms is None]
    refusal = never[0] if never else result.refusals[0]
    retry_ms = None if never else max(r.retry_ms or 0 for r in result.refusals)
    retry_after = None if retry_ms is None else retry_ms / 1000
    if retry_after is not None:
        headers["retry-after"] = str(max(math.ceil(retry_after), 1))
    limit = Limit(refusal.limit)
    return AdmissionDecision(
        admitted=False,
        limit=limit,
        hard=refusal.hard,
        message=_message(tenant_id, limit, refusal, retry_after),
        retry_after=retry_after,
        headers=headers,
        degraded=degraded,
    )


def rate_limit_headers(requests: WindowState | None, tokens: WindowState | None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the per-minute limits that are set."""
    headers: dict[str, str] = {}
    for suffix, state in (("requests", requests), ("tokens", tokens)):
        if state is not None:
            headers[f"x-ratelimit-limit-{suffix}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{suffix}"] = format_duration(state.reset_ms)
    return headers


def _message(tenant_id: str, limit: Limit, r: Refusal, retry_after: float | None) -> str:
    name = f"{_DESCRIPTIONS[limit]} ({limit.value})"
    if limit is Limit.MAX_TOKENS_PER_REQUEST:
        return (
            f"max_tokens is too large for tenant '{tenant_id}': limit on {name} is {r.value}, "
            f"requested {r.requested}."
        )
    numbers = f"Limit {r.value}, Used {r.used}, Requested {r.requested}."
    if r.retry_ms is None:
        return f"Request too large for {name} on tenant '{tenant_id}': {numbers}"
    if r.hard:
        head = f"You exceeded your token budget: {name} on tenant '{tenant_id}'."
        until = format_duration(r.retry_ms)
        return f"{head} {numbers} The budget resets in {until}."
    wait = format_duration(math.ceil((retry_after or 0) * 1000))
    head = f"Rate limit reached for {name} on tenant '{tenant_id}':"
    return f"{head} {numbers} Please try again in {wait}."
