"""What happens when the shared store (Redis) fails: fail fast, count, queue, replay.

- `Breaker`: after a failure, calls fail at once for `cooldown_s` instead of each waiting for a
  timeout; then a single call probes, and its success closes the breaker.
- `StoreStats`: counters and gauges the gateway exports to Prometheus.
- `PendingSettlements`: settlements that could not reach Redis (and usage admitted by the local
  fallback in `open` mode), replayed in order once Redis answers again. Bounded: the oldest are
  dropped (and counted) past `maxlen`.

The failure modes themselves (`closed`: raise `StoreUnavailable`, `open`: admit with
per-process limits) are applied by `TenantService`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum

from .periods import Periods
from .store import Consumption, Ticket


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

    def pop(self) -> None:
        """Remove the head after it was replayed."""
        self._items.popleft()
        self._stats.settlements_replayed_total += 1
        self._stats.pending_settlements = len(self._items)
