"""O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning"): each task
learns a new LoRA (A_t, B_t) while the earlier tasks' adapters stay frozen, and the checkpoint is the base plus all
of them (their updates add up). The loss gains

    lambda_orth x sum over layers, i < t of sum |A_i A_t^T|   +   lambda_l2 x sum over layers of ||A_t||^2 + ||B_t||^2

In PEFT's layout A is r x d (its rows span the update's input subspace), so A_i A_t^T is the r x r overlap of two
subspaces, zero when they are orthogonal. The entries' absolute values are summed, as the authors' code does (the
paper writes squares). The L2 term is the squared norm of the new adapter's weights; the authors' code sums their
unsquared norms, and sets lambda_2 = 0 in its scripts.

The task's adapter is the model's own (trained, saved and loaded by the protocol as in any run); before stage t the
adapters of stages 1..t-1 are loaded from their folders beside it, frozen, and the own adapter starts afresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, Sequence

import torch
from pydantic import Field

from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.recipe.strategies.adapters import ADAPTER, activate_with, add_frozen_adapter, reset_adapter
from lorawatch.recipe.strategies.base import StagePlan, Strategy, TimedTerm
from lorawatch.recipe.strategies.registry import StrategyConfig, register
from lorawatch.recipe.training import use_gap_dropout
from lorawatch.rundir.layout import Stage

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer


class OLoRAConfig(StrategyConfig):
    name: Literal["olora"] = "olora"
    one_adapter_per_task: ClassVar[bool] = True
    # lambda_1, lambda_2 of the O-LoRA authors' scripts
    lambda_orth: float = Field(0.5, ge=0, description="weight of the orthogonality penalty")
    lambda_l2: float = Field(0.0, ge=0, description="weight of the new adapter's L2 penalty")


def task_adapter_name(stage: int) -> str:
    return f"task-{stage}"


def olora_penalty(layers: list[LoraLayer], earlier: list[str], *, lambda_orth: float,
                  lambda_l2: float) -> torch.Tensor:
    """The O-LoRA terms for the model's own adapter against the `earlier` adapters of each LoRA layer."""
    orth = sum((layer.lora_A[name].weight @ layer.lora_A[ADAPTER].weight.T).abs().sum()
               for layer in layers for name in earlier)
    l2 = sum(layer.lora_A[ADAPTER].weight.pow(2).sum() + layer.lora_B[ADAPTER].weight.pow(2).sum()
             for layer in layers)
    return lambda_orth * orth + lambda_l2 * l2


class OLoRA(Strategy):
    name = "olora"

    def __init__(self, train_rows, *, lambda_orth: float, lambda_l2: float):
        super().__init__(train_rows)
        self.lambda_orth, self.lambda_l2 = lambda_orth, lambda_l2

    def plan(self, model, stage: int, run_seed: int, earlier: list[Stage]) -> StagePlan:
        from peft.tuners.lora import LoraLayer  # (adapters.py says why here)

        plan = super().plan(model, stage, run_seed, earlier)
        frozen = [task_adapter_name(k) for k in range(1, stage)]
        for k, name in enumerate(frozen, start=1):
            if name not in model.peft_config:  # added by an earlier stage of this seed, or loaded here on resume
                add_frozen_adapter(model, name, earlier[k].adapter)
        reset_adapter(model, plan.seed)  # a new subspace: the task's adapter starts afresh
        activate_with(model, frozen)
        use_gap_dropout(model)  # the frozen adapters' dropout too (see training.GapDropout)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
        lambda_orth, lambda_l2 = self.lambda_orth, self.lambda_l2

        def term(model, inputs, predicts, logits) -> torch.Tensor:
            # Per answer token, so that a full accumulation window adds the penalty once (see training.ExtraLoss).
            return olora_penalty(layers, frozen, lambda_orth=lambda_orth, lambda_l2=lambda_l2) * predicts.sum()

        if frozen or lambda_l2 > 0:
            plan.extra_loss = TimedTerm(term)
        return plan


@register(OLoRAConfig)
def build_olora(config: OLoRAConfig, train_rows: dict[str, Sequence[EncodedTrainExample]], *, pad_id: int,
                device: str) -> OLoRA:
    return OLoRA(train_rows, lambda_orth=config.lambda_orth, lambda_l2=config.lambda_l2)
