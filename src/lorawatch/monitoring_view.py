"""The live drift series of runs as data and a table: used by `lorawatch compare` and `lorawatch report`
(the figure is report/figures.py's `monitor_figure`).

Reads stage-K/monitor.jsonl and the interventions recorded in stage-K/stage.json of finished run folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from lorawatch import store


def monitor_series(run_dir: Path) -> pd.DataFrame:
    """One row per live measurement: seed, stage, task, step, cumulative step, KL, entropy, margin, threshold."""
    rows = []
    for seed_dir in sorted(run_dir.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
        offset = 0
        stages = sorted(seed_dir.glob("stage-*"), key=lambda p: int(p.name.split("-")[1]))
        for stage_dir in stages[1:]:
            stage = int(stage_dir.name.split("-")[1])
            info = store.read_json(stage_dir / "stage.json") if (stage_dir / "stage.json").is_file() else {}
            path = stage_dir / "monitor.jsonl"
            if path.is_file():
                for point in store.read_jsonl(path):
                    rows.append({"seed": int(seed_dir.name.split("-")[1]), "stage": stage, "task": info.get("task"),
                                 "cumulative_step": offset + point["step"], **point})
            offset += int((info.get("training") or {}).get("optimizer_steps", 0))
    return pd.DataFrame(rows)


def interventions(run_dir: Path) -> list[dict]:
    found = []
    for stage_json in sorted(run_dir.glob("seed-*/stage-*/stage.json")):
        entry = store.read_json(stage_json).get("intervention")
        if entry:
            found.append({"seed": int(stage_json.parent.parent.name.split("-")[1]), **entry})
    return sorted(found, key=lambda e: (e["seed"], e["stage"]))


def interventions_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of interventions; each row names its run in `run`."""
    lines = ["| Run | Seed | Stage | Task | Action | Step | KL to base | Threshold | Kept step | Kept KL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept_kl = "—" if r.get("kept_kl") is None else f"{r['kept_kl']:.4f}"
        lines.append(f"| {r['run']} | {r['seed']} | {r['stage']} | {r['task']} | {r['action']} | {r['step']} | "
                     f"{r['kl']:.4f} | {r['threshold']:.4f} | {r['kept_step']} | {kept_kl} |")
    return "\n".join(lines)
