"""Result tables, built from the files in a run folder (so they also work on runs made elsewhere).

Per seed: the checkpoint-by-task accuracy matrix, the CL metrics computed from it, and the stability
table (reference accuracy and drift statistics per checkpoint). Across seeds: mean and std of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from lorawatch.rundir import schema, store
from lorawatch.rundir.check import missing_stage_files
from lorawatch.rundir.layout import RunFolder
from lorawatch.analysis import significance, verdicts
from lorawatch.analysis.adapter_flags import inactive_adapters
from lorawatch.report import verdict_view
from lorawatch.report.labels import HEADLINE, METRIC_HEADERS, mean_sd
from lorawatch.config import ExperimentConfig, StatisticsSettings, build_config
from lorawatch.errors import UserError
from lorawatch.analysis.metrics import (
    METRIC_COLUMNS,
    ClMetrics,
    compute_cl_metrics,
    compute_unordered_metrics,
    mean_std_frames,
    write_matrix_csv,
)

STABILITY_COLUMNS = ("reference_accuracy", "kl_mean", "kl_p10", "kl_p95", "entropy_mean", "entropy_p10",
                     "entropy_p95", "margin_mean", "margin_p10", "margin_p95", "entropy_mean_delta",
                     "margin_mean_delta")


def seed_tables(run_dir: Path, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(accuracy matrix, CL metrics, stability) of one seed, read from its finished stage folders."""
    seed_folder = RunFolder(run_dir).seed(seed)
    folders = [seed_folder.stage(k) for k in seed_folder.stages_on_disk()]
    folders = [f for f in folders if f.finished()]
    stages = [f.record.load() for f in folders]
    scores = [f.scores.load().accuracy() for f in folders]
    # The columns are the tasks in training order; adapters evaluated without knowing what each was trained
    # on (`lorawatch evaluate` without --trained-on) keep the config's task order instead.
    tasks = [s.task for s in stages[1:]]
    if None in tasks or not tasks:
        tasks = [name for name in scores[0] if name != "reference"]
    matrix = pd.DataFrame([[row[t] for t in tasks] for row in scores], columns=tasks)
    matrix.insert(0, "checkpoint", [s.checkpoint for s in stages])
    metrics = seed_metrics(matrix).to_frame()
    stability_rows = []
    for folder, stage, row in zip(folders, stages, scores):
        stats = folder.reference_stats.load().body()
        stability_rows.append({"checkpoint": stage.checkpoint, "reference_accuracy": row["reference"],
                               **{k: stats[k] for k in STABILITY_COLUMNS if k in stats}})
    return matrix, metrics, pd.DataFrame(stability_rows)


def is_ordered(matrix: pd.DataFrame) -> bool:
    """Row k is the checkpoint after training the k-th column's task (every `lorawatch run`): the CL metrics
    that need the training order are defined."""
    tasks = list(matrix.columns[1:])
    return list(matrix["checkpoint"])[1:] == tasks


def seed_metrics(matrix: pd.DataFrame) -> ClMetrics:
    tasks = list(matrix.columns[1:])
    values = matrix[tasks].to_numpy(dtype=float)
    if is_ordered(matrix):
        return compute_cl_metrics(values, tasks)
    return compute_unordered_metrics(values, tasks, list(matrix["checkpoint"]))


def write_seed_tables(run_dir: Path, seed: int, settings: StatisticsSettings) -> None:
    """The seed's CSV tables and cl_metrics.json, and its intervals and verdicts (statistics.json)."""
    matrix, _, stability = seed_tables(run_dir, seed)
    folder = RunFolder(run_dir).seed(seed)
    tasks = list(matrix.columns[1:])
    if is_ordered(matrix):
        write_matrix_csv(folder.table("accuracy_matrix").path, tasks, matrix[tasks].to_numpy(dtype=float))
    else:  # not the (T+1) x T shape `lorawatch metrics` reads; the same columns
        folder.table("accuracy_matrix").write(matrix)
    metrics = seed_metrics(matrix)
    folder.cl_metrics.write(metrics.to_dict())
    folder.table("cl_metrics").write(metrics.to_frame())
    folder.table("stability").write(stability)
    verdicts.write_seed_statistics(run_dir, seed, settings)


