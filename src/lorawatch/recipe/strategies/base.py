"""What every strategy shares: the stage plan it gives the protocol, and the plain protocol (`none`) itself.

A strategy acts on a stage in three places, and only there: the rows the stage trains on, a term added to its
loss, and state it keeps in the stage's folder for later stages (so that a resumed run computes the same thing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors.torch import load_file, save

from lorawatch.rundir import atomic
from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.rundir.layout import Stage
from lorawatch.rundir.schema import StrategyLog
from lorawatch.rundir.store import DAMAGED
from lorawatch.recipe.strategies.registry import StrategyConfig, register
from lorawatch.recipe.training import ExtraLoss, training_seed


def read_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """What a stage kept for later stages, or None when it is missing or damaged (then the stage is redone)."""
    try:
        return load_file(path)
    except DAMAGED:
        return None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic.write_bytes(path, save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}))


class TimedTerm:
    """An added loss term that keeps the time spent computing it: its cost per step is part of what a strategy is
    compared on. Only the forward computation is timed; its backward runs inside the loss's one backward pass."""

    def __init__(self, term: ExtraLoss):
        self.term = term
        self.seconds = 0.0

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], predicts: torch.Tensor,
                 logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        value = self.term(model, inputs, predicts, logits)
        self.seconds += time.perf_counter() - start
        return value


@dataclass
class StagePlan:
    """How one stage trains under a strategy."""

    stage: int
    run_seed: int
    earlier: list[Stage]  # stages 0 .. stage-1, with what each kept for later stages
    rows: list[EncodedTrainExample]
    extra_loss: TimedTerm | None = None
    record: dict = field(default_factory=dict)  # for the stage's training log (schema.StrategyLog)
    carry: dict = field(default_factory=dict)  # what the strategy needs again when the stage is finished

    @property
    def seed(self) -> int:
        """The stage's training seed."""
        return training_seed(self.run_seed, self.stage)

    @property
    def previous(self) -> Stage:
        return self.earlier[-1]


class Strategy:
    """The plain protocol (`none`): each stage trains on its own task's rows with the task loss alone. Subclasses
    change one part of that. `train_rows` holds every task's encoded training rows in training order."""

    name = "none"

    def __init__(self, train_rows: dict[str, Sequence[EncodedTrainExample]]):
        self.train_rows = train_rows
        self.tasks = list(train_rows)

    def task_rows(self, stage: int) -> list[EncodedTrainExample]:
        return list(self.train_rows[self.tasks[stage - 1]])

    def plan(self, model: torch.nn.Module, stage: int, run_seed: int, earlier: list[Stage]) -> StagePlan:
        """Stage `stage`'s plan; `earlier` are the stages before it (0 .. stage-1)."""
        return StagePlan(stage=stage, run_seed=run_seed, earlier=earlier, rows=self.task_rows(stage))

    def finish(self, model: torch.nn.Module, plan: StagePlan, steps: int, folder: Stage) -> StrategyLog | None:
        """After the stage trained (`steps` optimizer steps): keep what later stages need in `folder`; the record
        for the stage's training log, None for `none` (whose training.json is the plain protocol's)."""
        if self.name == "none":
            return None
        record = {"name": self.name, **plan.record}
        if plan.extra_loss is not None:
            record["loss_seconds"] = round(plan.extra_loss.seconds, 3)
            record["loss_seconds_per_step"] = round(plan.extra_loss.seconds / max(steps, 1), 6)
        return StrategyLog.model_validate(record)

    def intact(self, folder: Stage, stage: int) -> bool:
        """Whether what stage `stage` kept for later stages is in `folder` and readable (else the stage is redone)."""
        return True


class NoneConfig(StrategyConfig):
    """`none`: one cumulative adapter trained on the task loss alone, as the paper."""
    name: Literal["none"] = "none"


@register(NoneConfig)
def build_none(config: NoneConfig, train_rows: dict[str, Sequence[EncodedTrainExample]], *, pad_id: int,
               device: str) -> Strategy:
    return Strategy(train_rows)
