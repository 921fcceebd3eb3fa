"""Which drift signal warns best: how well each signal separates the checkpoints that forgot from those that did not.

A checkpoint *forgot* when the stage that made it regressed on an earlier task: its paired verdict against the
previous checkpoint (analysis/verdicts.py: exact McNemar, Holm over the tasks) is `regressed` on a task trained
before this stage. Only checkpoints with an earlier task count (stage 2 onwards).

For every such checkpoint the candidates are the signals of analysis/signals.py on the reference set, their
increase over the previous checkpoint (what this stage's update did), and the same statistics on the test prompts
of the task just trained (`task_*`, RL's Razor's measurement). The span signals (over the first answer tokens,
engine/span_drift.py) are candidates where the run folders hold span_drift.jsonl. Each candidate's AUROC is the probability that a
checkpoint that forgot scores higher than one that did not (ties count half): the Mann–Whitney U over the product
of the two class sizes (scipy.stats.mannwhitneyu). Its interval is a stratified percentile bootstrap: the
checkpoints that forgot and those that did not are resampled separately, so every resample keeps both classes
(pROC's default). AUROC 0.5 is chance; an interval that contains 0.5 does not show that the signal warns at all.

The lead of a live signal: with a monitored run, the first optimizer step of the stage at which the signal
(monitor.jsonl's `signals`) was above a threshold, counted back from the stage's last step. A span signal has a
lead only in runs whose monitor watched a span signal: the monitor measures them live only then. The threshold is the
cut on the checkpoints' values that maximises Youden's J (sensitivity + specificity − 1), fitted on the same
checkpoints it is then applied to: an optimistic, in-sample lead.

Forgetting is also measured by its size, which needs no class to be large: a checkpoint's `drop` is its largest
accuracy loss on an earlier task against the previous checkpoint (negative where every earlier task improved), and
each candidate's Spearman rank correlation with it (scipy.stats.spearmanr, its p-value Holm-adjusted over the
candidates) says whether the signal grows with the damage. Its interval is a percentile bootstrap over checkpoints.

Models are ranked apart as well as pooled. A signal's scale is the model's own (a 262k-token vocabulary spreads a
distribution differently from a 49k one), so a pooled AUROC partly measures which model drifts more, and a pooled cut
is a threshold no single model would use: the live leads therefore use each model's own cut when a study holds more
than one model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lorawatch.analysis.signals import SIGNALS, signal_values, stage_signal_values
from lorawatch.config import StatisticsSettings
from lorawatch.analysis.verdicts import load_seed_statistics
from lorawatch.rundir.layout import RunFolder

TASK_SIGNALS = ("kl", "kl_forward", "top1_change", "top5_change", "gold_drop")
CANDIDATES = (*SIGNALS, *(f"{name}_increase" for name in SIGNALS), *(f"task_{name}" for name in TASK_SIGNALS))
MIN_PER_CLASS = 3  # fewer checkpoints that forgot (or did not) than this: no AUROC is reported
MIN_FOR_CORRELATION = 8  # fewer checkpoints than this: no rank correlation is reported


def checkpoint_frame(runs: Sequence[tuple[str, Path]], settings: StatisticsSettings,
                     models: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per (run, seed, checkpoint from stage 2 on), sorted by them: its model (`models[label]`, "" when
    not given), `forgot`, the earlier tasks it regressed on, and every candidate signal's value (NaN where the run
    folder does not hold it). `runs`: (label, run folder)."""
    models = models or {}
    rows = []
    for label, folder in runs:
        run = RunFolder(folder)
        for seed in run.seeds_on_disk():
            stages = [k for k in run.seed(seed).stages_on_disk() if run.stage(seed, k).finished()]
            statistics = load_seed_statistics(Path(folder), seed, settings)
            values = {k: stage_signal_values(run.stage(seed, k)) for k in stages}
            for k in stages:
                comparison = statistics.comparison(k, "previous")
                if k < 2 or comparison is None:  # no earlier task, or a stage that has not finished
                    continue
                record = run.stage(seed, k).record.read()
                trained = [run.stage(seed, j).record.read().task for j in range(1, k)]
                earlier = [t for t in comparison.tasks if t.task in trained]
                regressed = sorted(t.task for t in earlier if t.verdict == "regressed")
                row = {"run": label, "model": models.get(label, ""), "seed": seed, "stage": k,
                       "checkpoint": record.checkpoint, "forgot": bool(regressed), "regressed_on": ", ".join(regressed),
                       "drop": max(-t.difference for t in earlier) + 0.0}  # + 0.0: no "-0" in the CSV
                for name in SIGNALS:
                    now, before = values[k][name], values[k - 1][name]
                    row[name] = np.nan if now is None else now
                    row[f"{name}_increase"] = np.nan if now is None or before is None else now - before
                task_rows = run.stage(seed, k).task_drift
                task_values = signal_values(task_rows.read()) if task_rows.exists() else {}
                for name in TASK_SIGNALS:
                    value = task_values.get(name)
                    row[f"task_{name}"] = np.nan if value is None else value
                rows.append(row)
    frame = pd.DataFrame(rows, columns=["run", "model", "seed", "stage", "checkpoint", "forgot", "regressed_on",
                                        "drop", *CANDIDATES])
    # The bootstrap draws rows by position: sorted, the same runs give the same intervals in any order.
    return frame.sort_values(["run", "seed", "stage"], kind="stable", ignore_index=True)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), from scipy's Mann–Whitney U."""
    from scipy.stats import mannwhitneyu

    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positive, negative = scores[labels], scores[~labels]
    if positive.size == 0 or negative.size == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    u = mannwhitneyu(positive, negative, alternative="two-sided").statistic
    return float(u / (positive.size * negative.size))


