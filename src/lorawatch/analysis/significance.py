"""Is a difference real? The statistics behind every interval, p-value and verdict lorawatch prints.

Two checkpoints evaluated on the same test rows are paired: each row is right or wrong under both. What moves
an accuracy is the discordant rows only, right -> wrong (negative flips) against wrong -> right (positive flips):

    exact McNemar       two-sided binomial test, p = 1/2, on the discordant rows (statsmodels' `mcnemar`)
    paired bootstrap    resample row indices once and apply them to both checkpoints (scipy's `bootstrap`,
                        `paired=True`, percentile interval); the interval of the accuracy difference
    negative flip rate  right -> wrong rows over all rows (MUSCLE's NFR)
    Wilson interval     one accuracy on its own (statsmodels' `proportion_confint`)
    mean interval       a mean over rows, e.g. KL to base over the reference set (percentile bootstrap)
    Holm                the tasks of one comparison form a family; their p-values are adjusted together
    detectable drop     the smallest drop a test size can show at all, and with the asked power

The continual-learning metrics get intervals by resampling rows within each task, with the same indices for
every checkpoint so that a row keeps its pairing (`metric_intervals`). Across seeds a Student t interval of the
mean (`seed_interval`). Every bootstrap starts from a generator seeded with `StatisticsSettings.seed`, so the same
predictions always give the same intervals.

Pure numpy/scipy/statsmodels: it works on any machine from the predictions of a run folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lorawatch.config import StatisticsSettings

# scipy.stats and statsmodels are imported where they are used: together they add about a second to every
# command's start, and most commands (a run until its seed ends, check, data) never need them.

REGRESSED, IMPROVED, NO_CHANGE = "regressed", "improved", "no detectable change"


@dataclass(frozen=True)
class Paired:
    """Two checkpoints on the same n rows of one task."""

    n: int
    accuracy_before: float
    accuracy_after: float
    improved: int  # wrong -> right
    regressed: int  # right -> wrong: the negative flips
    p_value: float  # exact McNemar
    ci_low: float  # paired bootstrap interval of accuracy_after - accuracy_before
    ci_high: float

    @property
    def difference(self) -> float:
        return self.accuracy_after - self.accuracy_before

    @property
    def negative_flip_rate(self) -> float:
        return self.regressed / self.n


def wilson_interval(correct: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of `correct` out of `n`; it stays inside [0, 1] and is sound at 0 and n."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(correct, n, alpha=1 - confidence, method="wilson")
    # exactly 0 (1) when nothing (everything) is right; the formula's round-off would put the bound past it
    return 0.0 if correct == 0 else float(low), 1.0 if correct == n else float(high)


def mcnemar_p(improved: int, regressed: int) -> float:
    """Exact McNemar p-value: two-sided binomial test (p = 1/2) of the discordant rows. 1 when there are none."""
    if improved + regressed == 0:
        return 1.0
    from statsmodels.stats.contingency_tables import mcnemar

    return float(mcnemar([[0, improved], [regressed, 0]], exact=True).pvalue)


def paired_interval(before: np.ndarray, after: np.ndarray, settings: StatisticsSettings) -> tuple[float, float]:
    """Percentile paired-bootstrap interval of mean(after) - mean(before) over the same rows."""
    from scipy import stats

    before, after = _two_or_more(np.asarray(before, dtype=float)), _two_or_more(np.asarray(after, dtype=float))
    if np.array_equal(before, after):  # every resample gives 0: scipy would warn about degenerate data
        return 0.0, 0.0
    result = stats.bootstrap((before, after), _difference_of_means, paired=True, vectorized=True,
                             confidence_level=settings.confidence, n_resamples=settings.resamples,
                             method="percentile", rng=np.random.default_rng(settings.seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_interval(values: np.ndarray, settings: StatisticsSettings) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (e.g. KL to base over the reference rows)."""
    from scipy import stats

    x = _two_or_more(np.asarray(values, dtype=float))
    if np.ptp(x) == 0:  # every resample gives the same mean
        return float(x[0]), float(x[0])
    result = stats.bootstrap((x,), np.mean, confidence_level=settings.confidence, n_resamples=settings.resamples,
                             method="percentile", rng=np.random.default_rng(settings.seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _two_or_more(rows: np.ndarray) -> np.ndarray:
    """scipy's bootstrap needs two rows; a single row repeated resamples exactly as the row alone (always itself)."""
    return np.repeat(rows, 2, axis=-1) if rows.shape[-1] == 1 else rows


def _difference_of_means(before: np.ndarray, after: np.ndarray, axis: int = -1) -> np.ndarray:
    return after.mean(axis=axis) - before.mean(axis=axis)


def paired(before: Sequence[bool], after: Sequence[bool], settings: StatisticsSettings) -> Paired:
    """Everything lorawatch says about two checkpoints on one task's rows (aligned: row i is the same example)."""
    b, a = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if b.shape != a.shape or b.ndim != 1 or b.size == 0:
        raise ValueError(f"paired needs two equally long, non-empty rows of outcomes, got {b.shape} and {a.shape}")
    improved, regressed = int((~b & a).sum()), int((b & ~a).sum())
    low, high = paired_interval(b, a, settings)
    return Paired(n=int(b.size), accuracy_before=float(b.mean()), accuracy_after=float(a.mean()),
                  improved=improved, regressed=regressed, p_value=mcnemar_p(improved, regressed),
                  ci_low=low, ci_high=high)


def adjust(p_values: Sequence[float], correction: str) -> list[float]:
    """The family's p-values adjusted for testing them together (`holm`), or as they are (`none`)."""
    if correction == "none" or len(p_values) == 0:
        return [float(p) for p in p_values]
    if correction != "holm":
        raise ValueError(f"unknown correction {correction!r}; expected holm or none")
    # Holm's step-down: the i-th smallest p times (m - i), made monotone and capped at 1. Written out rather than
    # taken from statsmodels' multipletests, which runs gc.collect() on every call: 40-150 ms each in a process
    # holding a model, for every checkpoint's verdict. The tests check it against multipletests.
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return [float(a) for a in adjusted]


def verdict(difference: float, p_adjusted: float, alpha: float) -> str:
    if p_adjusted < alpha and difference < 0:
        return REGRESSED
    if p_adjusted < alpha and difference > 0:
        return IMPROVED
    return NO_CHANGE


# --- what a test size can show ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detectable:
    """The smallest drop in accuracy `n` rows can show, in the best case for the test: no row improves."""

    n: int
    alpha: float  # per test: the family's alpha over its size, the strictest step of Holm
    min_flips: int | None  # fewest negative flips (and no positive one) that reach p < alpha; None if n is too few
    floor: float | None  # min_flips / n: no smaller drop can reach significance, whatever the model does
    drop_at_power: float | None  # the true drop at which the test rejects with the asked power
    power: float


def detectable_drop(n: int, alpha: float, power: float, family_size: int = 1) -> Detectable:
    """What `n` test rows can detect at `alpha` (Holm over `family_size` tasks) with the asked `power`.

    A drop is seen only through negative flips; with m of them and no positive flip, McNemar's p is 2 * 0.5**m.
    The floor m/n is exact. The power figure models each row as flipping right -> wrong with probability d and
    never the other way, so it too is a best case: positive flips (there always are some) need larger drops.
    """
    from scipy import optimize, stats

    per_test = alpha / family_size if family_size > 1 else alpha
    min_flips = next((m for m in range(1, n + 1) if mcnemar_p(0, m) < per_test), None)
    if min_flips is None:
        return Detectable(n, per_test, None, None, None, power)

    def power_at(d: float) -> float:
        return float(stats.binom.sf(min_flips - 1, n, d)) - power

    drop = float(optimize.brentq(power_at, 1e-12, 1.0)) if power_at(1.0) > 0 else None
    return Detectable(n, per_test, min_flips, min_flips / n, drop, power)


# --- intervals of the continual-learning metrics --------------------------------------------------------------


def metric_intervals(outcomes: Sequence[np.ndarray], metrics: Callable[[np.ndarray], Mapping[str, float | None]],
                     settings: StatisticsSettings) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals of every metric `metrics` derives from an accuracy matrix.

    `outcomes[i]` is task i's (checkpoints x rows) array of right/wrong: rows are resampled within each task,
    independently across tasks, and the same resample is applied to every checkpoint (scipy's `bootstrap` with
    one sample per task, resampled along its rows). `metrics(R)` maps R (checkpoints x tasks) to named numbers;
    a metric undefined (None) at the point estimate gets None.
    """
    from scipy import stats

    samples = [_two_or_more(np.asarray(o, dtype=float)) for o in outcomes]
    point = metrics(np.stack([s.mean(axis=-1) for s in samples], axis=1))
    names = [name for name, value in point.items() if value is not None]
    out: dict[str, tuple[float, float] | None] = {name: None for name in point}
    if not names:
        return out

    def at(R: np.ndarray) -> np.ndarray:
        values = metrics(R)
        return np.array([values[name] for name in names], dtype=float)

    def statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        # each task's sample arrives as (checkpoints, resamples, rows): one accuracy matrix per resample
        R = np.stack([s.mean(axis=axis) for s in resampled], axis=-1)  # (checkpoints, resamples, tasks)
        if R.ndim == 2:
            return at(R)
        return np.stack([at(R[:, b, :]) for b in range(R.shape[1])], axis=-1)

    result = stats.bootstrap(samples, statistic, paired=False, vectorized=True, axis=-1,
                             confidence_level=settings.confidence, n_resamples=settings.resamples,
                             method="percentile", rng=np.random.default_rng(settings.seed))
    for name, low, high in zip(names, np.atleast_1d(result.confidence_interval.low),
                               np.atleast_1d(result.confidence_interval.high)):
        # a metric that no resample moves (e.g. every row right at every checkpoint) has a zero-width interval
        out[name] = (float(point[name]), float(point[name])) if math.isnan(low) else (float(low), float(high))
    return out


def seed_interval(values: Sequence[float], confidence: float) -> tuple[float, float] | None:
    """Student t interval of the mean over seeds; None with fewer than two seeds."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size < 2:
        return None
    sd = float(x.std(ddof=1))
    if sd == 0:
        return float(x.mean()), float(x.mean())
    low, high = stats.t.interval(confidence, df=x.size - 1, loc=x.mean(), scale=sd / math.sqrt(x.size))
    return float(low), float(high)
