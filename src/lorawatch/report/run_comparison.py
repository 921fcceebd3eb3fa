"""Is one run better than another? Two runs' final checkpoints on the same rows, seed by seed.

`lorawatch compare` (the first run folder is the baseline) and `lorawatch report` (a group that differs in a
setting against its baseline group) use it. A seed is compared only when both runs have it: seed s of one run and
seed t of the other are different training runs, not pairs. Per seed, test rows matched by example id:

    per task                 n, both accuracies, flips, negative flip rate, exact McNemar p adjusted over the
                             tasks, the paired bootstrap interval of the difference and a verdict: the same code as
                             a seed's own checkpoints (significance.paired, verdicts.task_comparisons)
    final average accuracy   the difference with a bootstrap interval: rows resampled within each task with the same
                             indices for both runs (significance.metric_intervals, the two runs as two checkpoints)
    final KL to base         the difference with a paired bootstrap interval over the reference rows matched by id

Across seeds: the mean of each difference with its Student t interval (significance.seed_interval). Every
difference is run − baseline; "regressed" means the run is worse than the baseline beyond chance. The statistics
settings (alpha, correction, confidence, resamples) are the baseline's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import NonNegativeInt, PositiveInt
from rich.table import Table

from lorawatch.rundir import schema
from lorawatch.analysis import significance
from lorawatch.config import StatisticsSettings
from lorawatch.errors import UserError
from lorawatch.rundir.schema import Part
from lorawatch.rundir.layout import RunFolder
from lorawatch.report.verdict_view import comparison_cells, comparison_columns, compact_cell, number, with_interval
from lorawatch.analysis.verdicts import SeedOutcomes, seed_outcomes, task_comparisons

AVERAGE, KL, ACCURACY = "final_avg_accuracy", "final_kl_to_base", "accuracy"
MEASURE_NAMES = {AVERAGE: "final avg accuracy", KL: "final KL to base"}


class PairedNumber(Part):
    """One number of both runs and its difference (run − baseline) with a paired bootstrap interval."""

    n: PositiveInt  # the rows resampled: the test rows of every task, or the reference rows
    baseline: float
    run: float
    difference: float
    low: float
    high: float


class SeedComparison(Part):
    """The two runs' final checkpoints of one seed."""

    seed: int
    baseline_dir: str
    run_dir: str
    baseline_stage: NonNegativeInt
    stage: NonNegativeInt
    baseline_checkpoint: str
    checkpoint: str
    tasks: list[schema.TaskComparison]  # accuracy_before: the baseline's, accuracy_after: the run's
    final_avg_accuracy: PairedNumber
    final_kl_to_base: PairedNumber | None  # None when no reference row has a finite KL in both (kl_note says so)
    kl_note: str | None = None


class SeedMean(Part):
    """A difference's mean over the compared seeds, with its Student t interval (None for one seed)."""

    measure: str  # final_avg_accuracy, final_kl_to_base, or accuracy (of `task`)
    task: str | None = None
    seeds: list[int]
    mean: float
    low: float | None
    high: float | None


class RunComparison(Part):
    """A run against the baseline run on the seeds both have."""

    baseline: str
    run: str
    settings: schema.StatisticsParams
    seeds: list[SeedComparison]
    across_seeds: list[SeedMean]
    baseline_only: list[int]  # seeds not compared: only one of the two runs has them
    run_only: list[int]


# --- computing -----------------------------------------------------------------------------------------------


def compare_runs_paired(baseline: str, run: str, folders: dict[int, tuple[Path, Path]],
                        settings: StatisticsSettings, baseline_only: Sequence[int] = (),
                        run_only: Sequence[int] = ()) -> RunComparison:
    """`folders[seed]` = (the baseline's run folder, the run's) for every seed both have."""
    seeds = [compare_final(base_dir, run_dir, seed, settings) for seed, (base_dir, run_dir) in folders.items()]
    return RunComparison(baseline=baseline, run=run, settings=schema.StatisticsParams(**settings.model_dump()),
                         seeds=seeds, across_seeds=across_seeds(seeds, settings.confidence),
                         baseline_only=sorted(baseline_only), run_only=sorted(run_only))


