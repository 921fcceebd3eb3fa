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
    batch_rows: int | None  # rows per batch at most, besides the token budget
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
    options = dict(max_new_tokens=params.max_new_tokens, device=params.device, token_budget=params.token_budget,
                   batch_rows=params.batch_rows, drafts=drafts, fast=params.fast, on_rows=progress.advance)

    # The test sets not yet on disk, generated in one call: with pooled decoding, every task's diverged rows
    # decode in one batch. Each task's predictions are then written as a unit of its own.
    tasks = []
    for task in data.tasks:
        path = folder / "predictions" / f"{task.name}.jsonl"
        rows = read_unit(path, [e.id for e in task.test], Prediction)
        if rows is None:
            tasks.append((task, path))
        else:
            progress.advance(len(rows))
            scores[task.name] = accuracy(rows)
    ids = [e.id for t, _ in tasks for e in t.test]
    # tasks whose files give the same row ids are generated one by one: results are keyed by id
    calls = [tasks] if len(set(ids)) == len(ids) else [[t] for t in tasks]
    for call in filter(None, calls):
        progress.phase(f"{label} · evaluate {', '.join(t.name for t, _ in call)}")
        with costs.phase("task_eval"):
            generated = generate(model, tokenizer, [p for t, _ in call for p in encoded.test[t.name]],
                                 groups={e.id: t.name for t, _ in call for e in t.test},
                                 counters=costs.generation["task_eval"], **options)
        for task, path in call:
            rows = [score(e.id, task.name, kinds[task.name], e.answer,
                          decode_text(tokenizer, generated[e.id].output_ids), generated[e.id].output_ids)
                    for e in task.test]
            store.write_rows(path, Prediction, (r.to_dict() for r in rows))
            crash_point(f"{crash_prefix}:eval:{task.name}")
            scores[task.name] = accuracy(rows)
    scores = {t.name: scores[t.name] for t in data.tasks}

    path = folder / "predictions" / "reference.jsonl"
    rows = read_unit(path, [e.id for e in data.reference], Prediction)
    if rows is None:
        # The answer-position distribution falls out of the generation's first forward pass.
        first = drift is None and params.reference_position == "answer" and params.fast.reference_from_generation
        progress.phase(f"{label} · reference set")
        with costs.phase("reference_generation"):
            generated = generate_by_task(model, tokenizer, data.reference, encoded.reference, first_logprobs=first,
                                         counters=costs.generation["reference_generation"], **options)
        rows = [score(e.id, e.task, kinds[e.task], e.answer, decode_text(tokenizer, generated[e.id].output_ids),
                      generated[e.id].output_ids) for e in data.reference]
        if first:
            # The drift goes to disk before the predictions: a crash in between then leaves nothing that
            # would have to be recomputed by a different path (and so with different round-off).
            logprobs = torch.stack([generated[e.id].first_logprobs for e in data.reference])
            drift = drift_rows(data, logprobs, base_logprobs)
            store.write_rows(drift_path, ExampleDrift, (d.to_dict() for d in drift))
        store.write_rows(path, Prediction, (r.to_dict() for r in rows))
        crash_point(f"{crash_prefix}:eval:reference")
    else:
        progress.advance(len(rows))
    scores["reference"] = accuracy(rows)

    if drift is None:
        with costs.phase("reference_distribution"):
            if logprobs is None:
                progress.phase(f"{label} · reference drift")
                logprobs = answer_logprobs(model, encoded.reference, pad_id=tokenizer.pad_token_id,
                                           token_budget=params.token_budget, batch_rows=params.batch_rows,
                                           device=params.device,
                                           position=params.reference_position)[1]
            drift = drift_rows(data, logprobs, base_logprobs)
            store.write_rows(drift_path, ExampleDrift, (d.to_dict() for d in drift))
        crash_point(f"{crash_prefix}:drift")
    progress.advance(len(data.reference))
    return scores, drift, logprobs


def generate_by_task(model, tokenizer, examples: Sequence[Example], prompts: Sequence[EncodedPrompt],
                     **options) -> dict[str, Generated]:
    """`generate` with the rows grouped by task: a task's rows share their prompts' long prefix (see
    evaluation.py)."""
    return generate(model, tokenizer, prompts, groups={p.id: e.task for e, p in zip(examples, prompts)}, **options)


def drift_rows(data: RunData, logprobs: torch.Tensor, base_logprobs: torch.Tensor | None) -> list[ExampleDrift]:
    return per_example_drift([e.id for e in data.reference], [e.task for e in data.reference], logprobs,
                             logprobs if base_logprobs is None else base_logprobs)
