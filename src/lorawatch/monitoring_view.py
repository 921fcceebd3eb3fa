"""The live drift series of runs as tables and a figure: used by `lorawatch compare` and `lorawatch report`.

Reads stage-K/monitor.jsonl and the interventions recorded in stage-K/stage.json of finished run folders.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorawatch import store

matplotlib.use("Agg")


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


def interventions_markdown(rows: Sequence[dict], label: str | None = None) -> str:
    head = ("| Run " if label is not None else "") + "| Seed | Stage | Task | Action | Step | KL to base | Threshold | " \
           "Kept step | Kept KL |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        kept_kl = "—" if r.get("kept_kl") is None else f"{r['kept_kl']:.4f}"
        lines.append(("| " + str(r.get("run", label)) + " " if label is not None else "") +
                     f"| {r['seed']} | {r['stage']} | {r['task']} | {r['action']} | {r['step']} | {r['kl']:.4f} | "
                     f"{r['threshold']:.4f} | {r['kept_step']} | {kept_kl} |")
    return "\n".join(lines)


def monitor_figure(runs: Sequence[tuple[str, Path]], out_dir: Path, stem: str = "monitor") -> list[Path]:
    """KL to base against cumulative optimizer step for every run and seed; thresholds dashed, interventions ×."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab10"].colors
    drawn = False
    for i, (label, run_dir) in enumerate(runs):
        series = monitor_series(run_dir)
        if series.empty:
            continue
        drawn = True
        color = colors[i % len(colors)]
        for seed, rows in series.groupby("seed"):
            ax.plot(rows["cumulative_step"], rows["kl_mean"], marker=".", color=color,
                    label=f"{label} (seed {seed})")
            for _, stage_rows in rows.groupby("stage"):
                if stage_rows["threshold"].notna().any():
                    ax.hlines(stage_rows["threshold"].iloc[0], stage_rows["cumulative_step"].min(),
                              stage_rows["cumulative_step"].max(), colors=[color], linestyles="dashed", linewidth=1)
            crossed = rows[rows["above"]]
            ax.scatter(crossed["cumulative_step"], crossed["kl_mean"], marker="x", s=60, color=color, zorder=3)
    if not drawn:
        return []
    ax.set_xlabel("optimizer step (cumulative over stages)")
    ax.set_ylabel("KL to base (reference set, mean)")
    ax.set_title("Live drift during training (dashed: threshold, ×: above it)")
    ax.legend(fontsize=7)
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "lorawatch", "svg.fonttype": "path"}):
        for fmt in ("png", "svg"):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=150, metadata={"Date": None} if fmt == "svg" else {"Software": None})
            path = out_dir / f"{stem}.{fmt}"
            store.atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
    return paths
