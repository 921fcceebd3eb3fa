"""What a run reads: its tasks and reference set (from files or the built-in generators), and their token ids.

Everything here is checked before any model work; a data problem is a DataError naming its file and row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from lorawatch.config import ExperimentConfig
from lorawatch.errors import UserError
from lorawatch.data.prompts import EncodedPrompt, EncodedTrainExample, encode_prompt, encode_train_example, user_message
from lorawatch.data.tasks.base import Example, Task
from lorawatch.data.tasks.loading import load_reference, load_task
from lorawatch.data.tasks.scoring import training_target


@dataclass(frozen=True)
class RunData:
    tasks: list[Task]  # in training order
    reference: tuple[Example, ...]


def load_data(config: ExperimentConfig) -> RunData:
    tasks = [load_task(t.name, t.kind, t.instruction, builtin=t.builtin, train=t.train, test=t.test,
                       max_train_rows=t.max_train_rows, max_test_rows=t.max_test_rows)
             for t in config.ordered_tasks()]
    builtin_names = {t.builtin: t.name for t in config.tasks if t.builtin is not None}
    if config.reference.builtin_per_task is not None and not builtin_names:
        raise UserError("reference.builtin_per_task needs built-in tasks; give reference.path for file-based tasks")
    reference = load_reference(tasks, path=config.reference.path, builtin_per_task=config.reference.builtin_per_task,
                               builtin_names=builtin_names, max_rows=config.reference.max_rows)
    return RunData(tasks, reference)


@dataclass(frozen=True)
class Encoded:
    test: dict[str, list[EncodedPrompt]]
    train: dict[str, list[EncodedTrainExample]]
    reference: list[EncodedPrompt]


def encode(data: RunData, tokenizer, max_length: int) -> Encoded:
    instruction = {t.name: t.instruction for t in data.tasks}
    kind = {t.name: t.kind for t in data.tasks}
    return Encoded(
        test={t.name: [encode_prompt(tokenizer, e.id, user_message(t.instruction, e.prompt), max_length,
                                     answer=training_target(t.kind, e.answer) if e.answer else None)
                       for e in t.test] for t in data.tasks},
        train={t.name: [encode_train_example(tokenizer, user_message(t.instruction, e.prompt),
                                             training_target(t.kind, e.answer), max_length)
                        for e in t.train] for t in data.tasks},
        reference=[encode_prompt(tokenizer, e.id, user_message(instruction[e.task], e.prompt), max_length,
                                 answer=training_target(kind[e.task], e.answer) if e.answer else None)
                   for e in data.reference],
    )


# --- fingerprints: what a run's results were computed from -------------------------------------------


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def data_fingerprint(data: RunData) -> dict:
    """Digests of every row a run reads (after row limits), per task and split, and of the instructions and the
    reference set: a file edited in place (same name, same row count) changes its digest."""
    rows = lambda examples: [(e.id, e.prompt, e.answer, e.task) for e in examples]  # noqa: E731
    return {
        "tasks": {t.name: {"kind": t.kind, "instruction": _digest(t.instruction), "train": _digest(rows(t.train)),
                           "test": _digest(rows(t.test))} for t in data.tasks},
        "reference": _digest(rows(data.reference)),
    }


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the model's weights as loaded (names, dtypes, shapes and bytes): replaced weights under the
    same name or path change it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:20]
