"""Calendar periods, window arithmetic and OpenAI duration format; Lua constants in sync."""

from __future__ import annotations

import re
from datetime import datetime
from importlib import resources

import pytest

from tenants import periods
from tenants.periods import UTC, Periods, format_duration


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("now", "day", "month", "day_end", "month_end"),
    [
        ("2025-03-14T12:00:00", "2025-03-14", "2025-03", "2025-03-15", "2025-04-01"),
        ("2025-01-31T23:59:59.999", "2025-01-31", "2025-01", "2025-02-01", "2025-02-01"),
        ("2024-02-29T00:00:00", "2024-02-29", "2024-02", "2024-03-01", "2024-03-01"),
        ("2024-12-31T23:59:59", "2024-12-31", "2024-12", "2025-01-01", "2025-01-01"),
        ("2025-01-01T00:00:00", "2025-01-01", "2025-01", "2025-01-02", "2025-02-01"),
    ],
)
def test_periods(now: str, day: str, month: str, day_end: str, month_end: str) -> None:
    p = Periods.at(ts(now))
    assert (p.day, p.month) == (day, month)
    assert p.day_end_ms == ts(day_end) * 1000 and p.month_end_ms == ts(month_end) * 1000
    assert p.recent_minutes(3) == [p.minute - 2, p.minute - 1, p.minute]


def test_window_arithmetic() -> None:
    now = 1_000_000_500  # ms
    assert periods.bucket_of(now) == 1_000_000
    assert periods.oldest_live_bucket(now) == 1_000_000 - 59
    assert periods.bucket_expiry_ms(1_000_000) == 1_000_060_000


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (-5, "0s"),
        (1, "1ms"),
        (120, "120ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (61_250, "1m1.25s"),
        (3_661_000, "1h1m1s"),
        (86_400_000, "24h0m0s"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def test_lua_constants_match_python() -> None:
    lib = resources.files("tenants").joinpath("lua/_lib.lua").read_text()
    found = dict(re.findall(r"^local (\w+) = (\d+)", lib, re.M))
    assert int(found["BUCKET_MS"]) == periods.BUCKET_MS
    assert int(found["BUCKETS"]) == periods.BUCKETS_PER_WINDOW
    from tenants.memory_store import RETRY_SOFT_MS

    assert int(found["RETRY_SOFT_MS"]) == RETRY_SOFT_MS
