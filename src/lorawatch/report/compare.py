"""Runs side by side (`lorawatch compare RUN...`): typically the same seed with and without a drift monitor.

For each run: the accuracy matrix, OP/BWT/FWT, final KL to base, the compute spent (training, of which the
monitor, evaluation, wall) and the interventions taken. Then whether a difference is real: the first run is the
baseline, and every other run's final checkpoints are compared with its own on the same test rows, seed by seed
on the seeds both have (run_comparison.py: flips, exact McNemar, paired bootstrap intervals of each task's
accuracy, of the final average accuracy and of the final KL to base, means over seeds). Written as compare.md /
compare.json with the live drift figure when --out is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from lorawatch.report import labels, run_comparison
from lorawatch.rundir import atomic
from lorawatch.errors import UserError
from lorawatch.report.monitoring_view import interventions, interventions_markdown
from lorawatch.report import figures
from lorawatch.report.study_report import final_points, load_study
from lorawatch.report.figures import monitor_figure
from lorawatch.report.tables import RunResults, load_run

HEADLINE = [(h.key, h.label) for h in labels.HEADLINE if h.compared]


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    labels = [p.name for p in run_dirs]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in run_dirs]


def _compute(results: RunResults) -> dict:
    """Steps and seconds of a run. Training, monitor and evaluation seconds are summed from the stage records,
    written once per stage, so a resumed run counts the stages of every session; costs.json holds only its
    last session's, whose wall time is therefore shown only for a run that was never resumed."""
    steps, training, monitor, evaluation = 0, 0.0, 0.0, 0.0
    for seed in results.seeds:
        for stage in range(0, len(results.tasks) + 1):
            record = results.stage(seed, stage)
            evaluation += record.eval_seconds or 0.0
            if record.training is not None:
                steps += record.training.optimizer_steps
                training += record.training.seconds
                strategy = record.training.strategy
                training += (strategy.fisher_seconds or 0.0) if strategy else 0.0  # EWC's, after the stage's steps
                monitor += record.training.monitor.seconds if record.training.monitor else 0.0
    out = {"optimizer_steps": steps, "training_s": training, "monitor_s": monitor, "eval_s": evaluation,
           "monitor_overhead": monitor / (training - monitor) if training > monitor > 0 else 0.0}
    costs = results.costs()
    if costs is not None:
        out["resumed"] = costs.resumed
        if not costs.resumed:
            out["wall_s"] = costs.wall_seconds
    return out


def _refuse_repeats(paths: list[Path]) -> None:
    """The same folder twice would compare a run with itself: every difference 0, every verdict "no change"."""
    seen: dict[Path, Path] = {}
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            raise UserError(f"{path}: given twice (also as {seen[resolved]}); compare needs different run folders")
        seen[resolved] = path


def compare_runs(run_dirs: Sequence[str | Path]) -> dict:
    if len(run_dirs) < 2:
        raise UserError("compare needs at least two run folders")
    paths = [Path(p) for p in run_dirs]
    _refuse_repeats(paths)
    runs = []
    loaded = []
    for label, path in zip(_labels(paths), paths):
        results = load_run(path)
        loaded.append(results)
        summary = results.summary()["mean_std"]
        settings = results.monitor_settings()
        monitor = None if settings is None else settings.body()
        matrix = results.accuracy_matrix()
        runs.append({
            "label": label, "run_dir": str(path), "seeds": results.seeds, "tasks": results.tasks,
            "strategy": results.config.strategy.model_dump(exclude_none=True), "monitor": monitor,
            "accuracy_matrix": matrix.to_dict(orient="records"),
            "cl_metrics": results.cl_metrics()[["checkpoint", *labels.TRANSFER_METRICS]].to_dict(orient="records"),
            "headline": {key: (summary.get(key) or {}).get("mean") for key, _ in HEADLINE},
            "compute": _compute(results),
            "interventions": interventions(path),
        })
    tasks = {tuple(r["tasks"]) for r in runs}
    if len(tasks) > 1:
        raise UserError("compare: the runs trained different task sequences: "
                        + "; ".join(f"{r['label']}: {' → '.join(r['tasks'])}" for r in runs))
    return {"runs": runs, "paired": _paired(runs, loaded)}


