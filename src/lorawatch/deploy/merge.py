"""The checkpoint as a plain Hugging Face model: the base model the run used, its stage adapter merged into the
weights (PEFT `merge_and_unload`), saved as safetensors with its tokenizer, and read back to be compared with the
unmerged checkpoint on the reference set."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lorawatch.config import ExperimentConfig
from lorawatch.data.inputs import encode, load_data, weights_digest
from lorawatch.data.prompts import EncodedPrompt
from lorawatch.engine.drift import answer_logprobs
from lorawatch.errors import UserError
from lorawatch.models.loading import LoadedModel, load_model


def load_base(config: ExperimentConfig, recorded_weights: str | None) -> LoadedModel:
    """The base model as the run loaded it; refused when its spec now resolves to other weights than the run's."""
    model = config.model
    loaded = load_model(model.spec, device=model.device, dtype=model.dtype,
                        cache_dir=Path(model.cache_dir) if model.cache_dir else None,
                        trust_remote_code=model.trust_remote_code)
    if recorded_weights is not None and weights_digest(loaded.model) != recorded_weights:
        raise UserError(f"model {model.spec}: its weights are not the ones the run used (digest differs from the "
                        "run's inputs); the export would not be the measured checkpoint")
    return loaded


def reference_prompts(config: ExperimentConfig, tokenizer) -> list[EncodedPrompt]:
    """The run's reference rows, rendered as the run rendered them."""
    return encode(load_data(config), tokenizer, config.train.max_length).reference


def reference_logits(model, prompts: list[EncodedPrompt], tokenizer) -> torch.Tensor:
    """[rows, vocab] next-token log-probabilities at each reference row's answer position."""
    return answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, device=str(model.device))[1]


def save(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def reload(folder: Path, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
