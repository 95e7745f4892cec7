"""What happens when the shared store (Redis) fails: fail fast, count, queue, replay.

- `Breaker`: after a failure, calls fail at once for `cooldown_s` instead of each waiting for a
  timeout; then a single call probes, and its success closes the breaker.
- `StoreStats`: counters and gauges the gateway exports to Prometheus.
- `PendingSettlements`: settlements that could not reach Redis (and usage admitted by the local
  fallback in `open` mode), replayed in order once Redis answers again. Bounded: the oldest are
  dropped (and counted) past `maxlen`.
- `StoreGuard`: every call to the shared store goes through it (breaker, stats, logging, replay).

The failure modes themselves (`closed`: raise `StoreUnavailable`, `open`: admit with
per-process limits) are applied by `TenantService`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, TypeVar

from .errors import StoreUnavailable
from .periods import Periods
from .store import Consumption, Store, Ticket

T = TypeVar("T")
log = logging.getLogger("prefixgate.tenants")


class FailureMode(str, Enum):
    """How admission and authentication behave while Redis is unreachable."""

    CLOSED = "closed"  # raise StoreUnavailable: the gateway answers 503
    OPEN = "open"  # admit known tenants with per-process limits, log loudly


@dataclass(slots=True)
class StoreStats:
    """Counters (`*_total`, monotonic) and gauges of the store's health."""

    errors_total: int = 0  # store calls that failed (connection refused, timeout, ...)
    fast_failures_total: int = 0  # calls refused without trying while the breaker was open
    fallback_authentications_total: int = 0  # keys accepted from the last-known cache (open)
    fallback_admissions_total: int = 0  # admissions decided by the local store (open)
    settlements_queued_total: int = 0  # settlements or local usage queued for replay
    settlements_replayed_total: int = 0
    settlements_dropped_total: int = 0  # queue overflow: that usage is lost
    available: bool = True  # gauge: the last store call succeeded
    pending_settlements: int = 0  # gauge

    def as_dict(self) -> dict[str, int]:
        """Flat name -> value, booleans as 0/1, for a metrics exporter."""
        return {k: int(v) for k, v in asdict(self).items()}


class Breaker:
    """Closed (calls go through) until a failure; then open for `cooldown_s`; then half-open:
    one probe at a time until a success closes it or a failure reopens it."""

    def __init__(self, cooldown_s: float, clock: Callable[[], float]) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        """Whether a call may try the store now (a half-open call becomes the probe)."""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._open_until, self._probing = None, False

    def failure(self) -> None:
        self._open_until, self._probing = self._clock() + self.cooldown_s, False

    def abandon(self) -> None:
        """A call ended without telling (cancelled, or a non-transport error)."""
        self._probing = False


@dataclass(frozen=True, slots=True)
class PendingSettlement:
    ticket: Ticket
    used: Consumption
    periods: Periods  # instant of the original settlement


class PendingSettlements:
    """FIFO of settlements waiting for the store, bounded at `maxlen`."""

    def __init__(self, stats: StoreStats, maxlen: int = 10_000) -> None:
        self._items: deque[PendingSettlement] = deque()
        self._stats = stats
        self.maxlen = maxlen

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: PendingSettlement) -> None:
        if len(self._items) >= self.maxlen:
            self._items.popleft()
            self._stats.settlements_dropped_total += 1
        self._items.append(item)
        self._stats.settlements_queued_total += 1
        self._stats.pending_settlements = len(self._items)

    def peek(self) -> PendingSettlement | None:
        return self._items[0] if self._items else None

    def pop(self, *, replayed: bool = True) -> None:
        """Remove the head after it was replayed (or dropped)."""
        self._items.popleft()
        if replayed:
            self._stats.settlements_replayed_total += 1
        else:
            self._stats.settlements_dropped_total += 1
        self._stats.pending_settlements = len(self._items)


class StoreGuard:
    """Calls to the shared store through the breaker, counting failures, logging the outage
    once, and replaying queued settlements in the background once the store answers again."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        failure_mode: FailureMode,
        cooldown_s: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        self.store = store
        self.failure_mode = failure_mode
        self.stats = StoreStats()
        self.breaker = Breaker(cooldown_s, clock)
        self.pending = PendingSettlements(self.stats, max_pending)
        self._flush_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run `op` against the store, or raise `StoreUnavailable` at once while the breaker
        is open."""
        if not self.breaker.allow():
            self.stats.fast_failures_total += 1
            raise StoreUnavailable("circuit open after a recent failure")
        try:
            result = await op()
        except StoreUnavailable as exc:
            self._on_failure(exc)
            raise
        except BaseException:
            self.breaker.abandon()
            raise
        self._on_success()
        return result

    def defer(self, ticket: Ticket, used: Consumption, periods: Periods) -> None:
        """Queue a settlement for replay."""
        self.pending.push(PendingSettlement(ticket, used, periods))

    async def flush(self) -> int:
        """Replay queued settlements in order until done or the store fails; returns how many."""
        done = 0
        async with self._flush_lock:
            while (item := self.pending.peek()) is not None:
                try:
                    await self.call(lambda i=item: self.store.settle(i.ticket, i.used, i.periods))  # type: ignore[misc]
                except StoreUnavailable:
                    break
                except Exception:  # a bug, not an outage: drop it rather than block the queue
                    log.exception("dropping a settlement that cannot be replayed: %s", item)
                    self.pending.pop(replayed=False)
                    continue
                self.pending.pop()
                done += 1
        return done

    async def aclose(self) -> None:
        """Cancel a replay in progress (what is left stays queued)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_failure(self, exc: StoreUnavailable) -> None:
        self.stats.errors_total += 1
        self.breaker.failure()
        if self.stats.available:
            self.stats.available = False
            action = (
                "admitting known tenants with per-process limits"
                if self.failure_mode is FailureMode.OPEN
                else "answering 503"
            )
            log.error(
                "tenant store unavailable (%s); failure mode %s: %s",
                exc.detail,
                self.failure_mode.value,
                action,
            )

    def _on_success(self) -> None:
        self.breaker.success()
        if not self.stats.available:
            self.stats.available = True
            log.warning("tenant store available again; %d settlements to replay", len(self.pending))
        if len(self.pending) and not self._tasks:
            task = asyncio.ensure_future(self.flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