def compare_final(baseline_dir: Path, run_dir: Path, seed: int, settings: StatisticsSettings) -> SeedComparison:
    """Both runs' last finished checkpoints of `seed` on the same test and reference rows."""
    base, other = seed_outcomes(baseline_dir, seed), seed_outcomes(run_dir, seed)
    b_stage, r_stage = base.stage_index("last"), other.stage_index("last")
    before = [base.correct[t][b_stage] for t in base.tasks]
    after = [_aligned(base, other, task, baseline_dir, run_dir, b_stage, r_stage) for task in base.tasks]
    results = [significance.paired(b, a, settings) for b, a in zip(before, after)]
    kl, note = _kl_difference(baseline_dir, run_dir, seed, (b_stage, r_stage), settings)
    return SeedComparison(seed=seed, baseline_dir=str(baseline_dir), run_dir=str(run_dir), baseline_stage=b_stage,
                          stage=r_stage, baseline_checkpoint=base.checkpoints[b_stage],
                          checkpoint=other.checkpoints[r_stage],
                          tasks=task_comparisons(base.tasks, results, settings),
                          final_avg_accuracy=_average_difference(before, after, settings),
                          final_kl_to_base=kl, kl_note=note)


def _aligned(base: SeedOutcomes, other: SeedOutcomes, task: str, baseline_dir: Path, run_dir: Path,
             b_stage: int, r_stage: int) -> np.ndarray:
    """The run's final right/wrong of `task` in the baseline's row order; refused unless the rows are the same."""
    theirs = RunFolder(run_dir).stage(base.seed, r_stage).predictions(task).path
    ours = RunFolder(baseline_dir).stage(base.seed, b_stage).predictions(task).path
    if task not in other.correct:
        raise UserError(f"{theirs}: missing; {baseline_dir} has predictions for {task!r}, so the runs cannot be "
                        "compared on the same rows")
    if set(other.ids[task]) != set(base.ids[task]) or len(other.ids[task]) != len(base.ids[task]):
        differ = len(set(other.ids[task]) ^ set(base.ids[task]))
        raise UserError(f"{theirs}: its rows are not those of {ours} ({differ} example ids in only one of them); "
                        "two runs are compared only on the same test rows")
    by_id = dict(zip(other.ids[task], other.correct[task][r_stage]))
    return np.array([by_id[i] for i in base.ids[task]], dtype=bool)


def _average_difference(before: list[np.ndarray], after: list[np.ndarray],
                        settings: StatisticsSettings) -> PairedNumber:
    """Final average accuracy (the mean of the tasks' accuracies) of both runs and their difference."""
    baseline = float(np.mean([b.mean() for b in before]))
    run = float(np.mean([a.mean() for a in after]))
    if all(np.array_equal(b, a) for b, a in zip(before, after)):
        low = high = 0.0  # every resample gives 0: scipy would warn about degenerate data
    else:
        # the two runs stacked as the two "checkpoints" of each task: a resample keeps every row's pairing
        samples = [np.stack([b, a]) for b, a in zip(before, after)]
        low, high = significance.metric_intervals(samples, _difference_of_averages, settings)["difference"]
    return PairedNumber(n=sum(b.size for b in before), baseline=baseline, run=run, difference=run - baseline,
                        low=low, high=high)


def _difference_of_averages(R: np.ndarray) -> dict[str, float]:
    return {"difference": float(R[1].mean() - R[0].mean())}


def _kl_difference(baseline_dir: Path, run_dir: Path, seed: int, stages: tuple[int, int],
                   settings: StatisticsSettings) -> tuple[PairedNumber | None, str | None]:
    """Final KL to base of both runs, as the mean over reference rows matched by id, and its paired interval."""
    ours_rows = RunFolder(baseline_dir).stage(seed, stages[0]).drift
    theirs_rows = RunFolder(run_dir).stage(seed, stages[1]).drift
    ours, theirs = ours_rows.path, theirs_rows.path
    # both exist (seed_outcomes read every stage's); matched by id, since the runs may keep their rows in other orders
    base_kl = {d.id: d.kl for d in ours_rows.load()}
    run_kl = {d.id: d.kl for d in theirs_rows.load()}
    if set(base_kl) != set(run_kl):
        raise UserError(f"{theirs}: its reference rows are not those of {ours} "
                        f"({len(set(base_kl) ^ set(run_kl))} ids in only one of them); the final KL to base is "
                        "compared only on the same reference rows")
    ids = [i for i in base_kl if math.isfinite(base_kl[i]) and math.isfinite(run_kl[i])]
    if not ids:
        return None, f"{theirs}: no reference row with a finite KL in both runs"
    before, after = np.array([base_kl[i] for i in ids]), np.array([run_kl[i] for i in ids])
    low, high = significance.paired_interval(before, after, settings)
    return PairedNumber(n=len(ids), baseline=float(before.mean()), run=float(after.mean()),
                        difference=float(after.mean() - before.mean()), low=low, high=high), None


