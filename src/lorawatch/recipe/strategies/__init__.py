"""Strategies against forgetting and drift in sequential LoRA fine-tuning (config section `strategy`).

`none` is the plain protocol (one cumulative adapter, the task loss alone). Each other strategy is one module:
replay (earlier tasks' rows mixed in), kl_anchor (KL to the base model added to the loss), ewc (a Fisher-weighted
pull towards the previous adapter), merging (one adapter per task; each checkpoint merges the adapters so far),
olora (one adapter per task in a subspace orthogonal to the earlier ones; the checkpoint sums them).
The protocol asks a strategy for a stage's plan (its rows and any added loss term), then lets it finish the stage
(keep its state beside the adapter, return what the training log records).
"""

from __future__ import annotations

from typing import Sequence

from lorawatch.config import StrategySettings
from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.recipe.strategies.base import StagePlan, Strategy, TimedTerm
from lorawatch.recipe.strategies.ewc import EWC
from lorawatch.recipe.strategies.kl_anchor import KLAnchor
from lorawatch.recipe.strategies.merging import Merge
from lorawatch.recipe.strategies.olora import OLoRA
from lorawatch.recipe.strategies.replay import Replay

__all__ = ["StagePlan", "Strategy", "TimedTerm", "build_strategy"]


def build_strategy(settings: StrategySettings, train_rows: dict[str, Sequence[EncodedTrainExample]], *,
                   pad_id: int, device: str) -> Strategy:
    """The strategy `settings` names, over every task's encoded training rows in training order."""
    if settings.name == "none":
        return Strategy(train_rows)
    if settings.name == "replay":
        return Replay(train_rows, fraction=settings.fraction, count=settings.count)
    if settings.name == "kl_anchor":
        return KLAnchor(train_rows, weight=settings.weight)
    if settings.name == "ewc":
        return EWC(train_rows, weight=settings.weight, fisher_rows=settings.fisher_rows, pad_id=pad_id, device=device)
    if settings.name == "merge":
        return Merge(train_rows, method=settings.method, density=settings.density)
    if settings.name == "olora":
        return OLoRA(train_rows, lambda_orth=settings.lambda_orth, lambda_l2=settings.lambda_l2)
    raise ValueError(f"unknown strategy '{settings.name}'")
