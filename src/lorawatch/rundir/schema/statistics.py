"""seed-S/statistics.json: is a difference real? (analysis/significance.py, analysis/verdicts.py)"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from lorawatch.rundir.schema.base import Part, Record

Probability = Annotated[float, Field(ge=0, le=1)]
Difference = Annotated[float, Field(ge=-1, le=1)]


class StatisticsParams(Part):
    """The settings the record was computed with (config.StatisticsSettings)."""

    alpha: float = Field(gt=0, lt=1)
    correction: Literal["holm", "none"]
    confidence: float = Field(gt=0, lt=1)
    resamples: PositiveInt
    power: float = Field(gt=0, lt=1)
    seed: NonNegativeInt


class AccuracyInterval(Part):
    """One cell of the accuracy matrix with its Wilson interval."""

    checkpoint: str
    task: str
    n: PositiveInt
    correct: NonNegativeInt
    accuracy: Probability
    low: Probability
    high: Probability


class TaskComparison(Part):
    """Two checkpoints on the same rows of one task: flips, exact McNemar, paired bootstrap, verdict."""

    task: str
    n: PositiveInt
    accuracy_before: Probability
    accuracy_after: Probability
    difference: Difference
    ci_low: Difference  # paired bootstrap interval of the difference
    ci_high: Difference
    improved: NonNegativeInt  # wrong -> right
    regressed: NonNegativeInt  # right -> wrong: the negative flips
    negative_flip_rate: Probability
    p_value: Probability
    p_adjusted: Probability  # over the comparison's tasks (settings.correction)
    verdict: Literal["regressed", "improved", "no detectable change"]


class Comparison(Part):
    """A checkpoint against an earlier one of the same seed, on every task."""

    stage: NonNegativeInt
    checkpoint: str
    against: Literal["previous", "base", "stage"]
    against_stage: NonNegativeInt
    against_checkpoint: str
    tasks: list[TaskComparison]
    # mean KL to base on the reference set, before and after, and the paired bootstrap interval of its change
    kl_before: float | None = None
    kl_after: float | None = None
    kl_ci_low: float | None = None
    kl_ci_high: float | None = None

    def regressed(self) -> list[TaskComparison]:
        return [t for t in self.tasks if t.verdict == "regressed"]


class Interval(Part):
    """A number with its bootstrap interval over test rows."""

    metric: str
    value: float
    low: float
    high: float


class MetricInterval(Interval):
    """A checkpoint's continual-learning metric with its interval."""

    checkpoint: str


class DetectableDrop(Part):
    """The smallest drop a task's test size can show (significance.detectable_drop)."""

    task: str
    n: PositiveInt
    alpha: float = Field(gt=0, lt=1)  # per test, after the correction's strictest step
    min_flips: PositiveInt | None  # negative flips, with no positive one, needed for significance
    floor: Probability | None  # min_flips / n: no smaller drop can be significant
    drop_at_power: Probability | None  # the true drop detected with `power` (best case)
    power: float = Field(gt=0, lt=1)


class StatisticsRecord(Record):
    """seed-S/statistics.json: Wilson intervals of every accuracy, bootstrap intervals of the CL metrics, every
    trained checkpoint against the previous one and the base with a verdict per task, and what each task's test
    size can detect."""

    settings: StatisticsParams
    accuracy: list[AccuracyInterval]
    metrics: list[MetricInterval]
    headline: list[Interval]  # the run's: final average accuracy, BWT, FWT, LA, mean gain, final KL to base
    drift: list[MetricInterval]  # each checkpoint's mean KL to base, with its interval over the reference rows
    comparisons: list[Comparison]
    detectable: list[DetectableDrop]

    def comparison(self, stage: int, against: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.stage == stage and c.against == against), None)
