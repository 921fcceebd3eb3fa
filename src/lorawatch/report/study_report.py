"""`lorawatch report`: the paper's tables and figures over many finished run folders.

    from lorawatch.report.study_report import write_report
    report = write_report(["runs/qwen", "runs/qwen-reversed", "runs/gemma"], "report/")

Writes into the output folder:

    report.md                    index: the runs used, every table, links to every figure
    table3.md/.csv/.tex          per model and step: learned task, R[k,k], immediate gain, vs. base, avg accuracy
    table4.md/.csv/.tex          OP, BWT, FWT per checkpoint
    table5.md/.csv/.tex          Δ entropy, Δ margin, KL to base per checkpoint
    table6.md/.csv/.tex          final average accuracy and final KL to base, per model and task order
    paired.csv                   every group that differs in a setting against its baseline group, on the same
                                 rows (report/real.py; report.md's "Is it real?" sections show it and each
                                 group's verdicts per seed)
    figure1.png/.svg, figure1.csv   KL to base vs average accuracy, every checkpoint; correlation; failure zone
    correlation.json             Pearson and Spearman r and p, the failure-zone threshold and how it was fitted
    figure2.png/.svg, figure2.csv   KL to base per step, per model and order
    deployed.csv                 each checkpoint's deployed forms (GGUF through llama.cpp) against the PyTorch
                                 checkpoint, when the runs have them (report/deployed_view.py)
    model-<name>-matrix.png/.svg    the accuracy matrix as an annotated heatmap, one panel per order
    model-<name>-steps.png/.svg     average accuracy and KL to base per step on twin axes

Markdown and LaTeX cells are "mean ± std" over seeds (the mean alone for one seed, "—" where undefined);
the CSVs hold the numbers, one row per table row, with `<column>_std` beside each mean and an empty cell
where a metric is undefined.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from lorawatch.rundir import atomic
from lorawatch.errors import UserError
from lorawatch.analysis.adapter_flags import inactive_adapters
from lorawatch.report.tables import load_run_config
from lorawatch.report.monitoring_view import interventions, interventions_markdown
from lorawatch.report import deployed_view, drift_signals, real
from lorawatch.report.signal_study_view import write_signal_study
from lorawatch.report.paper_tables import ReportTable, build_tables
from lorawatch.report.statistics import (
    FAILURE_ZONE_METHOD,
    correlation,
    correlations,
    fit_failure_threshold,
    kl_accuracy_points,
)
from lorawatch.report.study import Group, StudyResults, load_study, model_display_name, slug
from lorawatch.report.run_comparison import RunComparison

__all__ = ["FAILURE_ZONE_METHOD", "Report", "ReportTable", "StudyResults", "build_tables", "correlation", "correlations",
           "fit_failure_threshold", "kl_accuracy_points", "load_study", "model_display_name", "write_report"]


@dataclass
class Report:
    out: Path
    study: StudyResults
    tables: list[ReportTable]
    correlation: dict       # the content of correlation.json
    files: list[Path]
    # every group that differs in a setting against its baseline group: (baseline, group, their comparison)
    paired: list[tuple[Group, Group, RunComparison]] = field(default_factory=list)


def _clean(value):
    """JSON-ready: NaN becomes null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _model_stems(study: StudyResults) -> dict[str, str]:
    stems: dict[str, str] = {}
    for model in study.models:
        stem, n = slug(model), 2
        while stem in stems.values():
            stem, n = f"{slug(model)}-{n}", n + 1
        stems[model] = stem
    return stems


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> Report:
    """Read the run folders, write tables, figures, correlation.json and report.md into `out`."""
    from lorawatch.report import figures

    study = load_study(run_dirs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (--out names the report folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the report folder ({exc.strerror or exc})") from None
    files: list[Path] = []

    def text(name: str, content: str) -> None:
        atomic.write_text(out / name, content)
        files.append(out / name)

    tables = build_tables(study)
    for table in tables:
        text(f"{table.name}.md", f"**{table.title}**\n\n{table.to_markdown()}\n{table.note}\n")
        text(f"{table.name}.csv", table.to_csv())
        text(f"{table.name}.tex", table.to_latex())

    points = kl_accuracy_points(study)
    corr = correlations(points)
    zone = fit_failure_threshold(points["kl_to_base"], points["below_base"])
    corr_json = _clean({
        "x": "KL to base on the reference set (seed mean)",
        "y": "average accuracy over all tasks (seed mean)",
        "points": "every checkpoint after a training step, of every model and task order; base checkpoints "
                  "(KL = 0 by definition) are left out",
        **corr,
        "failure_zone": zone,
        "checkpoints": points.to_dict(orient="records"),
    })
    text("correlation.json", json.dumps(corr_json, indent=2, ensure_ascii=False) + "\n")
    text("figure1.csv", points.to_csv(index=False, float_format="%.10g"))
    curves = []
    for group in study.groups:
        for k in range(len(group.mean)):
            curves.append({"model": group.model, "spec": group.spec, "order": group.order, "step": k,
                           "checkpoint": group.mean["checkpoint"].iloc[k], "n_seeds": len(group.per_seed),
                           "kl_to_base": group.mean["kl_mean"].iloc[k], "kl_to_base_std": group.std["kl_mean"].iloc[k],
                           "avg_accuracy": group.mean["avg_all"].iloc[k],
                           "avg_accuracy_std": group.std["avg_all"].iloc[k]})
    text("figure2.csv", pd.DataFrame(curves).to_csv(index=False, float_format="%.10g"))
    finals = final_points(study)
    text("figure3.csv", finals.to_csv(index=False, float_format="%.10g"))

    files += figures.figure1(study, points, corr, zone, out)
    files += figures.figure2(study, out)
    files += figures.figure3(study, finals, out)
    stems = _model_stems(study)
    for model in study.models:
        files += figures.matrix_heatmap(study, model, out, f"model-{stems[model]}-matrix")
        files += figures.accuracy_and_kl(study, model, out, f"model-{stems[model]}-steps")

    index = _index(study, tables, corr, zone, stems)
    paired = real.setting_comparisons(study)
    text(real.PAIRED_CSV, real.paired_frame(paired).to_csv(index=False, float_format="%.10g"))
    index += "\n" + real.verdicts_section(study) + "\n" + real.settings_section(paired)
    signals = drift_signals.signals_frame(study)
    text(drift_signals.DRIFT_SIGNALS_CSV, signals.to_csv(index=False, float_format="%.10g"))
    index += "\n" + drift_signals.signals_section(signals)
    deployed = deployed_view.deployed_frame(study)
    if not deployed.empty:  # runs with deployed forms (`lorawatch deploy`, the config's deploy section)
        text(deployed_view.DEPLOYED_CSV, deployed.to_csv(index=False, float_format="%.10g"))
        index += "\n" + deployed_view.deployed_section(deployed)
    section, signal_files = write_signal_study(study, out, text)
    files += signal_files
    index += "\n" + section
    run_folders = [(Path(d).name, Path(d)) for g in study.groups for d in g.run_dirs]
    monitored = figures.monitor_figure(run_folders, out)
    if monitored:
        files += monitored
        taken = [dict(e, run=label) for label, d in run_folders for e in interventions(d)]
        index += ("\n## Live drift monitoring\n\n![live drift](monitor.png)\n\nKL to base measured during "
                  "training, per run and seed (dashed: the stage's threshold; ×: above it).\n\n"
                  + (interventions_markdown(taken) if taken else "No interventions.") + "\n")
    flagged = [(Path(d).name, f) for g in study.groups for d in g.run_dirs
               for f in inactive_adapters(Path(d), load_run_config(Path(d)).seeds)]
    if flagged:
        index += ("\n## Adapters with no effect\n\nThese checkpoints give the base model's distribution on every "
                  "reference row: their numbers describe the base model, not a fine-tune.\n\n"
                  + "".join(f"- {run}: {f.line()}\n" for run, f in flagged))
    text("report.md", index)
    return Report(out, study, tables, corr_json, files, paired)


def final_points(study: StudyResults) -> pd.DataFrame:
    """Figure 3's points: every run's final average accuracy and final KL to base, per seed."""
    rows = [{"model": g.model, "spec": g.spec, "order": g.order, "seed": s.seed, "run_dir": str(s.run_dir),
             "final_avg_accuracy": s.steps["avg_all"].iloc[-1], "final_kl_to_base": s.steps["kl_mean"].iloc[-1]}
            for g in study.groups for s in g.per_seed]
    return pd.DataFrame(rows, columns=["model", "spec", "order", "seed", "run_dir", "final_avg_accuracy",
                                       "final_kl_to_base"])


def _index(study: StudyResults, tables: list[ReportTable], corr: dict, zone: dict, stems: dict[str, str]) -> str:
    def r_line(entries: dict, label: str) -> str:
        parts = []
        for name in ("pearson", "spearman"):
            entry = entries[name]
            parts.append(f"{name.title()} not computed ({entry['reason']})" if entry["r"] is None else
                         f"{name.title()} r = {entry['r']:.3f}, p = {entry['p']:.3g}")
        return f"- {label} ({entries['n']} points): " + "; ".join(parts)

    lines = ["# lorawatch report", "",
             f"{len(study.groups)} model × order group(s) from "
             f"{sum(len(g.run_dirs) for g in study.groups)} run folder(s). Numbers are computed per seed with the "
             "same code as `lorawatch metrics` and aggregated as mean ± sample std over seeds.", "",
             "| Model | Spec | Order | Tasks (training order) | Seeds | Run folders |", "|---|---|---|---|---|---|"]
    for g in study.groups:
        lines.append(f"| {g.model} | `{g.spec}` | {g.order} | {' → '.join(g.tasks)} | "
                     f"{', '.join(map(str, g.seeds))} | {', '.join(f'`{d}`' for d in g.run_dirs)} |")
    lines.append("")
    for table in tables:
        lines += [f"## {table.title}", "", table.to_markdown(), table.note, "",
                  f"[CSV]({table.name}.csv) · [LaTeX]({table.name}.tex)", ""]
    lines += ["## Figure 1: KL to base against average accuracy", "", "![Figure 1](figure1.png)", "",
              "[SVG](figure1.svg) · [data](figure1.csv) · [correlation.json](correlation.json)", "",
              f"Every checkpoint after a training step ({corr['n']} points, seed means; base checkpoints, whose KL "
              "is 0 by definition, are left out).", "",
              r_line(corr, "All models pooled"),
              *[r_line(entries, model) for model, entries in corr["per_model"].items()],
              "", corr["independence"], ""]
    if zone["threshold"] is not None:
        lines.append(f"**Failure zone: KL to base > {zone['threshold']:.4g}** (balanced accuracy "
                     f"{zone['balanced_accuracy']:.3f}; {zone['n_failed']} checkpoint(s) below their base model's "
                     f"average accuracy, {zone['n_healthy']} not).")
    else:
        lines.append(f"Failure zone: no threshold ({zone['reason']}), so none is offered to "
                     "`monitor.calibrate_from`.")
    lines += ["", f"Method: {zone['method']}", "",
              "## Figure 2: KL to base per step", "", "![Figure 2](figure2.png)", "",
              "[SVG](figure2.svg) · [data](figure2.csv)", "",
              "## Figure 3: final accuracy against final drift", "", "![Figure 3](figure3.png)", "",
              "[SVG](figure3.svg) · [data](figure3.csv)", "",
              "One point per run and seed: what each model, setting or strategy learned against how far it moved "
              "from its base model.", "", "## Per model", ""]
    for model in study.models:
        stem = stems[model]
        lines += [f"### {model}", "", f"![{model} accuracy matrix](model-{stem}-matrix.png)", "",
                  f"![{model} accuracy and KL per step](model-{stem}-steps.png)", "",
                  f"SVG: [matrix](model-{stem}-matrix.svg) · [steps](model-{stem}-steps.svg)", ""]
    return "\n".join(lines)
