"""The model's LoRA adapters as the strategies that train one adapter per task handle them (merging, O-LoRA).

PEFT is imported where it is used, here and in those strategies: the
config imports every strategy module for its settings, and PEFT would add seconds to every command's start.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorawatch.recipe.strategies.base import read_tensors
from lorawatch.rundir.layout import ADAPTER_WEIGHTS

ADAPTER = "default"  # the model's own adapter: the one trained, saved and loaded by the protocol


def reset_adapter(model, seed: int) -> None:
    """Give the model's adapter fresh initial weights (A random, B zero), the same for the same seed."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            module.reset_lora_parameters(ADAPTER, True)


def adapter_state(model, name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """A copy of an adapter's weights, keyed as PEFT saves them (PEFT's own state dict shares the parameters'
    storage, which training and merging change)."""
    from peft import get_peft_model_state_dict

    return {key: t.detach().clone() for key, t in get_peft_model_state_dict(model, adapter_name=name).items()}


def add_frozen_adapter(model, name: str, folder: Path) -> None:
    """Load a stage's saved adapter (the root of its adapter folder) beside the model's own, as `name`; PEFT adds
    it inactive and frozen."""
    from peft import set_peft_model_state_dict


    state = read_tensors(folder / ADAPTER_WEIGHTS)
    if state is None:  # the stage is complete: the protocol checked its adapter
        raise RuntimeError(f"{folder / ADAPTER_WEIGHTS}: missing or damaged, yet a later stage needs it")
    model.add_adapter(name, model.peft_config[ADAPTER])
    set_peft_model_state_dict(model, state, adapter_name=name)


def activate_with(model, frozen: list[str]) -> None:
    """Make the model's adapter and the `frozen` ones all active (their updates add up); only its own trains."""
    from peft.tuners.lora import LoraLayer

    model.base_model.set_adapter([ADAPTER, *frozen])  # PEFT makes every active adapter trainable...
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in frozen:  # ...so the earlier ones are frozen again
                module.lora_A[name].requires_grad_(False)
                module.lora_B[name].requires_grad_(False)
