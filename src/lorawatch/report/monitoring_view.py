"""The live drift series of runs as data and a table: used by `lorawatch compare` and `lorawatch report`
(the figure is report/figures.py's `monitor_figure`).

Reads stage-K/monitor.jsonl and the interventions recorded in stage-K/stage.json of finished run folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from lorawatch.rundir import schema, store


def monitor_series(run_dir: Path) -> pd.DataFrame:
    """One row per live measurement: seed, stage, task, step, cumulative step, KL, entropy, margin, threshold."""
    rows = []
    for seed in store.seeds_on_disk(run_dir):
        offset = 0
        for stage in store.stages_on_disk(run_dir, seed)[1:]:
            folder = store.stage_dir(run_dir, seed, stage)
            if not (folder / "stage.json").is_file():
                continue  # an unfinished stage: its series is not final
            info = store.load_record(folder / "stage.json", schema.StageRecord)
            if (folder / "monitor.jsonl").is_file():
                for point in store.load_rows(folder / "monitor.jsonl", schema.MonitorPoint):
                    rows.append({"seed": seed, "stage": stage, "task": info.task,
                                 "cumulative_step": offset + point.step, **point.model_dump()})
            offset += info.training.optimizer_steps if info.training else 0
    return pd.DataFrame(rows)


def interventions(run_dir: Path) -> list[dict]:
    found = []
    for seed in store.seeds_on_disk(run_dir):
        for stage in store.stages_on_disk(run_dir, seed):
            path = store.stage_dir(run_dir, seed, stage) / "stage.json"
            entry = store.load_record(path, schema.StageRecord).intervention if path.is_file() else None
            if entry is not None:
                found.append({"seed": seed, **entry.model_dump()})
    return found


def interventions_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of interventions; each row names its run in `run`."""
    lines = ["| Run | Seed | Stage | Task | Action | Step | KL to base | Threshold | Kept step | Kept KL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept_kl = "—" if r.get("kept_kl") is None else f"{r['kept_kl']:.4f}"
        lines.append(f"| {r['run']} | {r['seed']} | {r['stage']} | {r['task']} | {r['action']} | {r['step']} | "
                     f"{r['kl']:.4f} | {r['threshold']:.4f} | {r['kept_step']} | {kept_kl} |")
    return "\n".join(lines)
