"""report.md's "Which drift signal warns best" section, with its CSV files, signals.png (the AUROCs) and
signals-correlation.png (the rank correlations); analysis/signal_study.py computes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lorawatch.analysis.signal_study import (MIN_FOR_CORRELATION, MIN_PER_CLASS, by_model, checkpoint_frame,
                                             drop_correlation, lead_steps, signal_table, signal_table_by_model)
from lorawatch.report.study import StudyResults, model_display_name

SIGNAL_STUDY_CSV = "signal_study.csv"
SIGNAL_CHECKPOINTS_CSV = "signal_checkpoints.csv"
SIGNAL_LEADS_CSV = "signal_leads.csv"
SIGNAL_BY_MODEL_CSV = "signal_study_by_model.csv"
CORRELATION_CSV = "signal_correlation.csv"
CORRELATION_BY_MODEL_CSV = "signal_correlation_by_model.csv"


@dataclass
class SignalStudy:
    frame: pd.DataFrame                  # one row per checkpoint: labels, drop, every signal
    table: pd.DataFrame                  # AUROC per signal, pooled
    by_model: pd.DataFrame               # the same per model
    correlation: pd.DataFrame            # Spearman's ρ with the drop per signal, pooled
    correlation_by_model: pd.DataFrame   # the same per model
    leads: pd.DataFrame                  # the live signals' leads
    alpha: float = 0.05                  # the runs' statistics.alpha: a correlation "holds" below it, after Holm

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(self.frame["model"]))


def signal_study(study: StudyResults) -> SignalStudy:
    runs = [(d.name, d) for g in study.groups for d in g.run_dirs]
    # The model itself, not the group's label: a study's learning rates are groups of one model.
    models = {d.name: model_display_name(g.spec) for g in study.groups for d in g.run_dirs}
    settings = study.groups[0].config.statistics
    frame = checkpoint_frame(runs, settings, models)
    options = {"confidence": settings.confidence, "resamples": settings.resamples, "seed": settings.seed}
    table = signal_table(frame, **options)
    per_model = signal_table_by_model(frame, **options)
    return SignalStudy(frame, table, per_model, drop_correlation(frame, **options),
                       by_model(drop_correlation, frame, **options), lead_steps(runs, frame, table, per_model),
                       settings.alpha)


def _cell(value: float, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _interval(low: float, high: float) -> str:
    return "—" if np.isnan(low) else f"[{low:.3f}, {high:.3f}]"


def _by_model_lines(result: SignalStudy) -> list[str]:
    """Each model ranked alone: its scale is its own, so its AUROC is not mixed with which model drifts more."""
    frame, models = result.frame, result.models
    if len(models) < 2:
        return []
    counts = {m: (int(frame.loc[frame["model"] == m, "forgot"].sum()), int((frame["model"] == m).sum()))
              for m in models}
    lines = ["Each model alone (a signal's scale is the model's own, so the pooled AUROC partly says which model "
             "drifts more; the live leads use each model's own cut; "
             f"[{SIGNAL_BY_MODEL_CSV}]({SIGNAL_BY_MODEL_CSV})):", ""]
    unranked = [m for m, (forgot, n) in counts.items() if min(forgot, n - forgot) < MIN_PER_CLASS]
    ranked = [m for m in models if m not in unranked]
    if ranked:
        lines += ["| signal | " + " | ".join(f"{m}: AUROC ({counts[m][0]} of {counts[m][1]} forgot)" for m in ranked)
                  + " |", "|---|" + "---|" * len(ranked)]
        cells = {(r.model, r.signal): r for r in result.by_model.itertuples()}
        for name in result.by_model[result.by_model["model"] == ranked[0]]["signal"]:
            found = [cells[(m, name)] for m in ranked]
            row = ["—" if np.isnan(r.auroc) else f"{r.auroc:.3f} {_interval(r.ci_low, r.ci_high)}" for r in found]
            if any(cell != "—" for cell in row):  # a signal these folders do not hold is left out
                lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    for m in unranked:
        forgot, n = counts[m]
        lines += [f"{m} is not ranked alone: {forgot} of its {n} checkpoints forgot (at least {MIN_PER_CLASS} of "
                  "each kind are needed), and its checkpoints have no live lead.", ""]
    return lines


def _correlation_lines(result: SignalStudy, figure: bool) -> list[str]:
    """How each signal grows with the size of the forgetting: needs no class to be large."""
    frame = result.frame
    lines = ["### Does the signal grow with the damage?", "",
             "Spearman's rank correlation ρ between each signal and the checkpoint's largest accuracy drop on an "
             "earlier task against the previous checkpoint (negative where every earlier task improved), over "
             f"the same {len(frame)} checkpoints; interval: a percentile bootstrap over checkpoints; p from "
             "scipy's spearmanr, Holm-adjusted over the signals. Unlike the AUROC it needs no checkpoint to have "
             "forgotten significantly, and unlike it, it rewards a signal for tracking small drops too "
             f"([{CORRELATION_CSV}]({CORRELATION_CSV})).", ""]
    measured = result.correlation[result.correlation["rho"].notna()]
    if measured.empty:
        lines += [f"No correlation: at least {MIN_FOR_CORRELATION} checkpoints with a varying drop are needed.", ""]
        return lines
    if figure:
        lines += ["![signals-correlation](signals-correlation.png)", ""]
    lines += ["| signal | checkpoints | ρ | interval | p (Holm) |", "|---|---:|---:|---|---:|"]
    for row in measured.itertuples():
        lines.append(f"| {row.signal} | {row.checkpoints} | {row.rho:+.3f} | {_interval(row.ci_low, row.ci_high)} | "
                     f"{row.p_adjusted:.3g} |")
    held = [r.signal for r in measured.itertuples() if r.p_adjusted < result.alpha]
    lines += ["", f"Significant after Holm (α {result.alpha:g}): " + (", ".join(held) if held else "none") + ".", ""]
    if len(result.models) > 1:
        per = result.correlation_by_model
        lines += ["Each model alone (ρ [interval], Holm p within the model; "
                  f"[{CORRELATION_BY_MODEL_CSV}]({CORRELATION_BY_MODEL_CSV})):", "",
                  "| signal | " + " | ".join(result.models) + " |", "|---|" + "---|" * len(result.models)]
        cells = {(r.model, r.signal): r for r in per.itertuples()}
        for name in measured["signal"]:
            row = []
            for m in result.models:
                r = cells.get((m, name))
                row.append("—" if r is None or np.isnan(r.rho) else
                           f"{r.rho:+.3f} {_interval(r.ci_low, r.ci_high)}, p {r.p_adjusted:.3g}")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def signal_section(result: SignalStudy, figure: bool, correlation_figure: bool = False) -> str:
    frame, table, leads = result.frame, result.table, result.leads
    forgot = int(frame["forgot"].sum())
    did_not = len(frame) - forgot
    lines = ["## Which drift signal warns best", "",
             f"Every checkpoint from the second stage on ({len(frame)}), labelled by whether its stage regressed on "
             "an earlier task (the paired verdict against the previous checkpoint): "
             f"{forgot} forgot, {did_not} did not. For each signal, the AUROC of telling the two apart (0.5 is "
             "chance) with its stratified bootstrap interval; `_increase` is the change over the previous "
             "checkpoint, `task_` the drift on the test prompts of the task just trained. The cut maximises "
             "Youden's J on these same checkpoints. Every number is in "
             f"[{SIGNAL_STUDY_CSV}]({SIGNAL_STUDY_CSV}) and [{SIGNAL_CHECKPOINTS_CSV}]({SIGNAL_CHECKPOINTS_CSV}).",
             ""]
    if min(forgot, did_not) < MIN_PER_CLASS:
        lines += [f"Not ranked: at least {MIN_PER_CLASS} checkpoints of each kind are needed; these runs have "
                  f"{forgot} that forgot and {did_not} that did not.", ""]
        return "\n".join(lines + _correlation_lines(result, correlation_figure))
    if figure:
        lines += ["![signals](signals.png)", ""]
    lines += ["| signal | checkpoints | forgot | AUROC | interval | cut |", "|---|---:|---:|---:|---|---:|"]
    for row in table.itertuples():
        lines.append(f"| {row.signal} | {row.checkpoints} | {row.forgot} | {_cell(row.auroc)} | "
                     f"{_interval(row.ci_low, row.ci_high)} | {_cell(row.cut, 4)} |")
    chance = [r.signal for r in table.itertuples() if not np.isnan(r.auroc) and r.ci_low <= 0.5]
    if chance:
        lines += ["", f"Intervals that contain 0.5 (no evidence the signal warns at all): {', '.join(chance)}."]
    lines.append("")
    lines += _by_model_lines(result)
    if len(leads):
        summary = leads.groupby("signal", sort=False).agg(
            crossed=("steps_before_end", lambda s: int(s.notna().sum())), of=("steps_before_end", "size"),
            median_steps=("steps_before_end", "median"))
        lines += ["Live lead, on the monitored runs: for each checkpoint that forgot, how many optimizer steps before "
                  "its stage ended the signal was first above its cut (in-sample: the cut was fitted on these "
                  f"checkpoints; [{SIGNAL_LEADS_CSV}]({SIGNAL_LEADS_CSV})).", "",
                  "| signal | crossed | median steps before the end |", "|---|---:|---:|"]
        for row in summary.itertuples():  # itertuples keeps the counts ints (iterrows makes the row float)
            lines.append(f"| {row.Index} | {row.crossed} of {row.of} | {_cell(row.median_steps, 1)} |")
        lines.append("")
    return "\n".join(lines + _correlation_lines(result, correlation_figure))


def write_signal_study(study: StudyResults, out: Path, text) -> tuple[str, list[Path]]:
    """The section's Markdown and the files it wrote (`text(name, content)` writes one file of the report)."""
    from lorawatch.report import figures

    result = signal_study(study)
    for name, table in ((SIGNAL_CHECKPOINTS_CSV, result.frame), (SIGNAL_STUDY_CSV, result.table),
                        (SIGNAL_BY_MODEL_CSV, result.by_model), (SIGNAL_LEADS_CSV, result.leads),
                        (CORRELATION_CSV, result.correlation),
                        (CORRELATION_BY_MODEL_CSV, result.correlation_by_model)):
        text(name, table.to_csv(index=False, float_format="%.10g"))
    forgot = int(result.frame["forgot"].sum()) if len(result.frame) else 0
    ranked = min(forgot, len(result.frame) - forgot) >= MIN_PER_CLASS
    files = figures.signal_figure(result.table, out) if ranked else []
    correlated = result.correlation["rho"].notna().any() if len(result.correlation) else False
    correlation_files = figures.correlation_figure(result.correlation, out, alpha=result.alpha) if correlated else []
    return (signal_section(result, bool(files), bool(correlation_files)), files + correlation_files)
