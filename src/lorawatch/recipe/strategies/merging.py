"""Per-task adapters, merged: each task trains a fresh adapter, and checkpoint k is the merge of adapters 1..k.

Every task's adapter starts from the same initial adapter (drawn from the run's seed), as task vectors in model
merging all start from the same pre-trained weights. After stage k its trained adapter is saved in the stage's folder
(its task_adapter), and the merge of adapters 1..k is written into the model's adapter: that is the stage's checkpoint,
evaluated, saved and resumed like any other.

`linear`, `ties` and `dare_linear` are PEFT's own `add_weighted_adapter`, with equal weights 1/k: like every PEFT
method of that family it combines the LoRA factors A and B separately (each weighted by sqrt(weight x scaling)), not
the products B @ A, so that the merge is again a rank-r adapter. `magmax` (Marczak et al., 2024) keeps, for every
parameter, the task vector of largest magnitude, on the same LoRA parameters: a task vector is what training changed
in A (A_t - A_0) and in B (B_t, since B starts at zero); the merge is A_0 plus the selected changes. Selecting on the
entries of B @ A instead would give a full-rank update that no rank-r adapter can hold.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
from pydantic import Field, model_validator

from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.recipe.strategies.adapters import ADAPTER, adapter_state, reset_adapter
from lorawatch.recipe.strategies.base import StagePlan, Strategy, read_tensors, write_tensors
from lorawatch.recipe.strategies.registry import StrategyConfig, register
from lorawatch.rundir.layout import Stage
from lorawatch.rundir.schema import StrategyLog


class MergeConfig(StrategyConfig):
    name: Literal["merge"] = "merge"
    one_adapter_per_task: ClassVar[bool] = True
    method: Literal["linear", "ties", "dare_linear", "magmax"] = Field(
        "linear", description="how the per-task adapters are combined")
    density: float | None = Field(None, gt=0, le=1, description="share of each task update kept (ties, "
                                                                "dare_linear)")

    @model_validator(mode="after")
    def _density_where_used(self) -> "MergeConfig":
        if (self.method in ("ties", "dare_linear")) != (self.density is not None):
            raise ValueError(f"merge method '{self.method}' " + ("needs 'density'" if self.density is None
                                                                  else "takes no 'density'"))
        return self


def magmax(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise, the entry of largest magnitude among the task vectors (the first one on a tie)."""
    stacked = torch.stack(task_vectors)
    chosen = stacked.abs().argmax(dim=0, keepdim=True)
    return stacked.gather(0, chosen).squeeze(0)


def magmax_states(states: list[dict[str, torch.Tensor]], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MagMax of adapters (state dicts of one adapter layout) trained from `initial`."""
    return {name: start + magmax([state[name] - start for state in states]) for name, start in initial.items()}


def peft_merge(model, states: list[dict[str, torch.Tensor]], *, method: str, density: float | None,
               seed: int) -> dict[str, torch.Tensor]:
    """The merge of adapters (state dicts as PEFT saves them) by PEFT's add_weighted_adapter, with equal weights, as
    a state dict for the model's adapter. The adapters are loaded beside it for the merge and removed after."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict  # (adapters.py says why here)

    names = [f"merge-input-{i}" for i in range(len(states))]
    config = model.peft_config[ADAPTER]
    try:
        for name, state in zip(names, states):
            model.add_adapter(name, config)
            set_peft_model_state_dict(model, state, adapter_name=name)
        torch.manual_seed(seed)  # DARE drops entries at random
        model.add_weighted_adapter(names, [1.0 / len(states)] * len(states), "merged", combination_type=method,
                                   density=density)
        merged = get_peft_model_state_dict(model, adapter_name="merged")
    finally:
        for name in [*names, "merged"]:
            if name in model.peft_config:
                model.delete_adapter(name)
        model.set_adapter(ADAPTER)  # active and trainable again
    # The merged adapter has scaling 1 (alpha = r); the model's has alpha / r: B absorbs the difference.
    scale = config.lora_alpha / config.r
    return {name: tensor / scale if ".lora_B." in name else tensor for name, tensor in merged.items()}


class Merge(Strategy):
    name = "merge"

    def __init__(self, train_rows, *, method: str, density: float | None):
        super().__init__(train_rows)
        self.method, self.density = method, density

    def plan(self, model, stage: int, run_seed: int, earlier: list[Stage]) -> StagePlan:
        plan = super().plan(model, stage, run_seed, earlier)
        reset_adapter(model, run_seed)  # the same start for every task, as task vectors share the pre-trained model
        plan.carry["initial"] = adapter_state(model)  # where every task vector starts (MagMax's origin)
        return plan

    def finish(self, model, plan: StagePlan, steps: int, folder: Stage) -> StrategyLog | None:
        from peft import set_peft_model_state_dict  # (adapters.py says why here)

        trained = adapter_state(model)
        write_tensors(folder.task_adapter, trained)
        states = []
        for stage_folder in plan.earlier[1:]:
            state = read_tensors(stage_folder.task_adapter)
            if state is None:  # the protocol redoes a stage whose task adapter is not intact() before the next one
                raise RuntimeError(f"{stage_folder.task_adapter}: missing or damaged, yet a later stage is trained")
            states.append({name: t.to(trained[name].device) for name, t in state.items()})
        states.append(trained)
        if self.method == "magmax":
            merged = magmax_states(states, plan.carry["initial"])
        else:
            merged = peft_merge(model, states, method=self.method, density=self.density, seed=plan.seed)
        set_peft_model_state_dict(model, merged, adapter_name=ADAPTER)
        return super().finish(model, plan, steps, folder)

    def intact(self, folder: Stage, stage: int) -> bool:
        return read_tensors(folder.task_adapter) is not None


@register(MergeConfig)
def build_merge(config: MergeConfig, train_rows: dict[str, Sequence[EncodedTrainExample]], *, pad_id: int,
                device: str) -> Merge:
    return Merge(train_rows, method=config.method, density=config.density)
