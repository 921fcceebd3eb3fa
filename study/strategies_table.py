"""The table docs/strategies.md shows: every strategy of a strategies study, its seeds pooled.

    .venv/bin/python study/strategies_table.py runs/demo-strategies [REPORT/paired.csv]

Reads the study's unit folders (`<point>-seed<S>`) through `lorawatch.report.compare.compare_runs`, the same numbers
`lorawatch compare` prints, and prints one Markdown row per grid point: final average accuracy, BWT and final KL to
base as mean ± sample std over seeds (and each seed's value), then what a run cost (training, of which the added
loss term or the monitor, evaluation, and their sum), seed means summed from the stage records, so that a unit
resumed after an interruption counts every session's stages.

Given the study report's paired.csv (`lorawatch report` writes it), a second table states every strategy's
difference from `none` on the same rows, seed by seed, with its paired bootstrap interval, and how many tasks
regressed or improved beyond chance (exact McNemar, Holm over the tasks): the numbers behind every comparison
the page makes.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path

from lorawatch.rundir.layout import RunFolder
from lorawatch.report.compare import compare_runs
from lorawatch.report.run_comparison import AVERAGE, KL
from lorawatch.report.verdict_view import signed


def _mean_sd(values: list[float]) -> str:
    shown = ", ".join(f"{v:.3f}" for v in values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({shown})"


def _extra_loss_seconds(run_dir: Path, seed: int, stages: int) -> float:
    total = 0.0
    for stage in range(1, stages + 1):
        strategy = RunFolder(run_dir).stage(seed, stage).training.load().strategy
        if strategy is not None:
            total += (strategy.loss_seconds or 0.0) + (strategy.fisher_seconds or 0.0)
    return total


def main(study_dir: Path) -> None:
    # the study's units in grid order (DIR/study.json), those that finished
    units = [Path(u["folder"]) for u in json.loads((study_dir / "study.json").read_text())["units"]]
    folders = [p for p in units if (p / "summary").is_dir()]
    runs = compare_runs(folders)["runs"]
    points: dict[str, list[dict]] = {}
    for run in runs:
        points.setdefault(re.sub(r"-seed\d+$", "", Path(run["run_dir"]).name), []).append(run)
    print("| strategy | seeds | final avg accuracy | BWT | final KL to base | training (s) | of which strategy or "
          "monitor (s) | evaluation (s) | training + evaluation (s) | interventions |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    for point, group in points.items():
        head = {key: [r["headline"][key] for r in group] for key in ("final_avg_accuracy", "bwt", "final_kl_to_base")}
        compute = {key: statistics.mean(r["compute"][key] for r in group)
                   for key in ("training_s", "monitor_s", "eval_s")}
        extra = statistics.mean(_extra_loss_seconds(Path(r["run_dir"]), r["seeds"][0], len(r["tasks"]))
                                for r in group) + compute["monitor_s"]
        print(f"| {point} | {', '.join(str(r['seeds'][0]) for r in group)} | {_mean_sd(head['final_avg_accuracy'])} | "
              f"{_mean_sd(head['bwt'])} | {_mean_sd(head['final_kl_to_base'])} | {compute['training_s']:.0f} | "
              f"{extra:.0f} | {compute['eval_s']:.0f} | {compute['training_s'] + compute['eval_s']:.0f} | "
              f"{sum(len(r['interventions']) for r in group)} |")


def _cell(row: dict) -> str:
    if not row["ci_low"]:  # a mean over one seed: no spread, no interval
        return f"{signed(float(row['difference']))} (one seed: no interval over seeds)"
    low, high = float(row["ci_low"]), float(row["ci_high"])
    if low == high and not row["seed"]:  # seeds that agree exactly give a t interval of width 0: no evidence
        return f"{signed(float(row['difference']))} (the seeds agree: no spread to estimate)"
    bold = "**" if low > 0 or high < 0 else ""  # the interval excludes 0
    return f"{bold}{signed(float(row['difference']))} [{signed(low)}, {signed(high)}]{bold}"


def paired_table(paired_csv: Path) -> None:
    """Each strategy against `none`, per seed: Δ final average accuracy and Δ final KL with their intervals,
    and the tasks that regressed or improved (Holm-adjusted exact McNemar)."""
    with paired_csv.open() as f:
        rows = list(csv.DictReader(f))
    by_run: dict[str, dict[str, dict]] = {}
    for row in rows:
        run = re.search(r"\[(.*)\]", row["run"]).group(1)  # the setting the report names the group by
        seed = row["seed"] or "mean (t over seeds)"
        if not row["seed"] and row["measure"] not in (AVERAGE, KL):
            continue
        cell = by_run.setdefault(run, {}).setdefault(seed, {"regressed": [], "improved": []})
        if row["measure"] == AVERAGE:
            cell["avg"] = row
        elif row["measure"] == KL:
            cell["kl"] = row
        elif row["verdict"] == "regressed":
            cell["regressed"].append(row["task"])
        elif row["verdict"] == "improved":
            cell["improved"].append(row["task"])
    print("| setting | seed | Δ final avg accuracy vs none [95% CI] | Δ final KL vs none [95% CI] | "
          "tasks regressed / improved vs none |")
    print("|---|---|---|---|---|")
    for run, seeds in by_run.items():
        if sum(seed[0].isdigit() for seed in seeds) == 1:  # one seed: its mean row repeats it
            seeds = {seed: cell for seed, cell in seeds.items() if seed[0].isdigit()}
        for seed, cell in sorted(seeds.items()):
            verdicts = "" if not seed[0].isdigit() else \
                f"{', '.join(cell['regressed']) or '—'} / {', '.join(cell['improved']) or '—'}"
            print(f"| {run} | {seed} | {_cell(cell['avg'])} | {_cell(cell['kl'])} | {verdicts} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo-strategies"))
    if len(sys.argv) > 2:
        print()
        paired_table(Path(sys.argv[2]))
