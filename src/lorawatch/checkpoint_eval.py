"""One checkpoint's evaluation: every task's test set, the reference set's answers, and its drift from the base
model at the answer position. Each part is a unit written to the stage folder as soon as it is done, and read
back (not recomputed) when the run is resumed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lorawatch import store
from lorawatch.costs import Costs
from lorawatch.evaluation import FastPath, Generated, decode_text, generate
from lorawatch.tasks.scoring import Prediction, accuracy, score
from lorawatch.inputs import Encoded, RunData
from lorawatch.progress import RunProgress
from lorawatch.prompts import EncodedPrompt
from lorawatch.units import crash_point, read_unit
from lorawatch.stability import ExampleDrift, answer_logprobs, per_example_drift
from lorawatch.tasks.base import Example


@dataclass(frozen=True)
class EvalParams:
    max_new_tokens: int
    token_budget: int
    device: str
    reference_position: str  # "answer" | "published"
    fast: FastPath  # the evaluation shortcuts in use, already resolved for the model and dtype


def evaluate_checkpoint(model, tokenizer, data: RunData, encoded: Encoded, folder: Path, params: EvalParams, *,
                        base_logprobs: torch.Tensor | None, drafts: dict[str, list[int]] | None, costs: Costs,
                        progress: RunProgress, label: str, crash_prefix: str) -> tuple[dict, list[ExampleDrift],
                                                                                       torch.Tensor | None]:
    """Every task's test set, the reference set's accuracy and its drift against the base distribution.

    Each part is a unit written as soon as it is done and reused when the run is resumed. Returns the
    scores, the per-row drift, and the reference log-probabilities when they had to be computed.
    """
    scores: dict[str, float] = {}
    kinds = {t.name: t.kind for t in data.tasks}
    drift_path = folder / "reference_drift.jsonl"
    drift = read_unit(drift_path, [e.id for e in data.reference], ExampleDrift)
    logprobs = None
    parts = [(t.name, t.test, encoded.test[t.name]) for t in data.tasks]
    parts.append(("reference", data.reference, encoded.reference))
    for name, examples, prompts in parts:
        path = folder / "predictions" / f"{name}.jsonl"
        rows = read_unit(path, [e.id for e in examples], Prediction)
        if rows is None:
            is_reference = name == "reference"
            # The answer-position distribution falls out of the generation's first forward pass.
            first = is_reference and drift is None and params.reference_position == "answer" and \
                params.fast.reference_from_generation
            phase = "reference_generation" if is_reference else "task_eval"
            progress.phase(f"{label} · {'reference set' if is_reference else 'evaluate ' + name}")
            with costs.phase(phase):
                generated = generate_by_task(model, tokenizer, examples, prompts,
                                             max_new_tokens=params.max_new_tokens, device=params.device,
                                             token_budget=params.token_budget,
                                             drafts=drafts, first_logprobs=first, fast=params.fast,
                                             counters=costs.generation[phase], on_rows=progress.advance)
            rows = [score(e.id, e.task or name, kinds[e.task or name], e.answer,
                          decode_text(tokenizer, generated[e.id].output_ids), generated[e.id].output_ids)
                    for e in examples]
            if first:
                # The drift goes to disk before the predictions: a crash in between then leaves nothing that
                # would have to be recomputed by a different path (and so with different round-off).
                logprobs = torch.stack([generated[e.id].first_logprobs for e in data.reference])
                drift = drift_rows(data, logprobs, base_logprobs)
                store.write_rows(drift_path, ExampleDrift, (d.to_dict() for d in drift))
            store.write_rows(path, Prediction, (r.to_dict() for r in rows))
            crash_point(f"{crash_prefix}:eval:{name}")
        else:
            progress.advance(len(rows))
        scores[name] = accuracy(rows)

    if drift is None:
        with costs.phase("reference_distribution"):
            if logprobs is None:
                progress.phase(f"{label} · reference drift")
                logprobs = answer_logprobs(model, encoded.reference, pad_id=tokenizer.pad_token_id,
                                           token_budget=params.token_budget, device=params.device,
                                           position=params.reference_position)[1]
            drift = drift_rows(data, logprobs, base_logprobs)
            store.write_rows(drift_path, ExampleDrift, (d.to_dict() for d in drift))
        crash_point(f"{crash_prefix}:drift")
    progress.advance(len(data.reference))
    return scores, drift, logprobs


def generate_by_task(model, tokenizer, examples: Sequence[Example], prompts: Sequence[EncodedPrompt],
                     **options) -> dict[str, Generated]:
    """`generate`, one call per task: a task's rows share their prompts' long prefix (see evaluation.py)."""
    groups: dict[str | None, list[EncodedPrompt]] = {}
    for example, prompt in zip(examples, prompts):
        groups.setdefault(example.task, []).append(prompt)
    generated: dict[str, Generated] = {}
    for group in groups.values():
        generated.update(generate(model, tokenizer, group, **options))
    return generated


def drift_rows(data: RunData, logprobs: torch.Tensor, base_logprobs: torch.Tensor | None) -> list[ExampleDrift]:
    return per_example_drift([e.id for e in data.reference], [e.task for e in data.reference], logprobs,
                             logprobs if base_logprobs is None else base_logprobs)
