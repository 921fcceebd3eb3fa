"""report.md's "Drift signals" section and drift_signals.csv: each checkpoint's drift from the base model, summarised
the way llama.cpp's `llama-perplexity --kl-divergence` reports a quantization's (analysis/drift_summary.py).

Sets of prompts per checkpoint:
    reference    the run's fixed reference set, at the answer position (the paper's signal)
    task         the test prompts of the task the checkpoint was just trained on (RL's Razor's measurement)
    answer span  the reference set over the first `reference.span_tokens` tokens of the base model's own answer,
                 teacher-forced (engine/span_drift.py): each row's mean over its positions
    gold span    the same over the gold answer's first tokens

Each statistic is a mean over the set's rows with its standard error (for a 0/1 statistic, the rate), so the
± is the uncertainty from having this many prompts, not a spread over seeds: every seed is its own row. Run
folders written before lorawatch recorded these statistics (schema < 3) show the KL alone.
"""

from __future__ import annotations

import math

import pandas as pd

from lorawatch.analysis.drift_summary import summarize_delta_p, summarize_rate, summarize_values
from lorawatch.report.study import StudyResults
from lorawatch.rundir.layout import RunFolder

DRIFT_SIGNALS_CSV = "drift_signals.csv"
COLUMNS = ("model", "spec", "order", "seed", "checkpoint", "set", "n", "kl_mean", "kl_se", "kl_median", "kl_p95",
           "kl_max", "kl_forward_mean", "kl_forward_se", "same_top1_rate", "same_top1_se", "top5_overlap_mean",
           "top5_overlap_se", "dp_gold_mean", "dp_gold_se", "dp_gold_rms", "n_gold")


def summarize_rows(rows) -> dict[str, float | None]:
    """One set's rows (rundir.schema.ExampleDrift) as COLUMNS' statistics; None where the rows lack one."""
    kl = summarize_values([r.kl for r in rows])
    out: dict[str, float | None] = {"n": len(rows), "kl_mean": kl["mean"], "kl_se": kl["se"],
                                    "kl_median": kl["median"], "kl_p95": kl["p95"], "kl_max": kl["max"]}
    forward = [r.kl_forward for r in rows if r.kl_forward is not None]
    same = [r.same_top1 for r in rows if r.same_top1 is not None]
    overlap = [r.top5_overlap for r in rows if r.top5_overlap is not None]
    gold = [r.dp_gold for r in rows if r.dp_gold is not None]
    summary = summarize_values(forward) if forward else None
    out.update(kl_forward_mean=summary and summary["mean"], kl_forward_se=summary and summary["se"])
    summary = summarize_rate(same) if same else None
    out.update(same_top1_rate=summary and summary["rate"], same_top1_se=summary and summary["se"])
    summary = summarize_values(overlap) if overlap else None
    out.update(top5_overlap_mean=summary and summary["mean"], top5_overlap_se=summary and summary["se"])
    summary = summarize_delta_p(gold) if gold else None
    out.update(dp_gold_mean=summary and summary["mean"], dp_gold_se=summary and summary["se"],
               dp_gold_rms=summary and summary["rms"], n_gold=len(gold))
    return out


def summarize_span_rows(rows) -> dict[str, float | None]:
    """A span set's rows (rundir.schema.SpanDrift) in COLUMNS: every statistic is already a row's mean over its
    positions (same top-1 a share), summarised as a mean with its standard error; Δp is the teacher-forced token's."""
    kl = summarize_values([r.kl for r in rows])
    forward, same = summarize_values([r.kl_forward for r in rows]), summarize_values([r.same_top1 for r in rows])
    overlap, dp = summarize_values([r.top5_overlap for r in rows]), summarize_delta_p([r.dp_token for r in rows])
    return {"n": len(rows), "kl_mean": kl["mean"], "kl_se": kl["se"], "kl_median": kl["median"],
            "kl_p95": kl["p95"], "kl_max": kl["max"], "kl_forward_mean": forward["mean"],
            "kl_forward_se": forward["se"], "same_top1_rate": same["mean"], "same_top1_se": same["se"],
            "top5_overlap_mean": overlap["mean"], "top5_overlap_se": overlap["se"], "dp_gold_mean": dp["mean"],
            "dp_gold_se": dp["se"], "dp_gold_rms": dp["rms"], "n_gold": len(rows)}


