"""report.md's "Is it real?" sections, from the predictions every run folder keeps.

    verdicts   each group's trained checkpoints against the previous one and the base, per seed (the seeds'
               statistics.json, as `lorawatch show` and `gate` read them), its regressions and what its test sizes
               can show
    settings   within each model and task order, every group that differs in a setting (a strategy, a monitor, a
               learning rate) against the baseline group (study.setting_pairs), seed by seed on the seeds both
               have: the final checkpoints on the same rows, with the same statistics as `lorawatch compare`
               (run_comparison.py); every number also in paired.csv, for documents that quote them
"""

from __future__ import annotations

import pandas as pd

from lorawatch.report import run_comparison, verdict_view
from lorawatch.rundir import schema
from lorawatch.rundir.layout import STATISTICS
from lorawatch.report.study import Group, StudyResults, setting_pairs
from lorawatch.analysis.verdicts import load_seed_statistics

PAIRED_CSV = "paired.csv"
PAIRED_COLUMNS = ("spec", "order", "baseline", "run", *run_comparison.CSV_COLUMNS)


def group_records(group: Group) -> dict[int, schema.StatisticsRecord]:
    """Each seed's statistics with the group's settings (computed from the predictions when they differ)."""
    return {s.seed: load_seed_statistics(s.run_dir, s.seed, group.config.statistics) for s in group.per_seed}


def verdicts_section(study: StudyResults) -> str:
    lines = ["## Is it real?", "",
             "Per group and seed, every trained checkpoint against the previous one and the base model on the same "
             "test rows: Δ accuracy with its paired bootstrap interval, flips (↓ right→wrong, ↑ wrong→right), exact "
             "McNemar p adjusted over the tasks and the verdict; the same numbers as `lorawatch show` and "
             f"`lorawatch gate` (each seed's {STATISTICS}).", ""]
    for group in study.groups:
        records = group_records(group)
        regressions = verdict_view.regression_lines(records)
        lines += [f"### {group.label}", "", verdict_view.verdicts_markdown(records), "", "Regressions:"]
        lines += [f"- {line}" for line in regressions] or ["- none detected (no task of any trained checkpoint is "
                                                           "worse than the previous checkpoint or the base beyond "
                                                           "chance)"]
        lines += ["", "What the test sizes can show:"]
        lines += [f"- {line}" for line in verdict_view.detectable_lines(records[group.seeds[0]])] + [""]
    return "\n".join(lines)


def setting_comparisons(study: StudyResults) -> list[tuple[Group, Group, run_comparison.RunComparison]]:
    """(baseline, group, their comparison) for every group that differs in a setting from its baseline group."""
    out = []
    for baseline, group in setting_pairs(study):
        ours = {s.seed: s.run_dir for s in baseline.per_seed}
        theirs = {s.seed: s.run_dir for s in group.per_seed}
        common = [seed for seed in ours if seed in theirs]
        comparison = run_comparison.compare_runs_paired(
            baseline.model, group.model, {seed: (ours[seed], theirs[seed]) for seed in common},
            baseline.config.statistics, baseline_only=[s for s in ours if s not in theirs],
            run_only=[s for s in theirs if s not in ours])
        out.append((baseline, group, comparison))
    return out


def settings_section(comparisons: list[tuple[Group, Group, run_comparison.RunComparison]]) -> str:
    lines = ["## Settings against a baseline, on the same rows", "",
             "Within each model and task order, every group that differs in a setting against the baseline group "
             "(strategy `none` and no monitor, else the first given), seed by seed on the seeds both have: the final "
             "checkpoints on the same test rows (matched by example id). Δ = group − baseline with its paired "
             "bootstrap interval (the final average accuracy resamples test rows within each task, the final KL to "
             "base the reference rows, the same resample for both); flips ↓ right→wrong, ↑ wrong→right; NFR the "
             "negative flip rate; exact McNemar p adjusted over the tasks; means over seeds with a Student t "
             f"interval. The same statistics as `lorawatch compare`; every number is in [{PAIRED_CSV}]({PAIRED_CSV}).",
             ""]
    if not comparisons:
        return "\n".join(lines + ["No model and task order has groups that differ in a setting: nothing to compare.",
                                  ""])
    for baseline, group, comparison in comparisons:
        lines += [f"### {group.model} against {baseline.model} · {group.order}", "",
                  run_comparison.markdown(comparison, names=("baseline", "group")), ""]
    return "\n".join(lines)


def paired_frame(comparisons: list[tuple[Group, Group, run_comparison.RunComparison]]) -> pd.DataFrame:
    """paired.csv: one row per seed and task, per seed the final average accuracy and KL, and the means over
    seeds (seed empty), of every comparison."""
    rows = [{"spec": group.spec, "order": group.order, "baseline": c.baseline, "run": c.run, **row}
            for _, group, c in comparisons for row in run_comparison.csv_rows(c)]
    frame = pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))
    for column in ("seed", "n", "regressed", "improved"):  # counts with empty cells: not 1.0 but 1
        frame[column] = frame[column].astype("Int64")
    return frame
