"""Is a checkpoint worse? A seed's intervals and verdicts, from the predictions its run folder keeps.

Every test row's prediction is stored at every checkpoint, so any two checkpoints of a seed are compared on the
same rows (significance.py holds the statistics). For each seed this writes seed-S/statistics.json:

    accuracy     every cell of the accuracy matrix with its Wilson interval
    metrics      OP, BWT, FWT, average accuracy, gain, vs base per checkpoint, and the run's headline numbers,
                 each with a bootstrap interval over test rows (rows resampled within each task, the same
                 resample for every checkpoint)
    drift        each checkpoint's mean KL to base with a bootstrap interval over the reference rows
    comparisons  every trained checkpoint against the previous one and against the base: per task the flips,
                 exact McNemar p (adjusted over the tasks), paired bootstrap interval and a verdict
    detectable   the smallest drop each task's test size can show

`lorawatch gate` and `compare` use the same functions for the checkpoints and runs they are asked about.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorawatch.rundir import schema
from lorawatch.rundir.layout import RunFolder
from lorawatch.analysis import significance
from lorawatch.config import StatisticsSettings
from lorawatch.errors import UserError
from lorawatch.analysis.metrics import METRIC_COLUMNS, compute_cl_metrics, compute_unordered_metrics
HEADLINE_METRICS = ("final_avg_accuracy", "bwt", "fwt", "learning_accuracy", "mean_gain")


@dataclass
class SeedOutcomes:
    """Every test row's right/wrong at every finished checkpoint of one seed, rows aligned by example id."""

    seed: int
    checkpoints: list[str]  # stage order, the base model first
    tasks: list[str]  # the accuracy matrix's columns: training order when it is known
    ordered: bool  # stage k was trained on tasks[k-1]: the metrics that need the order are defined
    ids: dict[str, list[str]]
    correct: dict[str, np.ndarray]  # task -> (checkpoints, rows) of bool
    kl: np.ndarray  # (checkpoints, reference rows): KL to base per reference row

    def stage_index(self, stage: int | str) -> int:
        """A stage number, or `last`."""
        last = len(self.checkpoints) - 1
        if stage == "last":
            return last
        if not isinstance(stage, int) or not 0 <= stage <= last:
            raise UserError(f"seed {self.seed}: no finished stage {stage} (stages 0..{last})")
        return stage


def seed_outcomes(run_dir: Path, seed: int) -> SeedOutcomes:
    """Read a seed's finished stages (those with stage.json) and their predictions."""
    seed_folder = RunFolder(run_dir).seed(seed)
    stages = [k for k in seed_folder.stages_on_disk() if seed_folder.stage(k).finished()]
    if not stages:
        raise UserError(f"{seed_folder.path}: no finished stage")
    if stages != list(range(len(stages))):
        raise UserError(f"{seed_folder.path}: stages {stages} are not 0..{len(stages) - 1} in a row")
    records = [seed_folder.stage(k).record.load() for k in stages]
    scores = seed_folder.stage(0).scores.load().accuracy()
    trained = [r.task for r in records[1:]]
    ordered = bool(trained) and None not in trained and len(set(trained)) == len(trained)
    tasks = [name for name in scores if name != "reference"]
    if ordered and set(trained) == set(tasks):
        tasks = list(trained)
    else:
        ordered = False
    ids: dict[str, list[str]] = {}
    correct: dict[str, np.ndarray] = {}
    for task in tasks:
        rows = []
        for k in stages:
            rows_file = seed_folder.stage(k).predictions(task)
            path, predictions = rows_file.path, rows_file.load()
            by_id = {p.id: p.correct for p in predictions}
            if k == 0:
                ids[task] = [p.id for p in predictions]
            elif set(by_id) != set(ids[task]) or len(by_id) != len(predictions):
                raise UserError(f"{path}: its rows are not the base model's rows of {task!r}; checkpoints can only be "
                                "compared on the same rows")
            rows.append([by_id[i] for i in ids[task]])
        if not ids[task]:
            raise UserError(f"{seed_folder.stage(0).predictions(task).path}: no rows")
        correct[task] = np.array(rows, dtype=bool)
    drift = [seed_folder.stage(k).drift.load() for k in stages]
    reference_ids = [row.id for row in drift[0]]
    for k, rows in zip(stages, drift):
        if [row.id for row in rows] != reference_ids:
            raise UserError(f"{seed_folder.stage(k).drift.path}: its rows are not the "
                            "base model's reference rows")
    kl = np.array([[row.kl for row in rows] for rows in drift], dtype=float)
    return SeedOutcomes(seed, [r.checkpoint for r in records], tasks, ordered and len(stages) == len(tasks) + 1,
                        ids, correct, kl)


def compare_stages(outcomes: SeedOutcomes, stage: int, against: int, kind: str,
                   settings: StatisticsSettings) -> schema.Comparison:
    """Checkpoint `stage` against checkpoint `against` of the same seed, on every task; the tasks' p-values are
    adjusted together (settings.correction) and each gets a verdict at settings.alpha."""
    results = [significance.paired(outcomes.correct[t][against], outcomes.correct[t][stage], settings)
               for t in outcomes.tasks]
    kl_low, kl_high = significance.paired_interval(outcomes.kl[against], outcomes.kl[stage], settings)
    return schema.Comparison(stage=stage, checkpoint=outcomes.checkpoints[stage], against=kind,
                             against_stage=against, against_checkpoint=outcomes.checkpoints[against],
                             tasks=task_comparisons(outcomes.tasks, results, settings),
                             kl_before=float(outcomes.kl[against].mean()), kl_after=float(outcomes.kl[stage].mean()),
                             kl_ci_low=kl_low, kl_ci_high=kl_high)


