"""What the benchmarks share: the order contenders run in, and how paired repeats are summarised.

A shared, noisy machine drifts between repeats, so every benchmark runs all its contenders once per repeat
and compares them within the repeat (paired ratios). The order changes from repeat to repeat as a balanced
Latin square, so no contender always runs first, last, or after the same neighbour. The median of the
paired ratios comes with a distribution-free confidence interval (two order statistics), which says how
far the median of a few repeats can be trusted without assuming the noise is normal.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any


def balanced_order(n: int, repeat: int) -> list[int]:
    """The order of ``n`` contenders in repeat ``repeat``: a Williams design (a balanced Latin square).

    Over ``n`` consecutive repeats (``2n`` when ``n`` is odd) every contender runs in every position equally
    often, and every contender directly follows every other equally often (for n = 2: AB, BA, AB, ...).
    """
    if n < 1:
        raise ValueError(f"need at least one contender, got {n}")
    base, low, high = [0], 1, n - 1
    while len(base) < n:  # 0, 1, n-1, 2, n-2, ...
        base.append(low)
        low += 1
        if len(base) < n:
            base.append(high)
            high -= 1
    row = [(x + repeat) % n for x in base]
    if n % 2 and (repeat // n) % 2:  # odd n needs the mirrored square as well to balance the neighbours
        row.reverse()
    return row


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median: the k-th smallest and k-th largest of the
    values, with the largest k whose coverage, ``1 - 2 P(Binomial(n, 1/2) < k)``, is at least ``level``.

    Returns (low, high, coverage). With fewer than 6 values no interval reaches 95%; then it is the full range
    with the coverage it does have (for 5 values 93.8%, for 1 value 0).
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


def paired_summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """The median of paired ratios, their spread and the median's confidence interval, rounded."""
    low, high, cover = median_ci(values)
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "ci": [round(low, digits), round(high, digits)],
        "ci_coverage": round(cover, 3),
        "values": [round(v, digits) for v in values],
    }


def describe(name: str, summary: dict[str, Any]) -> str:
    """One line for the human-readable output."""
    return (
        f"{name}: median {summary['median']:.4f} over {len(summary['values'])} paired repeats "
        f"(range {summary['min']:.4f}-{summary['max']:.4f}; the median lies in "
        f"{summary['ci'][0]:.4f}-{summary['ci'][1]:.4f} with {summary['ci_coverage']:.1%} confidence)"
    )


def machine_load() -> str:
    """The load averages and core count: a measurement taken while other work ran says so in its output."""
    one, five, _ = os.getloadavg()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {cores} cores"