def seed_signals(run: RunFolder, seed: int) -> list[dict]:
    """One seed's rows: per finished checkpoint and set of prompts, the set's summary."""
    records = []
    for k in run.seed(seed).stages_on_disk():
        stage = run.stage(seed, k)
        if not stage.finished():
            continue
        checkpoint = stage.record.read().checkpoint
        sets = [("reference", stage.drift.read())]
        if stage.task_drift.exists():
            sets.append(("task", stage.task_drift.read()))
        records += [{"seed": seed, "checkpoint": checkpoint, "set": name, **summarize_rows(rows)}
                    for name, rows in sets]
        spans = stage.span_drift.read() if stage.span_drift.exists() else []
        for span in ("answer", "gold"):
            rows = [r for r in spans if r.span == span]
            if rows:
                records.append({"seed": seed, "checkpoint": checkpoint, "set": f"{span} span",
                                **summarize_span_rows(rows)})
    return records


def signals_frame(study: StudyResults) -> pd.DataFrame:
    """One row per group, seed, checkpoint and set of prompts (COLUMNS)."""
    records = []
    for group in study.groups:
        for seed_result in group.per_seed:
            records += [{"model": group.model, "spec": group.spec, "order": group.order, **row}
                        for row in seed_signals(RunFolder(seed_result.run_dir), seed_result.seed)]
    return pd.DataFrame(records, columns=list(COLUMNS))


def cells(row) -> list[str]:
    """A summary row's cells as the tables show them: KL both ways, same top-1, top-5 overlap, Δp gold."""
    return [_mean_se(row["kl_mean"], row["kl_se"]), _mean_se(row["kl_forward_mean"], row["kl_forward_se"]),
            _mean_se(row["same_top1_rate"], row["same_top1_se"], 1, 100, "%"),
            _mean_se(row["top5_overlap_mean"], row["top5_overlap_se"], 3),
            _mean_se(row["dp_gold_mean"], row["dp_gold_se"])]


HEADERS = ["KL(ckpt ‖ base)", "KL(base ‖ ckpt)", "same top-1", "top-5 overlap", "Δp gold"]


def _mean_se(mean: float | None, se: float | None, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    text = f"{mean * scale:.{digits}f}{unit}"
    if se is not None and not (isinstance(se, float) and math.isnan(se)):
        text += f" ± {se * scale:.{digits}f}{unit}"
    return text


def signals_section(frame: pd.DataFrame) -> str:
    """The section's Markdown: per group and seed, a table of checkpoints × sets."""
    lines = ["## Drift signals", "",
             "Each checkpoint against the base model, on the reference set (the paper's signal) and on the test "
             "prompts of the task it was just trained on (RL's Razor's measurement): mean over the prompts ± its "
             "standard error, as llama.cpp's `--kl-divergence` reports a quantization. KL at the answer position "
             "in both directions; same top-1: the share of prompts where both models' most likely next token "
             "agrees; Δp gold: the change in the probability of the gold answer's first token. The span sets read the "
             "reference set over the first tokens of an answer, teacher-forced (`reference.span_tokens`): the base "
             "model's own answer (answer span) or the gold one (gold span); each statistic is a row's mean over its "
             "positions, Δp that of the teacher-forced token. Every number is in "
             f"[{DRIFT_SIGNALS_CSV}]({DRIFT_SIGNALS_CSV}), with the KL's percentiles.", ""]
    if frame.empty:
        return "\n".join(lines + ["No checkpoints.", ""])
    older = frame["kl_forward_mean"].isna()
    for (model, order, seed), part in frame.groupby(["model", "order", "seed"], sort=False):
        lines += [f"### {model} · {order} · seed {seed}", "",
                  "| checkpoint | prompts | n | KL(ckpt ‖ base) | KL(base ‖ ckpt) | same top-1 | top-5 overlap | "
                  "Δp gold |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for _, row in part.iterrows():
            lines.append(f"| {row['checkpoint']} | {row['set']} | {row['n']} | " + " | ".join(cells(row)) + " |")
        lines.append("")
    if older.any():
        lines += ["—: not measured; these run folders were written before lorawatch recorded the drift statistics "
                  "beside the KL (schema 3), and have no drift on the trained task.", ""]
    return "\n".join(lines)
