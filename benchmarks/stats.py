"""Statistics over seeds: the median of a figure with a bootstrap 95% interval.

Each seed is one arrival sequence (benchmarks/workload.py: common random numbers, the same
sequence for every system and load level), so a figure per seed is one independent sample, and a
ratio between two systems on the same seed is a paired sample. With n seeds the interval is the
2.5th-97.5th percentile of the medians of 2,000 resamples (with replacement) of the n values
(Efron & Tibshirani, An Introduction to the Bootstrap, ch. 13: the percentile interval). With 5
seeds it is wide, as it should be.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence


def median_interval(values: Sequence[float | None], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float] | None:
    """(median, low, high) of `values` with the percentile-bootstrap 95% interval of the median,
    None values left out (a run without the figure); None without values. One value gives (v, v, v)."""
    found = [v for v in values if v is not None]
    if not found:
        return None
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(found, k=len(found))) for _ in range(resamples))
    return (statistics.median(found), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1])


def paired_ratios(values: dict[int, float | None], bases: dict[int, float | None]) -> list[float]:
    """value / base for each seed present in both with a non-zero base."""
    return [values[s] / bases[s] for s in values
            if values[s] is not None and bases.get(s) not in (None, 0)]


def text(interval: tuple[float, float, float] | None, digits: int = 2, scale: float = 1.0) -> str:
    """"1.23 [1.10-1.40]", or "-" without an interval."""
    if interval is None:
        return "-"
    m, lo, hi = (x * scale for x in interval)
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"
