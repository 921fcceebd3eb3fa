"""The live drift series of runs as data and a table: used by `lorawatch compare` and `lorawatch report`
(the figure is report/figures.py's `monitor_figure`).

Reads stage-K/monitor.jsonl and the interventions recorded in stage-K/stage.json of finished run folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from lorawatch.rundir.layout import RunFolder


def monitor_series(run_dir: Path) -> pd.DataFrame:
    """One row per live measurement: seed, stage, task, step, cumulative step, KL, entropy, margin, threshold."""
    rows = []
    run = RunFolder(run_dir)
    for seed in run.seeds_on_disk():
        offset = 0
        for stage in run.seed(seed).stages_on_disk()[1:]:
            folder = run.stage(seed, stage)
            if not folder.finished():
                continue  # an unfinished stage: its series is not final
            info = folder.record.load()
            if folder.monitor_series.exists():
                for point in folder.monitor_series.load():
                    rows.append({"seed": seed, "stage": stage, "task": info.task,
                                 "cumulative_step": offset + point.step, **point.model_dump()})
            offset += info.training.optimizer_steps if info.training else 0
    return pd.DataFrame(rows)


def interventions(run_dir: Path) -> list[dict]:
    found = []
    run = RunFolder(run_dir)
    for seed in run.seeds_on_disk():
        for stage in run.seed(seed).stages_on_disk():
            record = run.stage(seed, stage).record
            entry = record.load().intervention if record.exists() else None
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