def write_summary(run_dir: Path) -> None:
    """Mean and std over seeds of every per-seed table, plus the headline numbers in summary.json."""
    config = load_run_config(run_dir)
    run = RunFolder(run_dir)
    per_seed = [seed_tables(run_dir, s) for s in config.seeds]
    summaries = []
    for name, index in (("accuracy_matrix", 0), ("cl_metrics", 1), ("stability", 2)):
        mean, std = mean_std_frames([t[index] for t in per_seed], index_col="checkpoint")
        run.summary_table(name, "mean").write(mean)
        run.summary_table(name, "std").write(std)
    for seed, (matrix, _, stability) in zip(config.seeds, per_seed):
        summary = seed_metrics(matrix).summary
        summaries.append({**summary, "final_kl_to_base": float(stability["kl_mean"].iloc[-1]),
                          "final_reference_accuracy": float(stability["reference_accuracy"].iloc[-1])})
    keys = [k for k, v in summaries[0].items() if isinstance(v, float) or v is None]
    aggregate = {}
    for key in keys:
        values = np.array([np.nan if s[key] is None else s[key] for s in summaries], dtype=float)
        defined = values[~np.isnan(values)]
        interval = significance.seed_interval(defined, config.statistics.confidence)
        aggregate[key] = {"mean": float(defined.mean()) if len(defined) else None,
                          "std": float(defined.std(ddof=1)) if len(defined) > 1 else (0.0 if len(defined) else None),
                          "ci_low": None if interval is None else interval[0],
                          "ci_high": None if interval is None else interval[1]}
    run.summary.write({"seeds": config.seeds, "per_seed": dict(zip(map(str, config.seeds), summaries)),
                       "mean_std": aggregate})


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = RunFolder(run_dir).config
    if not path.is_file():
        raise UserError(f"{run_dir}: not a lorawatch run folder (no {path.name})")
    data = store.read_run_file(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: damaged (not a mapping of config fields)")
    return build_config(data, source=str(path))


@dataclass
class RunResults:
    """A finished run folder, read back as data frames. `seed=None` means mean over seeds."""

    path: Path
    config: ExperimentConfig

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.path)

    @property
    def seeds(self) -> list[int]:
        return list(self.config.seeds)

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.config.ordered_tasks()]

    def _table(self, name: str, seed: int | None, stat: str = "mean") -> pd.DataFrame:
        if seed is None:
            return self.folder.summary_table(name, stat).load()
        return self.folder.seed(seed).table(name).load()

    def accuracy_matrix(self, seed: int | None = None, stat: str = "mean") -> pd.DataFrame:
        return self._table("accuracy_matrix", seed, stat)

    def cl_metrics(self, seed: int | None = None, stat: str = "mean") -> pd.DataFrame:
        return self._table("cl_metrics", seed, stat)

    def stability(self, seed: int | None = None, stat: str = "mean") -> pd.DataFrame:
        return self._table("stability", seed, stat)

    def summary(self) -> dict:
        """summary.json as written (headline numbers per seed and their mean_std), without its version."""
        return self.folder.summary.load().body()

    def stage(self, seed: int, stage: int) -> schema.StageRecord:
        return self.folder.stage(seed, stage).record.load()

    def costs(self) -> schema.CostsRecord | None:
        record = self.folder.costs
        return record.load() if record.exists() else None

    def monitor_settings(self) -> schema.MonitorRecord | None:
        record = self.folder.monitor_settings
        return record.load() if record.exists() else None

    def predictions(self, seed: int, stage: int, task: str) -> pd.DataFrame:
        return pd.DataFrame([r.to_dict() for r in self.folder.stage(seed, stage).predictions(task).load()])

    def statistics(self, seed: int) -> schema.StatisticsRecord:
        """The seed's intervals and verdicts (computed from its predictions for a folder older than them)."""
        return verdicts.load_seed_statistics(self.path, seed, self.config.statistics)

    def reference_drift(self, seed: int, stage: int) -> pd.DataFrame:
        return pd.DataFrame([r.to_dict() for r in self.folder.stage(seed, stage).drift.load()])


def load_run(run_dir: str | Path) -> RunResults:
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    summary = RunFolder(run_dir).summary.path
    if not summary.is_file():
        raise UserError(f"{run_dir}: the run has not finished (no {summary.relative_to(run_dir).as_posix()})")
    missing = missing_stage_files(run_dir)
    if missing:  # a table would be read from files that are not there, or its examples silently dropped
        more = f" (and {len(missing) - 1} more; `lorawatch check {run_dir}` lists them)" if len(missing) > 1 else ""
        raise UserError(missing[0] + more)
    return RunResults(run_dir, config)


