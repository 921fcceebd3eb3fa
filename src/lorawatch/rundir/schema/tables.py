"""The tables' records: seed-S/cl_metrics.json (with its CSV twins) and summary/summary.json, and the columns
each CSV table must have."""

from __future__ import annotations

from lorawatch.rundir.schema.base import Part, Record


class CheckpointMetrics(Part):
    """The metrics of one row of R (analysis/metrics.py). `checkpoint` is "base", then the task names in training
    order."""

    checkpoint: str
    op: float | None
    bwt: float | None
    fwt: float | None
    avg_all: float
    gain: float | None
    delta_vs_base: float | None


class ClMetricsRecord(Record):
    """seed-S/cl_metrics.json (and its CSV twins accuracy_matrix.csv, cl_metrics.csv, stability.csv)."""

    tasks: list[str]
    per_checkpoint: list[CheckpointMetrics]
    summary: dict[str, float | int | None]


class MeanStd(Part):
    mean: float | None
    std: float | None
    ci_low: float | None = None  # Student t interval of the mean over seeds; None for one seed (and before v2)
    ci_high: float | None = None


class Summary(Record):
    """summary/summary.json: the headline numbers per seed and their mean and std over seeds."""

    seeds: list[int]
    per_seed: dict[str, dict[str, float | int | None]]
    mean_std: dict[str, MeanStd]

# The columns each CSV table must have (more may follow, e.g. the task columns of the accuracy matrix).
TABLE_COLUMNS = {
    "accuracy_matrix": ("checkpoint",),
    "cl_metrics": ("checkpoint", "op", "bwt", "fwt", "avg_all", "gain", "delta_vs_base"),
    "stability": ("checkpoint", "reference_accuracy", "kl_mean", "entropy_mean", "margin_mean"),
}
