"""Percentiles for the benchmarks, one definition for every script."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (q in 0..100) of `values` (any order), interpolated linearly between
    the two nearest ranks (numpy's default, `statistics.quantiles(method="inclusive")`); NaN
    when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)