def _rich_table(title: str, mean: pd.DataFrame, std: pd.DataFrame | None, columns: list[str],
                headers: list[str] | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("checkpoint")
    for header in headers or columns:
        table.add_column(header, justify="right")
    for i, row in mean.iterrows():
        table.add_row(str(row["checkpoint"]),
                      *[mean_sd(row[c], None if std is None else std.loc[i, c]) for c in columns])
    return table


def _interval_table(title: str, frame: pd.DataFrame, columns: list[str], headers: list[str],
                    interval) -> Table:
    """One seed's table, each cell with its interval: `interval(checkpoint, column)` -> an Interval or None."""
    table = Table(title=title, title_justify="left")
    table.add_column("checkpoint")
    for header in headers:
        table.add_column(header, justify="right")
    for _, row in frame.iterrows():
        cells = []
        for column in columns:
            found = interval(row["checkpoint"], column)
            cells.append(mean_sd(row[column]) if found is None else
                         verdict_view.with_interval(row[column], found.low, found.high))
        table.add_row(str(row["checkpoint"]), *cells)
    return table


def print_results(results: RunResults, console: Console) -> None:
    multi = len(results.seeds) > 1
    suffix = f" (mean ± std over seeds {', '.join(map(str, results.seeds))})" if multi else \
        f" (seed {results.seeds[0]})"
    records = {seed: results.statistics(seed) for seed in results.seeds}
    first = records[results.seeds[0]]
    level = f"{first.settings.confidence:.0%}"

    def pair(name: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        getter = getattr(results, name)
        return getter(None, "mean"), getter(None, "std") if multi else None

    matrix, matrix_std = pair("accuracy_matrix")
    metrics, metrics_std = pair("cl_metrics")
    title = "Accuracy matrix: rows are checkpoints, columns are tasks"
    if multi:
        console.print(_rich_table(title + suffix, matrix, matrix_std, results.tasks))
        console.print(_rich_table("Continual-learning metrics" + suffix, metrics, metrics_std,
                                  list(METRIC_COLUMNS), list(METRIC_HEADERS.values())))
    else:
        console.print(_interval_table(f"{title}{suffix}, [{level} Wilson interval]", matrix, results.tasks,
                                      results.tasks, lambda c, t: verdict_view.accuracy_of(first, c, t)))
        console.print(_interval_table(f"Continual-learning metrics{suffix}, [{level} bootstrap interval over test "
                                      "rows]", metrics, list(METRIC_COLUMNS), list(METRIC_HEADERS.values()),
                                      lambda c, m: verdict_view.interval_of(first, c, m)))
    stability, stability_std = pair("stability")
    columns = ["kl_mean", "kl_p95", "entropy_mean_delta", "margin_mean_delta", "reference_accuracy"]
    headers = ["KL to base", "KL p95", "Δ entropy", "Δ margin", "reference acc"]
    if multi:
        console.print(_rich_table("Stability on the reference set" + suffix, stability, stability_std, columns,
                                  headers))
    else:
        drift = {row.checkpoint: row for row in first.drift}
        console.print(_interval_table(f"Stability on the reference set{suffix}, KL to base [{level} bootstrap "
                                      "interval over reference rows]", stability, columns, headers,
                                      lambda c, m: drift.get(c) if m == "kl_mean" else None))
    console.print(verdict_view.verdict_table(records))
    regressions = verdict_view.regression_lines(records)
    console.print("Regressions: " + ("; ".join(regressions) if regressions else
                                     "none detected (no task of any trained checkpoint is worse than the previous "
                                     "checkpoint or the base beyond chance)"))
    drift = verdict_view.drift_change_lines(records)
    if drift:
        console.print(f"KL to base after each checkpoint (its change from the previous one, [{level} paired "
                      "bootstrap interval over reference rows]): " + "; ".join(drift))
    for flagged in inactive_adapters(results.path, results.seeds):
        console.print(f"[bold red]Adapter check[/bold red]: {flagged.line()}")
    console.print("What the test sizes can show: " + "; ".join(verdict_view.detectable_lines(first)))
    console.print("Summary: " + " · ".join(headline_parts(results, records)))
    console.print(f"Run folder: {results.path}")


def headline_parts(results: RunResults, records: dict[int, schema.StatisticsRecord]) -> list[str]:
    """The headline numbers with their intervals: over test rows for one seed, over seeds for several."""
    recorded = results.summary()
    summary, per_seed = recorded["mean_std"], recorded["per_seed"]
    multi = len(results.seeds) > 1
    first = records[results.seeds[0]]
    parts = []
    for key, label in ((h.key, h.label) for h in HEADLINE):
        if key not in summary:
            continue
        stat = summary[key]
        if multi:
            text = mean_sd(stat["mean"], stat["std"])
            # from the per-seed values, so that a summary written before the intervals gets one too
            interval = significance.seed_interval([per_seed[str(seed)][key] for seed in results.seeds],
                                                  first.settings.confidence)
            if interval is not None:
                text += (f" [{verdict_view.number(interval[0], 2)}, {verdict_view.number(interval[1], 2)}] over "
                         f"{len(results.seeds)} seeds")
        else:
            found = verdict_view.interval_of(first, None, key)
            text = mean_sd(stat["mean"]) if found is None else \
                verdict_view.with_interval(stat["mean"], found.low, found.high)
        parts.append(f"{label} {text}")
        if key == "final_avg_accuracy":
            parts.append(_vs_base_part(results, records))
    return parts


def _vs_base_part(results: RunResults, records: dict[int, schema.StatisticsRecord]) -> str:
    """The final average accuracy minus the base model's: below zero is the paper's failure zone."""
    found = [verdict_view.interval_of(records[seed], None, "final_avg_vs_base") for seed in results.seeds]
    if any(f is None for f in found):
        return "final avg vs base —"
    if len(found) == 1:
        return f"final avg vs base {verdict_view.with_interval(found[0].value, found[0].low, found[0].high, sign=True)}"
    values = [f.value for f in found]
    interval = significance.seed_interval(values, records[results.seeds[0]].settings.confidence)
    return (f"final avg vs base {verdict_view.signed(float(np.mean(values)))} ± {np.std(values, ddof=1):.3f} "
            f"[{verdict_view.signed(interval[0], 2)}, {verdict_view.signed(interval[1], 2)}] over {len(values)} seeds")
