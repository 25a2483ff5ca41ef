"""Latency percentiles, throughput and accuracy: the numbers every report is made of."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation between order statistics); None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_summary(seconds: Sequence[float], percentiles: Sequence[int] = PERCENTILES) -> dict:
    """count, mean, min, max and percentiles of latencies given in seconds, reported in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    summary: dict = {"count": int(ms.size)}
    for name, fn in (("mean_ms", np.mean), ("min_ms", np.min), ("max_ms", np.max)):
        summary[name] = float(fn(ms)) if ms.size else None
    for q in percentiles:
        summary[f"p{q}_ms"] = percentile(ms, q)
    return summary


def throughput(count: float, seconds: float) -> float | None:
    """Items per second; None when no time elapsed."""
    return count / seconds if seconds > 0 else None


def accuracy(correct: int, total: int) -> float | None:
    """Fraction correct; None when nothing was scored."""
    return correct / total if total else None
