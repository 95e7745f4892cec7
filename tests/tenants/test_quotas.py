"""Quota semantics at their edges, through `TenantService` on both stores with a fake clock:
sliding per-minute windows, UTC day/month budgets, reservations and settlement, leases."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

import pytest

from tenants import AdmissionDecision, Limit, Store, TenantService, Ticket
from tenants.quotas import decide
from tenants.store import AdmitResult, Refusal, WindowState

from .conftest import FakeClock


async def make(svc: TenantService, **quota: int) -> None:
    await svc.create_tenant({"id": "acme", "quota": quota})


async def admit(svc: TenantService, prompt: int = 10, max_tokens: int = 0) -> AdmissionDecision:
    return await svc.admit("acme", prompt_tokens=prompt, max_tokens=max_tokens)


def ticket(d: AdmissionDecision) -> Ticket:
    assert d.admitted and d.ticket is not None, d.message
    return d.ticket


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- requests_per_minute: a sliding window of 60 one-second buckets -------------------------------


async def test_rpm_window_edge(service: TenantService, clock: FakeClock) -> None:
    await make(service, requests_per_minute=3)
    for _ in range(3):
        d = await admit(service)
        assert d.admitted
    assert d.headers["x-ratelimit-limit-requests"] == "3"
    assert d.headers["x-ratelimit-remaining-requests"] == "0"
    assert d.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.advance(59.999)
    d = await admit(service)
    assert not d.admitted and d.limit is Limit.REQUESTS_PER_MINUTE and not d.hard
    assert d.retry_after == pytest.approx(0.001) and d.headers["retry-after"] == "1"
    assert d.headers["x-ratelimit-reset-requests"] == "1ms"
    assert "requests_per_minute" in (d.message or "") and "Limit 3, Used 3" in (d.message or "")
    clock.advance(0.001)  # the bucket of the first three leaves the window exactly now
    assert (await admit(service)).admitted


async def test_rpm_no_double_burst_across_the_minute(
    service: TenantService, clock: FakeClock
) -> None:
    await make(service, requests_per_minute=3)
    clock.advance(59.5)  # 12:00:59.5
    for _ in range(3):
        assert (await admit(service)).admitted
    clock.advance(1.0)  # 12:01:00.5: a fixed window would start over here
    d = await admit(service)
    assert not d.admitted and d.retry_after == pytest.approx(58.5)  # bucket 59 leaves at 119


async def test_rpm_frees_one_bucket_at_a_time(service: TenantService, clock: FakeClock) -> None:
    await make(service, requests_per_minute=3)
    for step in (0, 30, 29):  # t = 0, 30, 59
        clock.advance(step)
        assert (await admit(service)).admitted
    clock.advance(0.5)  # t = 59.5
    d = await admit(service)
    assert not d.admitted and d.retry_after == pytest.approx(0.5)
    assert d.headers["x-ratelimit-remaining-requests"] == "0"
    assert d.headers["x-ratelimit-reset-requests"] == "59.5s"  # until the t=59 request leaves
    clock.advance(0.5)  # t = 60: the t=0 request left
    assert (await admit(service)).admitted
    clock.advance(0.5)
    d = await admit(service)
    assert not d.admitted and d.retry_after == pytest.approx(29.5)  # until t = 90


# -- tokens_per_minute: reserved at admission, settled with the real usage ---------------------


async def test_tpm_reservation_then_settlement(service: TenantService, clock: FakeClock) -> None:
    await make(service, tokens_per_minute=100)
    first = await admit(service, prompt=40, max_tokens=50)
    assert first.headers["x-ratelimit-remaining-tokens"] == "10"
    d = await admit(service, prompt=10, max_tokens=10)
    assert not d.admitted and d.limit is Limit.TOKENS_PER_MINUTE and not d.hard
    assert "Limit 100, Used 90, Requested 20" in (d.message or "")
    clock.advance(1)
    await service.settle(ticket(first), prompt_tokens=40, completion_tokens=5)
    d = await admit(service, prompt=10, max_tokens=10)
    assert d.admitted and d.headers["x-ratelimit-remaining-tokens"] == str(100 - 45 - 20)


async def test_tpm_request_too_large_has_no_retry(service: TenantService) -> None:
    await make(service, tokens_per_minute=100, requests_per_minute=1)
    assert (await admit(service)).admitted
    d = await admit(service, prompt=80, max_tokens=50)
    assert not d.admitted and d.limit is Limit.TOKENS_PER_MINUTE  # never fits: reported first
    assert d.retry_after is None and "retry-after" not in d.headers
    assert (d.message or "").startswith("Request too large for tokens per minute")


async def test_settlement_after_window_moved_on(service: TenantService, clock: FakeClock) -> None:
    await make(service, tokens_per_minute=100)
    long = ticket(await admit(service, prompt=10, max_tokens=80))
    clock.advance(61)  # the reservation left the window; settling must not touch the new one
    now = ticket(await admit(service, prompt=10, max_tokens=80))
    await service.settle(long, prompt_tokens=10, completion_tokens=1)
    d = await admit(service, prompt=6, max_tokens=5)
    assert not d.admitted and "Used 90, Requested 11" in (d.message or "")
    await service.settle(now, prompt_tokens=10, completion_tokens=0)
    assert (await admit(service, prompt=6, max_tokens=5)).admitted


# -- settlement -----------------------------------------------------------------------------


async def test_disconnect_settles_with_zero_completion(service: TenantService) -> None:
    await make(service, tokens_per_day=1000, max_concurrent_requests=1)
    t = ticket(await admit(service, prompt=30, max_tokens=500))
    usage = await service.get_usage("acme")
    assert usage.today.reserved_tokens == 530 and usage.in_flight == 1
    assert usage.today.remaining == 470
    await service.settle(t, prompt_tokens=30, completion_tokens=0, cached_tokens=16)
    await service.settle(t, prompt_tokens=30, completion_tokens=0)  # second call: no effect
    usage = await service.get_usage("acme")
    assert usage.in_flight == 0 and usage.today.reserved_tokens == 0
    assert usage.today.total_tokens == 30 and usage.today.cached_tokens == 16
    assert usage.today.requests == 1 and usage.today.remaining == 970
    assert (await admit(service)).admitted  # the slot is free again


async def test_usage_beyond_reservation_is_charged(service: TenantService) -> None:
    await make(service, tokens_per_day=100)
    t = ticket(await admit(service, prompt=10, max_tokens=10))
    await service.settle(t, prompt_tokens=12, completion_tokens=15)
    assert (await service.get_usage("acme")).today.total_tokens == 27


# -- budgets: UTC calendar day and month ------------------------------------------------------


async def test_day_budget_rolls_over_at_utc_midnight(
    service: TenantService, clock: FakeClock
) -> None:
    clock.set(utc("2025-03-14T23:59:58Z"))
    await make(service, tokens_per_day=100)
    await service.settle(
        ticket(await admit(service, 60, 40)), prompt_tokens=60, completion_tokens=40
    )
    clock.set(utc("2025-03-14T23:59:59.250Z"))
    d = await admit(service, prompt=1)
    assert not d.admitted and d.limit is Limit.TOKENS_PER_DAY and d.hard
    assert d.retry_after == pytest.approx(0.75) and d.headers["retry-after"] == "1"
    assert "tokens_per_day" in (d.message or "") and "resets in 750ms" in (d.message or "")
    clock.set(utc("2025-03-14T23:59:59.999Z"))
    assert not (await admit(service, prompt=1)).admitted
    clock.set(utc("2025-03-15T00:00:00Z"))
    assert (await admit(service, prompt=100)).admitted
    usage = await service.get_usage("acme")
    assert usage.today.period == "2025-03-15" and usage.today.reserved_tokens == 100
    assert usage.this_month.total_tokens == 100 and usage.this_month.reserved_tokens == 100


async def test_request_is_charged_to_the_day_it_was_admitted(
    service: TenantService, clock: FakeClock
) -> None:
    clock.set(utc("2025-03-14T23:59:59Z"))
    await make(service, tokens_per_day=100)
    t = ticket(await admit(service, prompt=50, max_tokens=50))
    clock.set(utc("2025-03-15T00:00:30Z"))
    await service.settle(t, prompt_tokens=50, completion_tokens=20)
    usage = await service.get_usage("acme")
    assert usage.today.total_tokens == 0 and usage.today.requests == 0
    assert usage.this_month.total_tokens == 70 and usage.recent[-1].completion_tokens == 20
    assert (await admit(service, prompt=100)).admitted


async def test_budget_held_by_requests_in_flight_is_a_rate_limit(service: TenantService) -> None:
    await make(service, tokens_per_day=100)
    t = ticket(await admit(service, prompt=10, max_tokens=80))
    d = await admit(service, prompt=5, max_tokens=10)
    assert not d.admitted and d.limit is Limit.TOKENS_PER_DAY
    assert not d.hard and d.retry_after == 1.0
    await service.settle(t, prompt_tokens=10, completion_tokens=5)
    assert (await admit(service, prompt=5, max_tokens=10)).admitted


async def test_month_budget_rolls_over(service: TenantService, clock: FakeClock) -> None:
    clock.set(utc("2024-12-31T23:59:59.500Z"))
    await make(service, tokens_per_month=50, tokens_per_day=1000)
    await service.settle(ticket(await admit(service, 50)), prompt_tokens=50, completion_tokens=0)
    d = await admit(service, prompt=1)
    assert not d.admitted and d.limit is Limit.TOKENS_PER_MONTH and d.hard
    assert d.retry_after == pytest.approx(0.5)
    clock.set(utc("2025-01-01T00:00:00Z"))
    assert (await admit(service, prompt=50)).admitted
    usage = await service.get_usage("acme")
    assert usage.this_month.period == "2025-01" and usage.today.period == "2025-01-01"


async def test_budget_larger_than_request_never_fits(service: TenantService) -> None:
    await make(service, tokens_per_day=100)
    d = await admit(service, prompt=90, max_tokens=20)
    assert not d.admitted and d.hard and d.retry_after is None


# -- max_tokens_per_request and concurrency ----------------------------------------------------


async def test_max_tokens_per_request_is_a_400(service: TenantService) -> None:
    await make(service, max_tokens_per_request=256)
    assert (await admit(service, max_tokens=256)).admitted
    d = await admit(service, max_tokens=257)
    assert not d.admitted and d.limit is Limit.MAX_TOKENS_PER_REQUEST and d.retry_after is None


async def test_concurrency_slot_and_lease_expiry(service: TenantService, clock: FakeClock) -> None:
    await make(service, max_concurrent_requests=2)
    a = ticket(await admit(service))
    ticket(await admit(service))
    d = await admit(service)
    assert not d.admitted and d.limit is Limit.MAX_CONCURRENT_REQUESTS and d.retry_after == 1.0
    await service.settle(a, prompt_tokens=10, completion_tokens=0)
    c = ticket(await admit(service))
    clock.advance(59.999)  # lease_ttl_s=60 in the fixture
    assert not (await admit(service)).admitted
    assert await service.renew(c)  # c's lease now runs to t=119.999
    clock.advance(0.001)  # b's lease expired: its slot is reclaimed by this admission
    assert (await admit(service)).admitted
    assert (await service.get_usage("acme")).in_flight == 2


async def test_hold_renews_the_lease(store: Store, clock: FakeClock) -> None:
    svc = TenantService(store, clock=clock, lease_ttl_s=0.3)
    await make(svc, max_concurrent_requests=1)
    t = ticket(await admit(svc))
    renewed_at: list[float] = []  # the fake clock at the start of each renewal that succeeded
    renewed = asyncio.Event()
    real_renew = svc.renew

    async def renew(t: Ticket) -> bool:
        now = clock()
        ok = await real_renew(t)
        if ok:
            renewed_at.append(now)
            renewed.set()
        return ok

    svc.renew = renew  # type: ignore[method-assign]
    async with svc.hold(t):
        for _ in range(4):
            clock.advance(0.15)  # half the TTL: without the renewal below it would lapse next
            while clock() not in renewed_at:  # a renewal at this instant, however long it takes
                renewed.clear()
                await renewed.wait()
        assert not (await admit(svc)).admitted  # 0.6 s on the clock: alive thanks to renewals
    await svc.settle(t, prompt_tokens=10, completion_tokens=1)
    assert (await admit(svc)).admitted


async def test_hold_ends_although_a_renewal_swallows_its_cancellation(
    store: Store, clock: FakeClock
) -> None:
    """Leaving `hold` while a renewal is in progress ends the renewals even when the store call
    swallows a cancellation (as a Redis client can when it lands mid-call): before, the loop
    went on renewing and the settlement after the block never came (found by bench/soak.py)."""
    svc = TenantService(store, clock=clock, lease_ttl_s=0.003)
    await make(svc, max_concurrent_requests=1)
    t = ticket(await admit(svc))
    renewing, release = asyncio.Event(), asyncio.Event()
    real_renew = svc.renew

    async def renew(t: Ticket) -> bool:
        renewing.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as the client did
            await release.wait()
        return await real_renew(t)

    svc.renew = renew  # type: ignore[method-assign]
    async with svc.hold(t):
        await renewing.wait()
        asyncio.get_running_loop().call_soon(release.set)
    await svc.settle(t, prompt_tokens=10, completion_tokens=1)
    assert (await admit(svc)).admitted


async def test_unknown_tenant_and_bad_counts(service: TenantService) -> None:
    from tenants import InvalidError, TenantNotFound

    with pytest.raises(TenantNotFound):
        await admit(service)
    await make(service)
    with pytest.raises(InvalidError):
        await service.admit("acme", prompt_tokens=-1, max_tokens=0)


async def test_unlimited_tenant_gets_no_rate_limit_headers(service: TenantService) -> None:
    await make(service)
    d = await admit(service)
    assert d.admitted and d.headers == {}


# -- decide(): pure -----------------------------------------------------------------------------


def refusal(limit: str, retry: int | None, hard: bool = False) -> Refusal:
    return Refusal(limit, retry, hard, 10, 10, 1)


def test_decide_waits_for_the_slowest_limit() -> None:
    result = AdmitResult(
        admitted=False,
        requests=WindowState(10, 10, 2_000),
        tokens=WindowState(100, 95, 30_500),
        in_flight=0,
        refusals=(refusal("requests_per_minute", 1_200), refusal("tokens_per_minute", 30_100)),
    )
    d = decide("acme", result)
    assert d.limit is Limit.REQUESTS_PER_MINUTE and d.retry_after == 30.1
    assert d.headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "5",
        "x-ratelimit-reset-tokens": "30.5s",
        "retry-after": "31",
    }
    assert not d.hard
    assert d.message == (
        "Rate limit reached for requests per minute (requests_per_minute) on tenant 'acme': "
        "Limit 10, Used 10, Requested 1. Please try again in 30.1s."
    )


def test_decide_reports_a_limit_that_never_fits() -> None:
    result = AdmitResult(
        admitted=False,
        requests=None,
        tokens=None,
        in_flight=0,
        refusals=(refusal("tokens_per_day", 5_000, hard=True), refusal("tokens_per_minute", None)),
    )
    d = decide("acme", result)
    assert d.limit is Limit.TOKENS_PER_MINUTE and d.retry_after is None and d.headers == {}


def test_decide_reports_the_first_of_several_limits_that_never_fit() -> None:
    never = (refusal("max_tokens_per_request", None), refusal("tokens_per_minute", None))
    d = decide("acme", AdmitResult(False, None, None, 0, refusals=never))
    assert d.limit is Limit.MAX_TOKENS_PER_REQUEST and not d.degraded
    assert d.message == (
        "max_tokens is too large for tenant 'acme': limit on max tokens per request "
        "(max_tokens_per_request) is 10, requested 1."
    )


def test_decide_with_a_limit_free_again_now() -> None:
    """A zero wait still asks for a retry after 1 s (the header has whole seconds)."""
    now = (refusal("max_concurrent_requests", 0),)
    d = decide("acme", AdmitResult(False, None, None, 0, refusals=now))
    assert d.limit is Limit.MAX_CONCURRENT_REQUESTS and d.retry_after == 0.0
    assert d.headers == {"retry-after": "1"} and not d.degraded
    assert d.message == (
        "Rate limit reached for concurrent requests (max_concurrent_requests) on tenant 'acme': "
        "Limit 10, Used 10, Requested 1. Please try again in 0s."
    )


def test_decide_admits_undegraded_unless_told() -> None:
    admitted = AdmitResult(True, None, None, 1)
    assert decide("acme", admitted) == AdmissionDecision(admitted=True, headers={})
    assert decide("acme", admitted, degraded=True).degraded