def task_comparisons(tasks: list[str], results: list[significance.Paired],
                     settings: StatisticsSettings) -> list[schema.TaskComparison]:
    adjusted = significance.adjust([r.p_value for r in results], settings.correction)
    return [schema.TaskComparison(
        task=task, n=r.n, accuracy_before=r.accuracy_before, accuracy_after=r.accuracy_after,
        difference=r.difference, ci_low=r.ci_low, ci_high=r.ci_high, improved=r.improved, regressed=r.regressed,
        negative_flip_rate=r.negative_flip_rate, p_value=r.p_value, p_adjusted=p,
        verdict=significance.verdict(r.difference, p, settings.alpha)) for task, r, p in zip(tasks, results, adjusted)]


def _metrics_of(outcomes: SeedOutcomes):
    """R (checkpoints x tasks) -> every CL metric, keyed (checkpoint, metric), and the run's headline numbers,
    keyed (None, metric)."""
    def metrics(R: np.ndarray) -> dict[tuple[str | None, str], float | None]:
        if outcomes.ordered:
            result = compute_cl_metrics(R, outcomes.tasks)
        else:
            result = compute_unordered_metrics(R, outcomes.tasks, outcomes.checkpoints)
        values = {(row.checkpoint, m): getattr(row, m) for row in result.per_checkpoint for m in METRIC_COLUMNS}
        values.update({(None, m): result.summary[m] for m in HEADLINE_METRICS})
        # the paper's failure zone: did the final checkpoint's average over all tasks fall below the base model's?
        values[None, "final_avg_vs_base"] = result.per_checkpoint[-1].avg_all - result.per_checkpoint[0].avg_all
        return values
    return metrics


def seed_statistics(outcomes: SeedOutcomes, settings: StatisticsSettings) -> schema.StatisticsRecord:
    accuracy = []
    for k, checkpoint in enumerate(outcomes.checkpoints):
        for task in outcomes.tasks:
            row = outcomes.correct[task][k]
            low, high = significance.wilson_interval(int(row.sum()), row.size, settings.confidence)
            accuracy.append(schema.AccuracyInterval(checkpoint=checkpoint, task=task, n=row.size,
                                                    correct=int(row.sum()), accuracy=float(row.mean()),
                                                    low=low, high=high))
    metrics = _metrics_of(outcomes)
    point = metrics(np.stack([outcomes.correct[t].mean(axis=1) for t in outcomes.tasks], axis=1))
    intervals = significance.metric_intervals([outcomes.correct[t] for t in outcomes.tasks], metrics, settings)
    defined = [(key, interval) for key, interval in intervals.items() if interval is not None]
    metric_rows = [schema.MetricInterval(checkpoint=checkpoint, metric=metric, value=point[checkpoint, metric],
                                         low=low, high=high)
                   for (checkpoint, metric), (low, high) in defined if checkpoint is not None]
    headline = [schema.Interval(metric=metric, value=point[None, metric], low=low, high=high)
                for (checkpoint, metric), (low, high) in defined if checkpoint is None]
    drift = []
    for k, checkpoint in enumerate(outcomes.checkpoints):
        low, high = significance.mean_interval(outcomes.kl[k], settings)
        drift.append(schema.MetricInterval(checkpoint=checkpoint, metric="kl_mean", value=float(outcomes.kl[k].mean()),
                                           low=low, high=high))
    headline.append(schema.Interval(metric="final_kl_to_base", value=drift[-1].value, low=drift[-1].low,
                                    high=drift[-1].high))
    comparisons = []
    for k in range(1, len(outcomes.checkpoints)):
        comparisons.append(compare_stages(outcomes, k, k - 1, "previous", settings))
        comparisons.append(compare_stages(outcomes, k, 0, "base", settings))
    family = len(outcomes.tasks) if settings.correction != "none" else 1
    detectable = []
    for task in outcomes.tasks:
        d = significance.detectable_drop(len(outcomes.ids[task]), settings.alpha, settings.power, family)
        detectable.append(schema.DetectableDrop(task=task, n=d.n, alpha=d.alpha, min_flips=d.min_flips,
                                                floor=d.floor, drop_at_power=d.drop_at_power, power=d.power))
    return schema.StatisticsRecord(settings=schema.StatisticsParams(**settings.model_dump()), accuracy=accuracy,
                                   metrics=metric_rows, headline=headline, drift=drift, comparisons=comparisons, detectable=detectable)


def write_seed_statistics(run_dir: Path, seed: int, settings: StatisticsSettings) -> schema.StatisticsRecord:
    record = seed_statistics(seed_outcomes(run_dir, seed), settings)
    RunFolder(run_dir).seed(seed).statistics.write(record)
    return record


def load_seed_statistics(run_dir: Path, seed: int, settings: StatisticsSettings) -> schema.StatisticsRecord:
    """seed-S/statistics.json when it was computed with `settings`; otherwise (a folder written before version 2,
    or other settings) computed from the predictions, without writing into the folder."""
    recorded = RunFolder(run_dir).seed(seed).statistics
    if recorded.exists():
        record = recorded.load()
        if record.settings.model_dump() == settings.model_dump():
            return record
    return seed_statistics(seed_outcomes(run_dir, seed), settings)