def across_seeds(seeds: list[SeedComparison], confidence: float) -> list[SeedMean]:
    """The mean difference over seeds of the final average accuracy, the final KL and each task's accuracy."""
    if not seeds:
        return []
    measures: list[tuple[str, str | None, Callable[[SeedComparison], float | None]]] = [
        (AVERAGE, None, lambda s: s.final_avg_accuracy.difference),
        (KL, None, lambda s: None if s.final_kl_to_base is None else s.final_kl_to_base.difference)]
    for i, task in enumerate(t.task for t in seeds[0].tasks):
        measures.append((ACCURACY, task, lambda s, i=i: s.tasks[i].difference))
    out = []
    for measure, task, value in measures:
        found = [(s.seed, value(s)) for s in seeds if value(s) is not None]
        if not found:
            continue
        interval = significance.seed_interval([v for _, v in found], confidence)
        out.append(SeedMean(measure=measure, task=task, seeds=[s for s, _ in found],
                            mean=float(np.mean([v for _, v in found])),
                            low=None if interval is None else interval[0],
                            high=None if interval is None else interval[1]))
    return out


# --- how it reads --------------------------------------------------------------------------------------------


def measure_name(m: SeedMean) -> str:
    return f"accuracy on {m.task}" if m.measure == ACCURACY else MEASURE_NAMES[m.measure]


def title(c: RunComparison) -> str:
    s = c.settings
    correction = "Holm-adjusted " if s.correction == "holm" else ""
    return (f"Is it real? {c.run} against {c.baseline} (the baseline), final checkpoints on the same rows, seed by "
            f"seed: Δ = {c.run} − {c.baseline} [{s.confidence:.0%} paired bootstrap CI]; ↓ right→wrong, ↑ "
            f"wrong→right; NFR = ↓ / n; {correction}exact McNemar p; verdict at α {s.alpha:g}")


def summary_lines(c: RunComparison) -> list[str]:
    """One sentence per seed, then the mean over seeds; the seeds left out, if any."""
    lines = []
    for s in c.seeds:
        worse = [t.task for t in s.tasks if t.verdict == "regressed"]
        better = [t.task for t in s.tasks if t.verdict == "improved"]
        line = (f"seed {s.seed}: {c.run} regressed on {len(worse)} of {len(s.tasks)} tasks"
                f"{' (' + ', '.join(worse) + ')' if worse else ''}, improved on {len(better)}"
                f"{' (' + ', '.join(better) + ')' if better else ''}; {_headline_text(s)}")
        lines.append(line)
    for m in c.across_seeds:
        if m.measure != ACCURACY and len(m.seeds) > 1:
            lines.append(f"mean over seeds {', '.join(map(str, m.seeds))}: Δ {measure_name(m)} {_mean_text(m)} "
                         f"({c.settings.confidence:.0%} t interval)")
    if not c.seeds:
        lines.append(f"no seed in common: {c.run} and {c.baseline} are not compared on the same rows")
    for label, seeds in ((c.baseline, c.baseline_only), (c.run, c.run_only)):
        if seeds:
            lines.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} only in {label}: "
                         "not compared")
    return lines


def _digits(measure: str) -> int:
    return 4 if measure == KL else 3  # KL to base is small: as many digits as the run's own tables give it


def _headline_text(s: SeedComparison) -> str:
    parts = [f"Δ final avg accuracy {_delta(s.final_avg_accuracy)}"]
    parts.append(f"Δ final KL to base {_delta(s.final_kl_to_base, 4)}" if s.final_kl_to_base is not None
                 else f"final KL to base not compared ({s.kl_note})")
    return ", ".join(parts)


def _delta(p: PairedNumber | None, digits: int = 3) -> str:
    return "—" if p is None else with_interval(p.difference, p.low, p.high, digits=digits, sign=True)


def _mean_text(m: SeedMean | None) -> str:
    return "—" if m is None else with_interval(m.mean, m.low, m.high, digits=_digits(m.measure), sign=True)


def _value(p: PairedNumber | None, attribute: str, digits: int = 3) -> str:
    return "—" if p is None else number(getattr(p, attribute), digits)


