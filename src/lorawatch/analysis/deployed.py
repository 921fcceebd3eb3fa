"""The deployed forms of a run against the PyTorch checkpoints they were made from, from the run folder alone
(deploy/deployed.py wrote them): what the report, the HTML page, the gate and `lorawatch deploy` print.

For each seed, stage and format:
    tasks   each task's accuracy under PyTorch (the run's stored predictions) and under llama.cpp, on the same test
            rows: paired (exact McNemar, paired bootstrap interval of deployed − PyTorch), the tasks' p-values
            adjusted together, a verdict at the run's alpha (verdicts.task_comparisons: the same statistics as
            between two checkpoints)
    drift   KL both ways and same top-1 on the reference set (deployed.json), with a bootstrap interval of the
            mean KL(checkpoint ‖ deployed)
    base    stage 0 in the same format against the PyTorch base model: the base model's own deployment drift, so
            that a checkpoint's is read against what the format does to a model that was never fine-tuned
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorawatch.analysis import significance
from lorawatch.analysis.verdicts import task_comparisons
from lorawatch.config import StatisticsSettings
from lorawatch.errors import UserError
from lorawatch.rundir import schema
from lorawatch.rundir.layout import RunFolder


@dataclass(frozen=True)
class DeployedResult:
    seed: int
    stage: int
    checkpoint: str
    format: str
    record: schema.DeployedRecord
    tasks: list[schema.TaskComparison]  # before: the PyTorch checkpoint; after: the deployed form
    kl_low: float  # interval of the mean KL(checkpoint || deployed) over the reference rows
    kl_high: float
    base: schema.DeployedRecord | None  # stage 0 in the same format; None for stage 0 itself

    def regressed(self) -> list[schema.TaskComparison]:
        return [t for t in self.tasks if t.verdict == significance.REGRESSED]


def seed_results(run_dir: Path, seed: int, settings: StatisticsSettings,
                 stage: int | None = None) -> list[DeployedResult]:
    """Every finished deployed form of one seed (of one stage, when given), stage by stage, formats in name order."""
    seed_folder = RunFolder(run_dir).seed(seed)
    stages = seed_folder.stages_on_disk() if stage is None else [stage]
    results = []
    for k in stages:
        for fmt in seed_folder.stage(k).deployed_formats():
            results.append(form_result(run_dir, seed, k, fmt, settings))
    return results


def form_result(run_dir: Path, seed: int, k: int, fmt: str, settings: StatisticsSettings) -> DeployedResult:
    stage = RunFolder(run_dir).stage(seed, k)
    form = stage.deployed(fmt)
    record = form.record.load()
    names = [t for t in record.accuracy if t != "reference"]
    paired = []
    for task in names:
        ours = {p.id: p.correct for p in stage.predictions(task).load()}
        deployed = form.predictions(task).load()
        if {p.id for p in deployed} != set(ours):
            raise UserError(f"{form.predictions(task).path}: its rows are not the checkpoint's "
                            f"({stage.predictions(task).path})")
        paired.append(significance.paired([ours[p.id] for p in deployed], [p.correct for p in deployed], settings))
    kl = np.array([row.kl_reverse for row in form.drift.load()])
    low, high = significance.mean_interval(kl, settings)
    base = None
    if k > 0 and RunFolder(run_dir).stage(seed, 0).deployed(fmt).finished():
        base = RunFolder(run_dir).stage(seed, 0).deployed(fmt).record.load()
    return DeployedResult(seed=seed, stage=k, checkpoint=record.checkpoint, format=fmt, record=record,
                          tasks=task_comparisons(names, paired, settings), kl_low=low, kl_high=high, base=base)
