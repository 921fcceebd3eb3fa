"""Batched greedy generation -> predictions -> exact-match accuracy.

Prompts are sorted by length before batching so that a batch holds prompts of similar length (less
padding), and left-padded so that every row's generation starts right after its own last prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lorawatch.prompts import EncodedPrompt
from lorawatch.tasks.scoring import gold_answer, is_correct, normalize_prediction

# End-of-turn markers of the chat formats in use; generation also stops at them.
CHAT_END_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[m] for m in CHAT_END_MARKERS if m in vocab)
    return sorted(ids)


def left_pad(prompts: Sequence[EncodedPrompt], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        ids[row, width - n:] = torch.tensor(prompt.input_ids)
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def length_sorted_batches(prompts: Sequence[EncodedPrompt], batch_size: int) -> list[list[EncodedPrompt]]:
    ordered = sorted(prompts, key=lambda p: (len(p.input_ids), p.id))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[EncodedPrompt],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: str,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Greedy continuation of each prompt, decoded without special tokens; keyed by prompt id."""
    model.eval()
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer, model)
    outputs: dict[str, str] = {}
    for batch in length_sorted_batches(prompts, batch_size):
        ids, mask = left_pad(batch, pad_id, device)
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, eos_token_id=stops, pad_token_id=pad_id,
        )
        new_tokens = generated[:, ids.shape[1]:]
        for prompt, row in zip(batch, new_tokens):
            outputs[prompt.id] = tokenizer.decode(row, skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(batch))
    return outputs


@dataclass(frozen=True)
class Prediction:
    id: str
    task: str
    raw_output: str
    prediction: str
    gold: str
    correct: bool

    def to_dict(self) -> dict:
        return {"id": self.id, "task": self.task, "raw_output": self.raw_output, "prediction": self.prediction,
                "gold": self.gold, "correct": self.correct}


def score(example_id: str, task: str, kind: str, answer: str, raw_output: str) -> Prediction:
    prediction = normalize_prediction(kind, raw_output)
    gold = gold_answer(kind, answer)
    return Prediction(example_id, task, raw_output, prediction, gold, is_correct(kind, prediction, gold))


def accuracy(predictions: Sequence[Prediction]) -> float:
    return sum(p.correct for p in predictions) / len(predictions) if predictions else float("nan")
