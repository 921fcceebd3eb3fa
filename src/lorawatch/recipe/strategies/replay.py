"""Replay: each stage also trains on a seeded sample of every earlier task's training rows.

The sample is drawn anew for each stage, from the stage's training seed, and recorded per stage (rows per earlier
task and the seed), so a stage's rows can be rebuilt from its training log.
"""

from __future__ import annotations

from typing import Literal, Sequence, TypeVar

import torch
from pydantic import Field, model_validator

from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.recipe.strategies.base import StagePlan, Strategy
from lorawatch.recipe.strategies.registry import StrategyConfig, register
from lorawatch.rundir.layout import Stage

Row = TypeVar("Row")


class ReplayConfig(StrategyConfig):
    """Exactly one of `fraction` or `count`."""
    name: Literal["replay"] = "replay"
    fraction: float | None = Field(None, gt=0, le=1, description="share of each earlier task's training rows "
                                                                 "mixed into every later stage")
    count: int | None = Field(None, gt=0, description="rows of each earlier task mixed into every later stage "
                                                      "(all of them if it has fewer)")

    @model_validator(mode="after")
    def _one_size(self) -> "ReplayConfig":
        if (self.fraction is None) == (self.count is None):
            raise ValueError("strategy 'replay' needs exactly one of 'fraction' or 'count'")
        return self


def replay_rows(earlier: dict[str, Sequence[Row]], *, seed: int, fraction: float | None = None,
                count: int | None = None) -> tuple[list[Row], dict[str, int]]:
    """A sample of each earlier task's rows, `fraction` of them (at least one) or `count` (all if fewer), in task
    order; and how many came from each task."""
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    generator = torch.Generator().manual_seed(seed)
    picked: list[Row] = []
    taken: dict[str, int] = {}
    for task, rows in earlier.items():
        n = min(count, len(rows)) if count is not None else max(1, round(fraction * len(rows)))
        # Every task's permutation is drawn, so a task's sample does not depend on how many rows the others gave.
        order = torch.randperm(len(rows), generator=generator)[:n].tolist()
        picked.extend(rows[i] for i in sorted(order))
        taken[task] = n
    return picked, taken


class Replay(Strategy):
    name = "replay"

    def __init__(self, train_rows, *, fraction: float | None, count: int | None):
        super().__init__(train_rows)
        self.fraction, self.count = fraction, count

    def plan(self, model, stage: int, run_seed: int, earlier: list[Stage]) -> StagePlan:
        plan = super().plan(model, stage, run_seed, earlier)
        tasks = {task: self.train_rows[task] for task in self.tasks[:stage - 1]}
        extra, taken = replay_rows(tasks, seed=plan.seed, fraction=self.fraction, count=self.count)
        plan.rows += extra  # after the stage's own rows: training shuffles them together
        plan.record["replay"] = {"seed": plan.seed, "rows": taken}
        return plan


@register(ReplayConfig)
def build_replay(config: ReplayConfig, train_rows: dict[str, Sequence[EncodedTrainExample]], *, pad_id: int,
                 device: str) -> Replay:
    return Replay(train_rows, fraction=config.fraction, count=config.count)
