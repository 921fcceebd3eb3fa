"""The numbers docs/study/README.md quotes, read from the report `lorawatch report` wrote (and positions.py's table),
so that every number in the text is one the report computed.

    python study/summarize.py docs/study
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

SHORT = {"smollm2-135m-instruct": "SmolLM2", "gemma3-270m": "Gemma"}


def signed(value: float, digits: int = 3) -> str:
    return "—" if pd.isna(value) else f"{value:+.{digits}f}".replace("-", "−")


def plain(value: float, digits: int = 3) -> str:
    return "—" if pd.isna(value) else f"{value:.{digits}f}".replace("-", "−")


def with_std(mean: float, std: float, fmt=plain) -> str:
    if pd.isna(mean):
        return "—"
    return fmt(mean) if pd.isna(std) or round(std, 3) == 0 else f"{fmt(mean)} ± {plain(std)}"


def results_table(report: Path) -> str:
    t3, t4, t5 = (pd.read_csv(report / f"table{n}.csv") for n in (3, 4, 5))
    rows = ["| Model | Order | Step | Learned | After learning | Avg accuracy | BWT | KL to base | Δ entropy | Δ margin |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (_, a), (_, b), (_, c) in zip(t3.iterrows(), t4.iterrows(), t5.iterrows()):
        rows.append(f"| {SHORT.get(a['model'], a['model'])} | {a['order']} | {a['step']} | {a['checkpoint']} | "
                    f"{with_std(a['after_learning'], a['after_learning_std'])} | "
                    f"{with_std(a['avg_accuracy'], a['avg_accuracy_std'])} | "
                    f"{with_std(b['bwt'], b['bwt_std'], signed)} | {with_std(c['kl_to_base'], c['kl_to_base_std'])} | "
                    f"{signed(c['entropy_delta'])} | {signed(c['margin_delta'])} |")
    return "\n".join(rows)


def base_lines(report: Path) -> str:
    curves = pd.read_csv(report / "figure2.csv")
    lines = []
    for model, group in curves[curves["step"] == 0].groupby("model", sort=False):
        lines.append(f"- **{SHORT.get(model, model)}** base average accuracy {plain(group['avg_accuracy'].iloc[0])}")
    return "\n".join(lines)


def statistics(report: Path) -> str:
    corr = json.loads((report / "correlation.json").read_text())

    def line(label: str, entries: dict) -> str:
        parts = [f"{name} {plain(entries[name]['r'])} (p = {entries[name]['p']:.2g})" if entries[name]["r"] is not None
                 else f"{name} not computed" for name in ("pearson", "spearman")]
        return f"- {label}, {entries['n']} checkpoints: " + ", ".join(parts)

    zone = corr["failure_zone"]
    out = [line("pooled", corr)] + [line(SHORT.get(m, m), e) for m, e in corr["per_model"].items()]
    out.append("- failure zone: "
               + (f"threshold KL > {zone['threshold']:.4g}" if zone["threshold"] is not None else zone["reason"]))
    return "\n".join(out)


def positions_table(positions: Path) -> str:
    frame = pd.read_csv(positions / "positions.csv")
    rows = ["| Model | Order | Checkpoint | KL answer / published | Δ entropy answer / published | "
            "Δ margin answer / published |", "|---|---|---|---|---|---|"]
    for _, r in frame[frame["step"] > 0].iterrows():
        rows.append(f"| {SHORT.get(r['model'], r['model'])} | {r['order']} | after {r['checkpoint']} | "
                    f"{r['kl_answer']:.4f} / {r['kl_published']:.4f} | {signed(r['entropy_delta_answer'])} / "
                    f"{signed(r['entropy_delta_published'])} | {signed(r['margin_delta_answer'])} / "
                    f"{signed(r['margin_delta_published'])} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    args = parser.parse_args()
    print("## Results\n\n" + results_table(args.report) + "\n\n## Base\n\n" + base_lines(args.report)
          + "\n\n## Statistics\n\n" + statistics(args.report))
    if (args.report / "positions" / "positions.csv").is_file():
        print("\n## Positions\n\n" + positions_table(args.report / "positions"))


if __name__ == "__main__":
    main()
