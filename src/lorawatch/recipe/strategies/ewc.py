"""EWC on the LoRA parameters: the loss gains weight/2 x sum_i F_i (theta_i - theta*_i)^2.

F is the diagonal empirical Fisher: the mean squared gradient of one row's mean answer-token loss, over at most
`fisher_rows` training rows of a task (a seeded sample), estimated right after the task's stage and summed over the
tasks learned so far. theta* is the adapter as the previous stage left it. Summing the Fishers with one anchor is
online EWC without decay (Schwarz et al., 2018), which with one cumulative adapter is the natural form: every earlier
task's optimum is the adapter it left, carried forward.

Each stage's summed Fisher is saved beside its adapter (Stage.ewc_fisher), and the next stage reads it from there, so a
resumed run uses the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import time
from typing import Literal, Sequence

import torch
from pydantic import Field, model_validator

from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.recipe.strategies.base import StagePlan, Strategy, TimedTerm, read_tensors, write_tensors
from lorawatch.recipe.strategies.registry import StrategyConfig, register
from lorawatch.recipe.training import _collate, answer_loss
from lorawatch.rundir.layout import Stage
from lorawatch.rundir.schema import StrategyLog


class EWCConfig(StrategyConfig):
    name: Literal["ewc"] = "ewc"
    # The Fisher's scale depends on the model: no default lambda.
    weight: float | None = Field(None, gt=0, description="lambda, the penalty's weight")
    fisher_rows: int = Field(64, gt=0, description="training rows the Fisher is estimated on")

    @model_validator(mode="after")
    def _needs_a_weight(self) -> "EWCConfig":
        if self.weight is None:
            raise ValueError("strategy 'ewc' needs 'weight' (lambda, the penalty's weight)")
        return self


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model: torch.nn.Module, rows: Sequence[EncodedTrainExample], *, pad_id: int,
                    device: str) -> dict[str, torch.Tensor]:
    """The mean over `rows` of each trainable parameter's squared gradient of the row's mean answer-token loss.
    Computed without dropout, one row at a time (a batch's gradient would square the sum, not sum the squares)."""
    params = trainable_parameters(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    used = 0
    for row in rows:
        loss_sum, predicts, _ = answer_loss(model, _collate([row], pad_id, device))
        tokens = int(predicts.sum())
        if tokens == 0:
            continue  # the answer was truncated away: this row says nothing about the task
        model.zero_grad(set_to_none=True)
        (loss_sum / tokens).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.float() ** 2
        used += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {name: f / max(used, 1) for name, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                weight: float) -> torch.Tensor:
    """weight/2 x sum F (theta - theta*)^2 over the parameters the Fisher covers."""
    total = sum((fisher[name] * (params[name].float() - anchor[name]) ** 2).sum() for name in fisher)
    return 0.5 * weight * total


def _earlier_fisher(previous: Stage) -> dict[str, torch.Tensor]:
    fisher = read_tensors(previous.ewc_fisher)
    if fisher is None:  # the protocol redoes a stage whose Fisher is not intact() before it trains the next one
        raise RuntimeError(f"{previous.ewc_fisher}: missing or damaged, yet the stage after it is being trained")
    return fisher


class EWC(Strategy):
    name = "ewc"

    def __init__(self, train_rows, *, weight: float, fisher_rows: int, pad_id: int, device: str):
        super().__init__(train_rows)
        self.weight, self.fisher_rows, self.pad_id, self.device = weight, fisher_rows, pad_id, device

    def plan(self, model, stage: int, run_seed: int, earlier: list[Stage]) -> StagePlan:
        plan = super().plan(model, stage, run_seed, earlier)
        if stage == 1:
            return plan  # nothing learned yet to hold on to
        fisher = _earlier_fisher(plan.previous)
        params = trainable_parameters(model)
        fisher = {name: f.to(self.device) for name, f in fisher.items()}
        anchor = {name: p.detach().float().clone() for name, p in params.items()}
        weight = self.weight

        def term(model, inputs, predicts, logits) -> torch.Tensor:
            # Per answer token, so that a full accumulation window adds the penalty once (see training.ExtraLoss).
            return ewc_penalty(params, fisher, anchor, weight) * predicts.sum()

        plan.extra_loss = TimedTerm(term)
        return plan

    def finish(self, model, plan: StagePlan, steps: int, folder: Stage) -> StrategyLog | None:
        record = super().finish(model, plan, steps, folder)
        if plan.stage == len(self.tasks):
            return record  # no later stage to protect this task from
        started = time.perf_counter()
        rows = plan.rows
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(plan.seed))[:self.fisher_rows]
        sample = [rows[i] for i in sorted(order.tolist())]
        fisher = diagonal_fisher(model, sample, pad_id=self.pad_id, device=self.device)
        if plan.stage > 1:  # summed over the tasks learned so far
            earlier = _earlier_fisher(plan.previous)
            fisher = {name: f + earlier[name].to(f.device) for name, f in fisher.items()}
        write_tensors(folder.ewc_fisher, fisher)
        record.fisher_rows, record.fisher_seconds = len(sample), round(time.perf_counter() - started, 3)
        return record

    def intact(self, folder: Stage, stage: int) -> bool:
        return stage == len(self.tasks) or read_tensors(folder.ewc_fisher) is not None


@register(EWCConfig)
def build_ewc(config: EWCConfig, train_rows: dict[str, Sequence[EncodedTrainExample]], *, pad_id: int,
              device: str) -> EWC:
    return EWC(train_rows, weight=config.weight, fisher_rows=config.fisher_rows, pad_id=pad_id, device=device)
