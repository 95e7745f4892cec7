"""Time arithmetic shared by both stores: sliding-window buckets and UTC calendar periods.

Everything the stores compare is an integer number of milliseconds since the epoch, computed here
from the caller's clock (`now` in float seconds), so that tests can drive time and the Lua scripts
never need Redis `TIME`.

Sliding window (requests_per_minute, tokens_per_minute)::

    bucket b covers [b*1000, (b+1)*1000) ms; a charge made at `now` goes to b = now_ms // 1000
    a bucket counts while  b > now_ms // 1000 - 60,  i.e. until the instant (b + 60) * 1000
    window used(now) = sum of the 60 live buckets (the current second and the 59 before it)

so a request counts for between 59 and 60 seconds, depending on where in its second it arrived.
Budgets (tokens_per_day, tokens_per_month) are fixed UTC calendar periods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

UTC = timezone.utc

WINDOW_MS = 60_000  # sliding window of the per-minute limits
BUCKET_MS = 1_000  # its granularity
BUCKETS_PER_WINDOW = WINDOW_MS // BUCKET_MS

DAY_TTL_S = 35 * 86_400  # how long a day's usage counters are kept
MONTH_TTL_S = 400 * 86_400  # how long a month's usage counters are kept
MINUTE_TTL_S = 2 * 3_600  # how long per-minute usage counters are kept
RECENT_MINUTES = 60  # minutes reported as "recent" usage


def to_ms(now: float) -> int:
    """Epoch seconds (float) to integer milliseconds, rounding down."""
    return math.floor(now * 1000)


def bucket_of(now_ms: int) -> int:
    """Sliding-window bucket (second) a charge at `now_ms` goes to."""
    return now_ms // BUCKET_MS


def oldest_live_bucket(now_ms: int) -> int:
    """Buckets below this one have left the window at `now_ms`."""
    return bucket_of(now_ms) - BUCKETS_PER_WINDOW + 1


def bucket_expiry_ms(bucket: int) -> int:
    """The instant at which `bucket` leaves the window."""
    return (bucket + BUCKETS_PER_WINDOW) * BUCKET_MS


@dataclass(frozen=True, slots=True)
class Periods:
    """The calendar periods containing one instant (all UTC)."""

    now_ms: int
    day: str  # "2025-01-31"
    month: str  # "2025-01"
    minute: int  # epoch minute, now_ms // 60_000
    day_end_ms: int  # next UTC midnight
    month_end_ms: int  # first instant of the next UTC month

    @classmethod
    def at(cls, now: float) -> Periods:
        """Periods containing epoch second `now`."""
        now_ms = to_ms(now)
        dt = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
        day_start = dt.replace(hour=0, minute=0, second=0, microsecond=0)
        next_day = day_start + timedelta(days=1)
        next_month = (day_start.replace(day=28) + timedelta(days=4)).replace(day=1)
        return cls(
            now_ms=now_ms,
            day=day_start.strftime("%Y-%m-%d"),
            month=day_start.strftime("%Y-%m"),
            minute=now_ms // 60_000,
            day_end_ms=_ms(next_day),
            month_end_ms=_ms(next_month),
        )

    def recent_minutes(self, count: int = RECENT_MINUTES) -> list[int]:
        """The last `count` epoch minutes, oldest first, the current one included."""
        return list(range(self.minute - count + 1, self.minute + 1))


def _ms(dt: datetime) -> int:
    return int(dt.timestamp()) * 1000


def utc(ms: int) -> datetime:
    """Epoch milliseconds to an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def format_duration(ms: int) -> str:
    """OpenAI's reset format (Go durations): "0s", "120ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"