def markdown(c: RunComparison, names: tuple[str, str] | None = None) -> str:
    """The per-task table, the final average accuracy and KL per seed, the means over seeds, and the summary.
    `names`: the column headers of the baseline and the run, when their labels are too long for a header."""
    if not c.seeds:
        return "\n".join(f"- {line}" for line in summary_lines(c))
    ours, theirs = names or (c.baseline, c.run)
    task_headers = ["seed", "task", "n", ours, theirs, "NFR", *comparison_columns(c.settings)]
    lines = ["| " + " | ".join(task_headers) + " |", "|---|---|" + "---:|" * (len(task_headers) - 2)]
    for s in c.seeds:
        for t in s.tasks:
            lines.append("| " + " | ".join([str(s.seed), t.task, str(t.n), number(t.accuracy_before),
                                            number(t.accuracy_after), number(t.negative_flip_rate),
                                            *comparison_cells(t)]) + " |")
    level = f"{c.settings.confidence:.0%}"
    lines += ["", f"| seed | final avg accuracy: {ours} | {theirs} | Δ [{level} CI] | final KL to base: {ours} | "
                  f"{theirs} | Δ [{level} CI] |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s in c.seeds:
        a, k = s.final_avg_accuracy, s.final_kl_to_base
        lines.append(f"| {s.seed} | {number(a.baseline)} | {number(a.run)} | {_delta(a)} | {_value(k, 'baseline', 4)} "
                     f"| {_value(k, 'run', 4)} | {_delta(k, 4)} |")
    if len(c.seeds) > 1:
        lines += ["", f"| mean over seeds | seeds | Δ [{level} t interval over seeds] |", "|---|---|---:|"]
        for m in c.across_seeds:
            lines.append(f"| {measure_name(m)} | {', '.join(map(str, m.seeds))} | {_mean_text(m)} |")
    return "\n".join(lines + ["", *[f"- {line}" for line in summary_lines(c)]])


def rich_tables(c: RunComparison) -> list[Table]:
    """The terminal's view: per seed and task, then the final average accuracy and KL per seed."""
    if not c.seeds:
        return []
    tasks = Table(title=title(c), title_justify="left")
    for header in ("seed", "task", "n", c.baseline, c.run, "NFR"):
        tasks.add_column(header, justify="left" if header in ("seed", "task") else "right")
    tasks.add_column(f"{c.run} − {c.baseline}", justify="right")
    for s in c.seeds:
        for t in s.tasks:
            tasks.add_row(str(s.seed), t.task, str(t.n), number(t.accuracy_before), number(t.accuracy_after),
                          number(t.negative_flip_rate), compact_cell(t))
    level = f"{c.settings.confidence:.0%}"
    headline = Table(title=f"{c.run} against {c.baseline}: final average accuracy (test rows resampled within each "
                           f"task) and final KL to base (reference rows), Δ [{level} paired bootstrap CI]; means "
                           f"over seeds with a {level} t interval", title_justify="left")
    for header in ("seed", f"avg accuracy: {c.baseline}", c.run, "Δ", f"KL to base: {c.baseline}", c.run, "Δ"):
        headline.add_column(header, justify="left" if header == "seed" else "right")
    for s in c.seeds:
        a, k = s.final_avg_accuracy, s.final_kl_to_base
        headline.add_row(str(s.seed), number(a.baseline), number(a.run), _delta(a), _value(k, "baseline", 4),
                         _value(k, "run", 4), _delta(k, 4))
    means = {m.measure: m for m in c.across_seeds if m.measure != ACCURACY}
    if len(c.seeds) > 1:
        headline.add_row("mean", "", "", _mean_text(means.get(AVERAGE)), "", "", _mean_text(means.get(KL)))
    return [tasks, headline]


CSV_COLUMNS = ("seed", "measure", "task", "interval", "n", "baseline_value", "run_value", "difference", "ci_low",
               "ci_high", "regressed", "improved", "negative_flip_rate", "p_value", "p_adjusted", "verdict")


def csv_rows(c: RunComparison) -> list[dict]:
    """Every number of the comparison as flat rows (CSV_COLUMNS): per seed and task, per seed the final average
    accuracy and KL, and the means over seeds (seed empty)."""
    rows = []
    for s in c.seeds:
        for t in s.tasks:
            rows.append({"seed": s.seed, "measure": ACCURACY, "task": t.task, "interval": "paired bootstrap, test rows",
                         "n": t.n, "baseline_value": t.accuracy_before, "run_value": t.accuracy_after,
                         "difference": t.difference, "ci_low": t.ci_low, "ci_high": t.ci_high,
                         "regressed": t.regressed, "improved": t.improved, "negative_flip_rate": t.negative_flip_rate,
                         "p_value": t.p_value, "p_adjusted": t.p_adjusted, "verdict": t.verdict})
        for measure, p, rows_of in ((AVERAGE, s.final_avg_accuracy, "test rows within each task"),
                                    (KL, s.final_kl_to_base, "reference rows")):
            if p is not None:
                rows.append({"seed": s.seed, "measure": measure, "interval": f"paired bootstrap, {rows_of}", "n": p.n,
                             "baseline_value": p.baseline, "run_value": p.run, "difference": p.difference,
                             "ci_low": p.low, "ci_high": p.high})
    for m in c.across_seeds:
        rows.append({"measure": m.measure, "task": m.task, "interval": f"t over {len(m.seeds)} seeds",
                     "n": len(m.seeds), "difference": m.mean, "ci_low": m.low, "ci_high": m.high})
    return [{column: row.get(column) for column in CSV_COLUMNS} for row in rows]
