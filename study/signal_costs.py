"""What each drift signal costs, as docs/signals.md quotes it: read from the costs.json and monitor.jsonl files of a
study's run folders, so that every number is one the runs measured.

    python study/signal_costs.py runs/signals-demo

Per checkpoint (every trained stage), the seconds of the evaluation (every task's test rows and the reference
set, generated; the first-token signals come from its reference pass at no extra cost), of the span drift
(engine/span_drift.py: the answer and gold spans with the adapter on and off) and of the task drift (the trained
task's test prompts, RL's Razor's measurement); per live measurement, the monitor's seconds (first-token signals
only, unless the run watched a span signal). Median and range over the runs: the runs of one study share the cores,
so the ratios are steadier than the seconds. One table per model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def run_costs(run: Path) -> dict:
    costs = json.loads((run / "costs.json").read_text())
    phases = costs["phase_seconds"]
    stages = [s for s in run.glob("seed-*/stage-*") if s.name != "stage-0" and (s / "stage.json").exists()]
    measurements = sum(sum(1 for line in (s / "monitor.jsonl").open() if line.strip())
                       for s in stages if (s / "monitor.jsonl").exists())
    model = json.loads((run / "config.json").read_text())["model"]["spec"]
    row = {"run": run.name, "model": model, "checkpoints": len(stages), "measurements": measurements}
    for phase in ("evaluation", "span_drift", "task_drift"):
        row[phase] = phases.get(phase, float("nan")) / len(stages)
    row["monitor"] = phases.get("monitor", float("nan")) / measurements if measurements else float("nan")
    row["span_vs_evaluation"] = row["span_drift"] / row["evaluation"]
    row["task_vs_evaluation"] = row["task_drift"] / row["evaluation"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a `lorawatch study` output folder (its runs/ are read)")
    args = parser.parse_args()
    runs = sorted(p.parent for p in (args.study / "runs").glob("*/costs.json"))
    frame = pd.DataFrame([run_costs(r) for r in runs])
    labels = {"evaluation": "evaluation, s per checkpoint", "span_drift": "span drift, s per checkpoint",
              "task_drift": "task drift, s per checkpoint", "monitor": "live measurement, s each",
              "span_vs_evaluation": "span drift ÷ evaluation", "task_vs_evaluation": "task drift ÷ evaluation"}
    for model, part in frame.groupby("model", sort=False):
        print(f"{model}: {len(part)} runs, {int(part['checkpoints'].sum())} checkpoints, "
              f"{int(part['measurements'].sum())} live measurements\n")
        print("| cost | median | range |")
        print("|---|---:|---|")
        for column, label in labels.items():
            values = part[column].dropna()
            if len(values):
                print(f"| {label} | {values.median():.2f} | {values.min():.2f} – {values.max():.2f} |")
        print()

if __name__ == "__main__":
    main()
