"""Reference drift at the correct answer position vs the published code's position, for finished runs.

For every checkpoint of every run (its first seed, or all with --all-seeds) the saved adapter is loaded and the reference distribution
is read twice: at each row's own last prompt token (lorawatch's default) and at index
`attention_mask.sum(1) - 1` of left-padded batches of 4 in file order (the published code). Each is compared
with the base model read the same way. Written: positions.csv (per checkpoint, seed means), positions.md
(the table, the correlations with average accuracy and the failure-zone threshold under each reading).

    python study/positions.py RUN_DIR... --out docs/study/positions
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from peft import PeftModel

from lorawatch.rundir.layout import RunFolder
from lorawatch.models.loading import load_model
from lorawatch.recipe.protocol import encode, load_data
from lorawatch.report.statistics import correlation, fit_failure_threshold
from lorawatch.report.study import model_display_name, order_label
from lorawatch.engine.drift import answer_logprobs, per_example_drift, summarize
from lorawatch.report.tables import load_run_config

POSITIONS = ("answer", "published")


def run_positions(run_dir: Path, all_seeds: bool) -> list[dict]:
    config = load_run_config(run_dir)
    data = load_data(config)
    loaded = load_model(config.model.spec, device=config.model.device, dtype=config.model.dtype)
    encoded = encode(data, loaded.tokenizer, config.train.max_length)
    ids = [e.id for e in data.reference]
    tasks = [e.task for e in data.reference]
    pad = loaded.tokenizer.pad_token_id

    def read(model) -> dict[str, object]:
        return {p: answer_logprobs(model, encoded.reference, pad_id=pad, device=loaded.info.device, position=p)[1]
                for p in POSITIONS}

    base = read(loaded.model)
    base_stats = {p: summarize(per_example_drift(ids, tasks, base[p], base[p])) for p in POSITIONS}
    rows = []
    model = loaded.model
    for seed in config.seeds if all_seeds else config.seeds[:1]:
        for stage in range(len(data.tasks) + 1):
            folder = RunFolder(run_dir).stage(seed, stage)
            scores = folder.scores.load().accuracy()
            if stage == 0:
                current = base
            else:
                peft = PeftModel.from_pretrained(model, folder.adapter).eval()
                current = read(peft)
                model = peft.unload()
            row = {"model": model_display_name(config.model.spec), "order": order_label(config), "seed": seed,
                   "step": stage, "checkpoint": "base" if stage == 0 else data.tasks[stage - 1].name,
                   "avg_accuracy": float(np.mean([scores[t.name] for t in data.tasks]))}
            for p in POSITIONS:
                stats = summarize(per_example_drift(ids, tasks, current[p], base[p]))
                row[f"kl_{p}"] = stats["kl_mean"]
                row[f"entropy_delta_{p}"] = stats["entropy_mean"] - base_stats[p]["entropy_mean"]
                row[f"margin_delta_{p}"] = stats["margin_mean"] - base_stats[p]["margin_mean"]
            rows.append(row)
            print(f"positions: {run_dir.name} seed {seed} step {stage}: KL answer {row['kl_answer']:.4f}, "
                  f"published {row['kl_published']:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--all-seeds", action="store_true", help="every seed of each run (default: the first)")
    args = parser.parse_args()
    per_seed = pd.DataFrame([row for run in args.run_dirs for row in run_positions(run, args.all_seeds)])
    keys = ["model", "order", "step", "checkpoint"]
    table = per_seed.groupby(keys, sort=False).mean(numeric_only=True).drop(columns="seed").reset_index()
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed.to_csv(args.out / "positions_per_seed.csv", index=False, float_format="%.6g")
    table.to_csv(args.out / "positions.csv", index=False, float_format="%.6g")

    lines = ["# Reference drift: the answer position vs the published code's position", "",
             "Means over the seeds read (the first seed of each run unless `--all-seeds`). `answer`: each row's own last prompt token (lorawatch's default). `published`: index "
             "`attention_mask.sum(1) - 1` of left-padded batches of 4 in file order, a token inside the prompt for "
             "every row shorter than the longest of its batch.", "",
             "| Model | Order | Step | Checkpoint | Avg acc | KL (answer) | KL (published) | Δ entropy (answer) | "
             "Δ entropy (published) | Δ margin (answer) | Δ margin (published) |", "|---" * 11 + "|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['model']} | {r['order']} | {r['step']} | {r['checkpoint']} | {r['avg_accuracy']:.3f} | "
                     f"{r['kl_answer']:.4f} | {r['kl_published']:.4f} | {r['entropy_delta_answer']:+.4f} | "
                     f"{r['entropy_delta_published']:+.4f} | {r['margin_delta_answer']:+.4f} | "
                     f"{r['margin_delta_published']:+.4f} |")
    lines += ["", "Over the trained checkpoints (step ≥ 1), KL to base against average accuracy:", "",
              "| Reading | Pearson r (p) | Spearman r (p) | Failure-zone threshold (balanced acc.) |", "|---|---|---|---|"]
    trained = table[table["step"] > 0].copy()
    base_acc = table[table["step"] == 0].set_index(["model", "order"])["avg_accuracy"]
    failed = [r["avg_accuracy"] < base_acc[(r["model"], r["order"])] for _, r in trained.iterrows()]
    for p in POSITIONS:
        points = pd.DataFrame({"kl_to_base": trained[f"kl_{p}"], "avg_accuracy": trained["avg_accuracy"]})
        corr = correlation(points)
        zone = fit_failure_threshold(points["kl_to_base"], failed)

        def fmt(entry):
            return "n/a" if entry["r"] is None else f"{entry['r']:.3f} ({entry['p']:.3g})"

        threshold = "none (" + zone.get("reason", "") + ")" if zone["threshold"] is None else \
            f"{zone['threshold']:.4g} ({zone['balanced_accuracy']:.3f})"
        lines.append(f"| {p} | {fmt(corr['pearson'])} | {fmt(corr['spearman'])} | {threshold} |")
    (args.out / "positions.md").write_text("\n".join(lines) + "\n")
    print(args.out / "positions.md")


if __name__ == "__main__":
    main()