def auroc_interval(scores: Sequence[float], labels: Sequence[bool], *, confidence: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The stratified percentile bootstrap interval of the AUROC (see the module's docstring)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positive, negative = scores[labels], scores[~labels]
    rng = np.random.default_rng(seed)
    p = positive[rng.integers(0, positive.size, size=(resamples, positive.size))]
    n = negative[rng.integers(0, negative.size, size=(resamples, negative.size))]
    # Every resample's AUROC at once: compare each resampled positive with each resampled negative.
    greater = (p[:, :, None] > n[:, None, :]).mean(axis=(1, 2))
    ties = (p[:, :, None] == n[:, None, :]).mean(axis=(1, 2))
    values = greater + ties / 2
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def youden_cut(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The threshold t maximising sensitivity + specificity − 1 for "score > t" (the lowest such t: halfway
    below the smallest score it flags)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2])
    best, best_j = cuts[0], -np.inf
    for cut in cuts:
        flagged = scores > cut
        j = flagged[labels].mean() + (~flagged[~labels]).mean() - 1
        if j > best_j + 1e-12:
            best, best_j = cut, j
    return float(best)


def signal_table(frame: pd.DataFrame, *, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> pd.DataFrame:
    """Per candidate: the checkpoints it was measured on, how many forgot, its AUROC with its interval (NaN with
    fewer than MIN_PER_CLASS of either class), and its Youden cut. Sorted by AUROC, best first."""
    rows = []
    for name in CANDIDATES:
        known = frame[frame[name].notna()] if name in frame else frame.iloc[0:0]
        labels = known["forgot"].to_numpy(dtype=bool)
        scores = known[name].to_numpy(dtype=float) if name in known else np.array([])
        positives, negatives = int(labels.sum()), int((~labels).sum())
        row = {"signal": name, "checkpoints": len(known), "forgot": positives, "did_not": negatives,
               "auroc": np.nan, "ci_low": np.nan, "ci_high": np.nan, "cut": np.nan}
        if min(positives, negatives) >= MIN_PER_CLASS:
            row["auroc"] = auroc(scores, labels)
            row["ci_low"], row["ci_high"] = auroc_interval(scores, labels, confidence=confidence,
                                                           resamples=resamples, seed=seed)
            row["cut"] = youden_cut(scores, labels)
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("auroc", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def spearman_interval(x: Sequence[float], y: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of Spearman's ρ, resampling (x, y) pairs; resamples in which x or y is
    constant (ρ undefined) are left out."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, x.size, size=(resamples, x.size))
    # Spearman's ρ is Pearson's r of the ranks (ties averaged), as scipy.stats.spearmanr computes it.
    rx, ry = rankdata(x[picks], axis=1), rankdata(y[picks], axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    scale = np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (rx * ry).sum(axis=1) / scale
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def drop_correlation(frame: pd.DataFrame, *, confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Per candidate: Spearman's ρ between the signal and the checkpoints' `drop`, its bootstrap interval, its
    p-value and the p-value Holm-adjusted over the candidates that have one (NaN with fewer than
    MIN_FOR_CORRELATION checkpoints, or where either is constant). Sorted by ρ, largest first."""
    from scipy.stats import spearmanr

    from lorawatch.analysis.significance import adjust

    rows = []
    for name in CANDIDATES:
        known = frame[frame[name].notna()] if name in frame else frame.iloc[0:0]
        row = {"signal": name, "checkpoints": len(known), "rho": np.nan, "ci_low": np.nan, "ci_high": np.nan,
               "p_value": np.nan, "p_adjusted": np.nan}
        x, y = known[name].to_numpy(dtype=float) if name in known else np.array([]), known["drop"].to_numpy(float)
        if len(known) >= MIN_FOR_CORRELATION and np.ptp(x) > 0 and np.ptp(y) > 0:
            result = spearmanr(x, y)
            row["rho"], row["p_value"] = float(result.statistic), float(result.pvalue)
            row["ci_low"], row["ci_high"] = spearman_interval(x, y, confidence=confidence, resamples=resamples,
                                                              seed=seed)
        rows.append(row)
    table = pd.DataFrame(rows)
    tested = table["p_value"].notna()
    if tested.any():
        table.loc[tested, "p_adjusted"] = adjust(table.loc[tested, "p_value"].tolist(), "holm")
    return table.sort_values("rho", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def by_model(analysis, frame: pd.DataFrame, **options) -> pd.DataFrame:
    """`analysis` (signal_table or drop_correlation) on each model's checkpoints alone, with a `model` column
    first (models in their order of appearance)."""
    tables = [analysis(frame[frame["model"] == model], **options).assign(model=model)
              for model in dict.fromkeys(frame["model"])]
    if not tables:
        return pd.DataFrame(columns=["model"])
    table = pd.concat(tables, ignore_index=True)
    return table[["model", *[c for c in table.columns if c != "model"]]]


def signal_table_by_model(frame: pd.DataFrame, *, confidence: float = 0.95, resamples: int = 2000,
                          seed: int = 0) -> pd.DataFrame:
    """signal_table for each model's checkpoints alone, with a `model` column (models in their order of
    appearance, each sorted by its AUROC)."""
    table = by_model(signal_table, frame, confidence=confidence, resamples=resamples, seed=seed)
    columns = ["model", "signal", "checkpoints", "forgot", "did_not", "auroc", "ci_low", "ci_high", "cut"]
    return table if len(table) else pd.DataFrame(columns=columns)


def _cuts(table: pd.DataFrame) -> dict[str, float]:
    return {r.signal: r.cut for r in table.itertuples() if r.signal in SIGNALS and not np.isnan(r.cut)}


def lead_steps(runs: Sequence[tuple[str, Path]], frame: pd.DataFrame, table: pd.DataFrame,
               per_model: pd.DataFrame | None = None) -> pd.DataFrame:
    """For each reference-set signal with a cut that the monitor measured, and each checkpoint that forgot in a
    monitored run: the first step of its stage at which the live signal was above the cut, and how many optimizer
    steps before the stage's end that was (NaN: it never crossed). With more than one model in `frame`, each
    model's own cut (`per_model`, from signal_table_by_model); a model with too few checkpoints to be ranked has
    none, and no lead."""
    folders = dict(runs)
    if frame["model"].nunique() > 1:
        per_model = per_model if per_model is not None else signal_table_by_model(frame)
        model_cuts = {model: _cuts(part) for model, part in per_model.groupby("model", sort=False)}
    else:
        model_cuts = {model: _cuts(table) for model in frame["model"].unique()}
    rows = []
    for checkpoint in frame[frame["forgot"]].itertuples():
        cuts = model_cuts.get(checkpoint.model, {})
        series = RunFolder(folders[checkpoint.run]).stage(checkpoint.seed, checkpoint.stage).monitor_series
        if not series.exists():
            continue
        points = series.read()
        if not points or points[0].signals is None:
            continue
        last = points[-1].step
        # A signal the monitor did not measure (a span signal, unless it was the one watched) has no lead; without
        # this it would read as "never crossed".
        measured = {name for p in points if p.signals for name, value in p.signals.items() if value is not None}
        for name, cut in cuts.items():
            if name not in measured:
                continue
            crossed = next((p.step for p in points if (p.signals.get(name) is not None and p.signals[name] > cut)),
                           None)
            rows.append({"run": checkpoint.run, "model": checkpoint.model, "seed": checkpoint.seed,
                         "stage": checkpoint.stage, "signal": name,
                         "cut": cut, "first_step_above": np.nan if crossed is None else crossed, "last_step": last,
                         "steps_before_end": np.nan if crossed is None else last - crossed})
    return pd.DataFrame(rows, columns=["run", "model", "seed", "stage", "signal", "cut", "first_step_above",
                                       "last_step", "steps_before_end"])
