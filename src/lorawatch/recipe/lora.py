"""The protocol's LoRA adapter: its PEFT config, and a check that its target modules exist in the model."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import NoMatchingPeftModuleError
from transformers import AutoModelForCausalLM

from lorawatch.config import ExperimentConfig
from lorawatch.errors import UserError


def lora_config(config: ExperimentConfig) -> LoraConfig:
    return LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, bias=config.lora.bias, task_type="CAUSAL_LM")


def check_lora_targets(model: torch.nn.Module, lora: LoraConfig) -> None:
    """The adapter's target modules exist in this model: checked on a weightless copy (meta device) before the
    base stage, not found out when the first stage starts."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    try:
        get_peft_model(skeleton, lora)
    except NoMatchingPeftModuleError:
        names = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                        if isinstance(module, torch.nn.Linear)})
        raise UserError(f"lora.target_modules {lora.target_modules!r} names no layer of this model; its linear "
                        f"layers are {', '.join(names)} (or use all-linear)") from None