def _paired(runs: list[dict], loaded: list[RunResults]) -> list[run_comparison.RunComparison]:
    """Every run after the first against the first, on the seeds both have, with the first run's settings."""
    baseline, settings = runs[0], loaded[0].config.statistics
    out = []
    for run in runs[1:]:
        common = [s for s in baseline["seeds"] if s in run["seeds"]]
        folders = {s: (Path(baseline["run_dir"]), Path(run["run_dir"])) for s in common}
        out.append(run_comparison.compare_runs_paired(
            baseline["label"], run["label"], folders, settings,
            baseline_only=[s for s in baseline["seeds"] if s not in common],
            run_only=[s for s in run["seeds"] if s not in common]))
    return out


def _monitor_text(monitor: dict | None) -> str:
    if monitor is None:
        return "none"
    p = monitor["params"]
    parts = [p["action"], f"every {p['every']} steps"]
    if p.get("threshold") is not None:
        parts.append(f"KL > {p['threshold']:.4g}")
    if p.get("relative") is not None:
        parts.append(f"KL > {p['relative']:g} × previous")
    return ", ".join(parts)


def _strategy_text(strategy: dict) -> str:
    settings = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in strategy.items() if key != "name")
    return strategy["name"] + (f" ({settings})" if settings else "")


def _num(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def comparison_markdown(result: dict) -> str:
    runs = result["runs"]
    lines = ["# lorawatch compare", "", "| | " + " | ".join(r["label"] for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    lines.append("| strategy | " + " | ".join(_strategy_text(r["strategy"]) for r in runs) + " |")
    lines.append("| monitor | " + " | ".join(_monitor_text(r["monitor"]) for r in runs) + " |")
    lines.append("| seeds | " + " | ".join(", ".join(map(str, r["seeds"])) for r in runs) + " |")
    for key, label in HEADLINE:
        lines.append(f"| {label} | " + " | ".join(_num(r["headline"][key], 4) for r in runs) + " |")
    rows = (("optimizer_steps", "optimizer steps", 0), ("training_s", "training (s)", 1),
            ("monitor_s", "of which monitor (s)", 1), ("eval_s", "evaluation (s)", 1), ("wall_s", "wall (s)", 1))
    for key, label, digits in rows:
        lines.append(f"| {label} | " + " | ".join(
            _num(r["compute"].get(key), digits) if key in r["compute"] else "—" for r in runs) + " |")
    lines.append("| monitor overhead | " + " | ".join(
        f"{100 * r['compute']['monitor_overhead']:.1f}%" if "monitor_overhead" in r["compute"] else "—"
        for r in runs) + " |")
    lines.append("| interventions | " + " | ".join(str(len(r["interventions"])) for r in runs) + " |")
    lines.append("")
    tasks = runs[0]["tasks"]
    lines += ["## Accuracy matrices (mean over seeds)", "", "| checkpoint | " +
              " | ".join(f"{r['label']}: {t}" for r in runs for t in tasks) + " |",
              "|---|" + "---|" * (len(tasks) * len(runs))]
    for k in range(len(runs[0]["accuracy_matrix"])):
        cells = [_num(r["accuracy_matrix"][k][t]) for r in runs for t in tasks]
        lines.append(f"| {runs[0]['accuracy_matrix'][k]['checkpoint']} | " + " | ".join(cells) + " |")
    lines += ["", "## OP / BWT / FWT per checkpoint", "", "| checkpoint | " +
              " | ".join(f"{r['label']}: {labels.METRIC_HEADERS[m]}" for r in runs for m in labels.TRANSFER_METRICS) + " |",
              "|---|" + "---|" * (len(labels.TRANSFER_METRICS) * len(runs))]
    for k in range(len(runs[0]["cl_metrics"])):
        cells = [_num(r["cl_metrics"][k][m]) for r in runs for m in labels.TRANSFER_METRICS]
        lines.append(f"| {runs[0]['cl_metrics'][k]['checkpoint']} | " + " | ".join(cells) + " |")
    taken = [dict(e, run=r["label"]) for r in runs for e in r["interventions"]]
    lines += ["", "## Interventions", ""]
    lines.append(interventions_markdown(taken) if taken else "None.")
    lines += _paired_markdown(result.get("paired", []))
    return "\n".join(lines) + "\n"


def _paired_markdown(paired: list[run_comparison.RunComparison]) -> list[str]:
    if not paired:
        return []
    s = paired[0].settings
    correction = "Holm over the tasks" if s.correction == "holm" else "unadjusted"
    lines = ["", f"## Is it real? Each run against {paired[0].baseline}", "",
             f"The final checkpoints of both runs on the same test rows (matched by example id), seed by seed on the "
             f"seeds both have. Δ = run − baseline with its {s.confidence:.0%} paired bootstrap interval (the final "
             "average accuracy resamples test rows within each task, the final KL to base the reference rows; "
             "the same resample for both runs); flips ↓ right→wrong, ↑ wrong→right; NFR the negative flip rate; "
             f"exact McNemar p ({correction}); verdict at α {s.alpha:g}. Means over seeds with a Student t "
             "interval.", ""]
    for c in paired:
        lines += [f"### {c.run} against {c.baseline}", "", run_comparison.markdown(c), ""]
    return lines


def write_comparison(result: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the folder ({exc.strerror or exc})") from None
    files = [out / "compare.md", out / "compare.json"]
    text = comparison_markdown(result)
    figure = monitor_figure([(r["label"], Path(r["run_dir"])) for r in result["runs"]], out)
    if figure:
        text += "\n## Live drift\n\n![live drift](monitor.png)\n"
    text += "\n## Final accuracy against final drift\n\n"
    try:
        study = load_study([r["run_dir"] for r in result["runs"]])
    except UserError as exc:  # e.g. adapters evaluated without their training order
        text += f"Not drawn: {exc}\n"
    else:
        figure += figures.figure3(study, final_points(study), out)
        text += "![final accuracy against final KL](figure3.png)\n\nOne point per run and seed.\n"
    atomic.write_text(files[0], text)
    as_json = {**result, "paired": [c.model_dump(mode="json") for c in result.get("paired", [])]}
    atomic.write_text(files[1], json.dumps(as_json, indent=2, default=float) + "\n")
    return files + figure


def print_comparison(result: dict, console: Console) -> None:
    runs = result["runs"]
    table = Table(title="Runs side by side (means over seeds)", title_justify="left")
    table.add_column("")
    for r in runs:
        table.add_column(r["label"], justify="right")
    table.add_row("strategy", *[_strategy_text(r["strategy"]) for r in runs])
    table.add_row("monitor", *[_monitor_text(r["monitor"]) for r in runs])
    for key, label in HEADLINE:
        table.add_row(label, *[_num(r["headline"][key], 4) for r in runs])
    for key, label, digits in (("optimizer_steps", "optimizer steps", 0), ("training_s", "training (s)", 1),
                               ("monitor_s", "of which monitor (s)", 1), ("eval_s", "evaluation (s)", 1)):
        table.add_row(label, *[_num(r["compute"].get(key), digits) for r in runs])
    table.add_row("interventions", *[str(len(r["interventions"])) for r in runs])
    console.print(table)
    for r in runs:
        for e in r["interventions"]:
            console.print(f"{r['label']}: seed {e['seed']} stage {e['stage']} ({e['task']}): KL {e['kl']:.4f} > "
                          f"{e['threshold']:.4f} at step {e['step']} → {e['action']}, kept step {e['kept_step']}")
    for c in result.get("paired", []):
        for table in run_comparison.rich_tables(c):
            console.print(table)
        console.print(f"{c.run} against {c.baseline}:")
        for line in run_comparison.summary_lines(c):
            console.print(f"  {line}")
