"""Drift statistics summarised the way llama.cpp's `llama-perplexity --kl-divergence` reports them.

For a per-row statistic: the mean with its standard error, and percentiles from the minimum to the maximum
(1, 5, 10, median, 90, 95, 99, 99.9). For a 0/1 statistic (same top token) the rate with its standard error.
For Δp also the root mean square with its standard error. The standard error of a mean is scipy's `sem`
(sample standard deviation over √n), which for 0/1 values is √(p(1 − p)/(n − 1)), llama.cpp's formula; the
RMS's is carried from the mean of squares by the delta method. Percentiles interpolate linearly between
order statistics (numpy's default), so with few rows the extreme ones are the extreme rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PERCENTILES = (("min", 0.0), ("p1", 1.0), ("p5", 5.0), ("p10", 10.0), ("median", 50.0), ("p90", 90.0),
               ("p95", 95.0), ("p99", 99.0), ("p99_9", 99.9), ("max", 100.0))


def _values(values: Sequence[float | None]) -> np.ndarray:
    array = np.array([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to summarise")
    return array


def _sem(array: np.ndarray) -> float:
    from scipy.stats import sem

    return float(sem(array)) if array.size > 1 else math.nan


def summarize_values(values: Sequence[float | None]) -> dict[str, float]:
    """n, mean, its standard error, and the percentiles of PERCENTILES (rows without a value are left out)."""
    array = _values(values)
    out = {"n": float(array.size), "mean": float(array.mean()), "se": _sem(array)}
    out.update({name: float(np.percentile(array, q)) for name, q in PERCENTILES})
    return out


def summarize_rate(flags: Sequence[int | bool]) -> dict[str, float]:
    """n, the share of rows where the flag holds, and its standard error."""
    array = _values([float(f) for f in flags])
    return {"n": float(array.size), "rate": float(array.mean()), "se": _sem(array)}


def summarize_delta_p(deltas: Sequence[float | None]) -> dict[str, float]:
    """Δp as llama.cpp reports it: the summary of summarize_values plus the RMS and its standard error."""
    array = _values(deltas)
    out = summarize_values(array.tolist())
    squares = array ** 2
    rms = float(math.sqrt(squares.mean()))
    out["rms"] = rms
    out["rms_se"] = _sem(squares) / (2 * rms) if rms > 0 else math.nan
    return out
