"""Strategies against forgetting and drift in sequential LoRA fine-tuning (config section `strategy`).

`none` is the plain protocol (one cumulative adapter, the task loss alone). Each other strategy is one module:
replay (earlier tasks' rows mixed in), kl_anchor (KL to the base model added to the loss), ewc (a Fisher-weighted
pull towards the previous adapter), merging (one adapter per task; each checkpoint merges the adapters so far),
olora (one adapter per task in a subspace orthogonal to the earlier ones; the checkpoint sums them).
Each module declares its settings (a config class) beside its code and registers its builder (registry.py); the
config's `strategy` section is the union of the registered classes. The protocol asks a strategy for a stage's plan (its rows and any added loss term), then lets it finish the stage
(keep its state beside the adapter, return what the training log records).
"""

from __future__ import annotations

from typing import Sequence

from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.recipe.strategies.base import StagePlan, Strategy, TimedTerm
from lorawatch.recipe.strategies.registry import STRATEGIES, StrategyConfig, config_union

# Imported for their registration, in the order config.json lists their settings (registry.setting_names).
from lorawatch.recipe.strategies import replay, kl_anchor, ewc, merging, olora  # noqa: E402,F401  isort: skip

__all__ = ["STRATEGIES", "StagePlan", "Strategy", "StrategyConfig", "StrategySettings", "TimedTerm", "build_strategy"]

# The config's `strategy` section: one of the registered strategies' configs, by `name`.
StrategySettings = config_union()


def build_strategy(settings: StrategyConfig, train_rows: dict[str, Sequence[EncodedTrainExample]], *,
                   pad_id: int, device: str) -> Strategy:
    """The strategy `settings` configures, over every task's encoded training rows in training order."""
    return STRATEGIES[settings.name].build(settings, train_rows, pad_id=pad_id, device=device)
