"""KL anchor to the base model (LwF-style): the loss gains `weight` x KL(base || adapted), summed over the
stage's answer tokens, on the stage's own prompts.

The base distribution is the same model read with its adapter disabled (no second copy of the weights), under
no_grad: it is a fixed target. Direction: KL(p_base || p_adapted) is, up to the base's own entropy (a constant), the
cross-entropy of the adapted model against the base's distribution, i.e. the distillation loss of LwF (Li & Hoiem,
2016) with the base as teacher. It is mass-covering: it penalises the adapted model for taking probability away from
tokens the base found likely, which is the forgetting it is meant to prevent. (The reference-set drift lorawatch
reports is the other direction, KL(p_adapted || p_base); both are zero exactly when the two distributions agree.)
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.recipe.strategies.base import StagePlan, Strategy, TimedTerm
from lorawatch.rundir.layout import Stage
from lorawatch.recipe.strategies.registry import StrategyConfig, register


class KLAnchorConfig(StrategyConfig):
    name: Literal["kl_anchor"] = "kl_anchor"
    # nats per answer token, on the footing of the cross-entropy
    weight: float = Field(1.0, gt=0, description="weight of the KL term")


def kl_to_base(model, inputs: dict[str, torch.Tensor], predicts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || adapted) summed over the answer positions `predicts`; `logits` are the adapted model's there."""
    was_training = model.training
    model.eval()  # the target without dropout: the same prompt always gets the same base distribution
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs, logits_to_keep=predicts).logits
    model.train(was_training)
    base_logprobs = torch.log_softmax(base.float(), dim=-1)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (base_logprobs.exp() * (base_logprobs - logprobs)).sum()


class KLAnchor(Strategy):
    name = "kl_anchor"

    def __init__(self, train_rows, *, weight: float):
        super().__init__(train_rows)
        self.weight = weight

    def plan(self, model, stage: int, run_seed: int, earlier: list[Stage]) -> StagePlan:
        plan = super().plan(model, stage, run_seed, earlier)
        weight = self.weight

        def term(model, inputs, predicts, logits) -> torch.Tensor:
            return weight * kl_to_base(model, inputs, predicts, logits)

        plan.extra_loss = TimedTerm(term)
        return plan


@register(KLAnchorConfig)
def build_kl_anchor(config: KLAnchorConfig, train_rows: dict[str, Sequence[EncodedTrainExample]], *, pad_id: int,
                    device: str) -> KLAnchor:
    return KLAnchor(train_rows, weight=config.weight)
