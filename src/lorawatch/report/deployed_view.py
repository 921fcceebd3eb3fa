"""The deployed forms as the report shows them (report.md's "Deployed form" section, deployed.csv, the HTML run
page's section): per seed, checkpoint and format, the accuracy under llama.cpp beside the PyTorch checkpoint's on
the same rows with the paired difference and verdict (analysis/deployed.py), and the drift from the checkpoint
beside the base model's own drift in the same format."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lorawatch.analysis.deployed import DeployedResult, seed_results
from lorawatch.config import StatisticsSettings
from lorawatch.report import verdict_view
from lorawatch.report.study import StudyResults

DEPLOYED_CSV = "deployed.csv"
COLUMNS = ("model", "order", "run", "seed", "stage", "checkpoint", "format", "task", "n", "pytorch_accuracy",
           "deployed_accuracy", "difference", "ci_low", "ci_high", "regressed", "improved", "p_adjusted", "verdict",
           "identical", "kl_mean", "kl_reverse_mean", "kl_reverse_low", "kl_reverse_high", "same_top1",
           "base_kl_reverse_mean", "base_same_top1", "file_bytes", "tokens_per_second")
ACCURACY_HEADERS = ["checkpoint", "format", "task", "PyTorch", "deployed", "deployed − PyTorch", "flips", "p (adj.)",
                    "verdict", "identical outputs"]
DRIFT_HEADERS = ["checkpoint", "format", "KL(ckpt ‖ deployed)", "KL(deployed ‖ ckpt)", "same top-1",
                 "base model: KL, same top-1", "file", "tokens/s"]


def run_frame(run_dir: Path, seeds: list[int], settings: StatisticsSettings) -> pd.DataFrame:
    """One run's rows (COLUMNS; model and order left empty): the HTML run page's."""
    records = [{"run": run_dir.name, **row} for seed in seeds for result in seed_results(run_dir, seed, settings)
               for row in rows(result)]
    return pd.DataFrame(records, columns=list(COLUMNS))


def rows(result: DeployedResult) -> list[dict]:
    """One row per task of one deployed form (COLUMNS less model, order and run)."""
    record, base = result.record, result.base
    common = {"seed": result.seed, "stage": result.stage, "checkpoint": result.checkpoint, "format": result.format,
              "kl_mean": record.reference.kl_mean, "kl_reverse_mean": record.reference.kl_reverse_mean,
              "kl_reverse_low": result.kl_low, "kl_reverse_high": result.kl_high,
              "same_top1": record.reference.same_top1,
              "base_kl_reverse_mean": None if base is None else base.reference.kl_reverse_mean,
              "base_same_top1": None if base is None else base.reference.same_top1,
              "file_bytes": record.file_bytes, "tokens_per_second": record.tokens_per_second}
    return [{**common, "task": t.task, "n": t.n, "pytorch_accuracy": t.accuracy_before,
             "deployed_accuracy": t.accuracy_after, "difference": t.difference, "ci_low": t.ci_low,
             "ci_high": t.ci_high, "regressed": t.regressed, "improved": t.improved, "p_adjusted": t.p_adjusted,
             "verdict": t.verdict, "identical": record.identical.get(t.task)} for t in result.tasks]


def deployed_frame(study: StudyResults) -> pd.DataFrame:
    records = []
    for group in study.groups:
        settings = group.config.statistics
        for seed_result in group.per_seed:
            for result in seed_results(seed_result.run_dir, seed_result.seed, settings):
                records += [{"model": group.model, "order": group.order, "run": seed_result.run_dir.name, **row}
                            for row in rows(result)]
    return pd.DataFrame(records, columns=list(COLUMNS))


def _share(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.0%}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def accuracy_cells(row) -> list[str]:
    return [str(row["checkpoint"]), str(row["format"]), str(row["task"]), verdict_view.number(row["pytorch_accuracy"]),
            verdict_view.number(row["deployed_accuracy"]),
            verdict_view.with_interval(row["difference"], row["ci_low"], row["ci_high"], sign=True),
            f"↓{row['regressed']} ↑{row['improved']}", verdict_view.p_text(row["p_adjusted"]), str(row["verdict"]),
            _share(row["identical"])]


def drift_cells(row) -> list[str]:
    base = "— (the base model)" if pd.isna(row["base_kl_reverse_mean"]) else \
        f"{row['base_kl_reverse_mean']:.2e}, {row['base_same_top1']:.0%}"
    speed = row["tokens_per_second"]
    return [str(row["checkpoint"]), str(row["format"]),
            f"{row['kl_reverse_mean']:.2e} [{row['kl_reverse_low']:.2e}, {row['kl_reverse_high']:.2e}]",
            f"{row['kl_mean']:.2e}", f"{row['same_top1']:.0%}", base, _size(int(row["file_bytes"])),
            "—" if speed is None or pd.isna(speed) else f"{speed:.0f}"]


EXPLANATION = ("Each checkpoint as it ships: its adapter merged into the weights, converted to GGUF by llama.cpp's "
               "converter, quantized to each format and run by llama.cpp itself (`lorawatch deploy`), greedy on the "
               "prompts' own token ids. Accuracy on each task's test rows beside the PyTorch checkpoint's on the same "
               "rows: the difference with its paired bootstrap interval, the rows that flipped (↓ right → wrong, ↑ "
               "wrong → right), the exact McNemar p adjusted over the tasks and the verdict, as between two "
               "checkpoints; identical outputs: the share of rows whose generated tokens are the checkpoint's, token "
               "for token. Drift on the reference set at the answer position: KL(checkpoint ‖ deployed) (llama.cpp's "
               "`--kl-divergence` direction; the gate's `--max-deploy-kl`) with its bootstrap interval, the reverse, "
               "the share of rows with the same most likely token, and the base model's own drift in the same format "
               "beside it: a checkpoint whose drift is far above the base model's lost more to the format than the "
               "model it came from.")


def deployed_section(frame: pd.DataFrame) -> str:
    """report.md's section; empty when no run has deployed forms."""
    if frame.empty:
        return ""
    lines = ["## Deployed form (llama.cpp)", "", EXPLANATION + f" Every number is in [{DEPLOYED_CSV}]({DEPLOYED_CSV}).",
             ""]
    # dropna=False: a frame without model and order (run_frame's) keeps its rows rather than losing them silently
    for (model, order, run, seed), part in frame.groupby(["model", "order", "run", "seed"], sort=False, dropna=False):
        lines += [f"### {model} · {order} · {run} · seed {seed}", "",
                  "| " + " | ".join(ACCURACY_HEADERS) + " |", "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
        lines += ["| " + " | ".join(accuracy_cells(row)) + " |" for _, row in part.iterrows()]
        lines += ["", "| " + " | ".join(DRIFT_HEADERS) + " |", "|---|---|" + "---:|" * 6]
        forms = part.drop_duplicates(["stage", "format"])
        lines += ["| " + " | ".join(drift_cells(row)) + " |" for _, row in forms.iterrows()]
        lines.append("")
    return "\n".join(lines)
