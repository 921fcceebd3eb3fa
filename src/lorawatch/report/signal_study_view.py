"""report.md's "Which drift signal warns best" section, with signal_study.csv, signal_study_by_model.csv,
signal_leads.csv and signals.png (analysis/signal_study.py computes them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lorawatch.analysis.signal_study import (MIN_PER_CLASS, checkpoint_frame, lead_steps, signal_table,
                                             signal_table_by_model)
from lorawatch.report.study import StudyResults, model_display_name

SIGNAL_STUDY_CSV = "signal_study.csv"
SIGNAL_CHECKPOINTS_CSV = "signal_checkpoints.csv"
SIGNAL_LEADS_CSV = "signal_leads.csv"
SIGNAL_BY_MODEL_CSV = "signal_study_by_model.csv"


def signal_study(study: StudyResults) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(the checkpoints with their signals and labels, each signal's AUROC pooled, then per model, and the live
    signals' leads)."""
    runs = [(d.name, d) for g in study.groups for d in g.run_dirs]
    # The model itself, not the group's label: a study's learning rates are groups of one model.
    models = {d.name: model_display_name(g.spec) for g in study.groups for d in g.run_dirs}
    settings = study.groups[0].config.statistics
    frame = checkpoint_frame(runs, settings, models)
    options = {"confidence": settings.confidence, "resamples": settings.resamples, "seed": settings.seed}
    table = signal_table(frame, **options)
    by_model = signal_table_by_model(frame, **options)
    return frame, table, by_model, lead_steps(runs, frame, table, by_model)


def _cell(value: float, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _by_model_lines(frame: pd.DataFrame, by_model: pd.DataFrame) -> list[str]:
    """Each model ranked alone: its scale is its own, so its AUROC is not mixed with which model drifts more."""
    models = list(dict.fromkeys(frame["model"]))
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
        cells = {(r.model, r.signal): r for r in by_model.itertuples()}
        order = by_model[by_model["model"] == ranked[0]]["signal"]
        for name in order:
            row = []
            for m in ranked:
                r = cells[(m, name)]
                row.append("—" if np.isnan(r.auroc) else f"{r.auroc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
            if any(cell != "—" for cell in row):  # a signal these folders do not hold is left out
                lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    for m in unranked:
        forgot, n = counts[m]
        lines += [f"{m} is not ranked alone: {forgot} of its {n} checkpoints forgot (at least {MIN_PER_CLASS} of "
                  "each kind are needed), and its checkpoints have no live lead.", ""]
    return lines


def signal_section(frame: pd.DataFrame, table: pd.DataFrame, leads: pd.DataFrame, figure: bool,
                   by_model: pd.DataFrame | None = None) -> str:
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
        return "\n".join(lines)
    if figure:
        lines += ["![signals](signals.png)", ""]
    lines += ["| signal | checkpoints | forgot | AUROC | interval | cut |", "|---|---:|---:|---:|---|---:|"]
    for row in table.itertuples():
        interval = "—" if np.isnan(row.auroc) else f"[{row.ci_low:.3f}, {row.ci_high:.3f}]"
        lines.append(f"| {row.signal} | {row.checkpoints} | {row.forgot} | {_cell(row.auroc)} | {interval} | "
                     f"{_cell(row.cut, 4)} |")
    chance = [r.signal for r in table.itertuples() if not np.isnan(r.auroc) and r.ci_low <= 0.5]
    if chance:
        lines += ["", f"Intervals that contain 0.5 (no evidence the signal warns at all): {', '.join(chance)}."]
    lines.append("")
    if by_model is not None:
        lines += _by_model_lines(frame, by_model)
    if len(leads):
        summary = leads.groupby("signal", sort=False).agg(
            crossed=("steps_before_end", lambda s: int(s.notna().sum())), of=("steps_before_end", "size"),
            median_steps=("steps_before_end", "median"))
        lines += ["Live lead, on the monitored runs: for each checkpoint that forgot, how many optimizer steps before "
                  "its stage ended the signal was first above its cut (in-sample: the cut was fitted on these "
                  f"checkpoints; [{SIGNAL_LEADS_CSV}]({SIGNAL_LEADS_CSV})).", "",
                  "| signal | crossed | median steps before the end |", "|---|---:|---:|"]
        for name, row in summary.iterrows():
            lines.append(f"| {name} | {row['crossed']} of {row['of']} | {_cell(row['median_steps'], 1)} |")
        lines.append("")
    return "\n".join(lines)


def write_signal_study(study: StudyResults, out: Path, text) -> tuple[str, list[Path]]:
    """The section's Markdown and the files it wrote (`text(name, content)` writes one file of the report)."""
    from lorawatch.report import figures

    frame, table, by_model, leads = signal_study(study)
    text(SIGNAL_CHECKPOINTS_CSV, frame.to_csv(index=False, float_format="%.10g"))
    text(SIGNAL_STUDY_CSV, table.to_csv(index=False, float_format="%.10g"))
    text(SIGNAL_BY_MODEL_CSV, by_model.to_csv(index=False, float_format="%.10g"))
    text(SIGNAL_LEADS_CSV, leads.to_csv(index=False, float_format="%.10g"))
    forgot = int(frame["forgot"].sum()) if len(frame) else 0
    ranked = min(forgot, len(frame) - forgot) >= MIN_PER_CLASS
    files = figures.signal_figure(table, out) if ranked else []
    return signal_section(frame, table, leads, bool(files), by_model), files
