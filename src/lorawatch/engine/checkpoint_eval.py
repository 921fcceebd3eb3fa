"""One checkpoint's evaluation: every task's test set, the reference set's answers, and its drift from the base
model at the answer position, on the reference set and on the test prompts of the task just trained. Each part
is written to the stage folder as soon as it is done, and read back (not recomputed) when the run is resumed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lorawatch.rundir.costs import Costs
from lorawatch.rundir.layout import Stage
from lorawatch.engine.generation import FastPath, Generated, decode_text, generate
from lorawatch.data.tasks.scoring import accuracy, score
from lorawatch.data.inputs import Encoded, RunData
from lorawatch.progress import RunProgress
from lorawatch.data.prompts import EncodedPrompt
from lorawatch.rundir.schema import ExampleDrift
from lorawatch.rundir.stage_files import crash_point
from lorawatch.engine.drift import answer_logprobs, per_example_drift
from lorawatch.data.tasks.base import Example


@dataclass(frozen=True)
class EvalParams:
    max_new_tokens: int
    token_budget: int
    batch_rows: int | None  # rows per batch at most, besides the token budget
    device: str
    reference_position: str  # "answer" | "published"
    fast: FastPath  # the evaluation shortcuts in use, already resolved for the model and dtype


@dataclass(frozen=True)
class TaskDriftInput:
    """The base model's next-token log-probabilities ([rows, vocab]) after each test prompt of `task`, the task
    the checkpoint was just trained on, in the task's test order."""
    task: str
    base_logprobs: torch.Tensor


def evaluate_checkpoint(model, tokenizer, data: RunData, encoded: Encoded, stage: Stage, params: EvalParams, *,
                        base_logprobs: torch.Tensor | None, drafts: dict[str, list[int]] | None, costs: Costs,
                        progress: RunProgress, label: str, crash_prefix: str,
                        task_drift: TaskDriftInput | None = None) -> tuple[dict, list[ExampleDrift],
                                                                           torch.Tensor | None]:
    """Every task's test set, the reference set's accuracy and its drift against the base distribution; with
    `task_drift`, also the drift on that task's test prompts (stage.task_drift).

    Each part is written as soon as it is done and reused when the run is resumed. Returns the
    scores, the per-row drift, and the reference log-probabilities when they had to be computed.
    """
    scores: dict[str, float] = {}
    kinds = {t.name: t.kind for t in data.tasks}
    drift = stage.drift.intact_rows([e.id for e in data.reference])
    logprobs = None
    options = dict(max_new_tokens=params.max_new_tokens, device=params.device, token_budget=params.token_budget,
                   batch_rows=params.batch_rows, drafts=drafts, fast=params.fast, on_rows=progress.advance)

    # The test sets and the reference set are generated in one call: with pooled decoding, every diverged row
    # of the checkpoint decodes in one batch. Each part is then written on its own; when a crash left
    # only some of them, all are generated again in the same call, so that every row is computed in the batch
    # it would have had without the crash (batches change float round-off). Parts whose files give the same
    # row ids are generated one by one instead: results are keyed by id.
    parts = [(t.name, t.test, encoded.test[t.name]) for t in data.tasks]
    parts.append(("reference", data.reference, encoded.reference))
    on_disk = {name: stage.predictions(name).intact_rows([e.id for e in examples]) for name, examples, _ in parts}
    ids = [e.id for _, examples, _ in parts for e in examples]
    if len(set(ids)) == len(ids) and any(rows is None for rows in on_disk.values()):
        calls, on_disk = [parts], {}
    else:
        calls = [[part] for part in parts if on_disk[part[0]] is None]
    for name, rows in on_disk.items():
        if rows is not None:
            progress.advance(len(rows))
            scores[name] = accuracy(rows)
    # The reference set's answer-position distribution falls out of the generation's first forward pass; so does
    # the trained task's, for its drift (read at the answer position whatever reference.position says).
    first = drift is None and params.reference_position == "answer" and params.fast.reference_from_generation
    trained = None if task_drift is None else next(t for t in data.tasks if t.name == task_drift.task)
    if trained is not None and stage.task_drift.intact_rows([e.id for e in trained.test]) is not None:
        trained = None  # on disk already
    trained_first = trained is not None and params.fast.reference_from_generation

    def first_rows(call) -> list[str]:
        """The rows of `call` whose next-token distribution after the prompt the generation hands back."""
        names = [name for name, _, _ in call]
        return ([e.id for e in data.reference] if first and "reference" in names else []) + \
            ([e.id for e in trained.test] if trained_first and trained.name in names else [])
    for call in calls:
        names = [name for name, _, _ in call]
        progress.phase(f"{label} · evaluate {', '.join(n if n != 'reference' else 'reference set' for n in names)}")
        with costs.phase("evaluation"):
            generated = generate(model, tokenizer, [p for _, _, prompts in call for p in prompts],
                                 groups={e.id: e.task or name for name, examples, _ in call for e in examples},
                                 first_logprobs=first_rows(call),
                                 counters=costs.generation["evaluation"], **options)
        if trained_first and trained.name in names:
            # To disk before the task's predictions, as the reference drift below, for the same reason.
            write_task_drift(stage, trained, encoded, torch.stack([generated[e.id].first_logprobs
                                                                   for e in trained.test]), task_drift)
            trained, trained_first = None, False
        for name, examples, _ in call:
            rows = [score(e.id, e.task or name, kinds[e.task or name], e.answer,
                          decode_text(tokenizer, generated[e.id].output_ids), generated[e.id].output_ids)
                    for e in examples]
            if name == "reference" and first:
                # The drift goes to disk before the predictions: a crash in between then leaves nothing that
                # would have to be recomputed by a different path (and so with different round-off).
                logprobs = torch.stack([generated[e.id].first_logprobs for e in examples])
                drift = drift_rows(data, encoded.reference, logprobs, base_logprobs)
                stage.drift.write(d.to_dict() for d in drift)
            stage.predictions(name).write(r.to_dict() for r in rows)
            crash_point(f"{crash_prefix}:eval:{name}")
            scores[name] = accuracy(rows)
    scores = {name: scores[name] for name, _, _ in parts}

    if drift is None:
        with costs.phase("reference_distribution"):
            if logprobs is None:
                progress.phase(f"{label} · reference drift")
                logprobs = answer_logprobs(model, encoded.reference, pad_id=tokenizer.pad_token_id,
                                           token_budget=params.token_budget, batch_rows=params.batch_rows,
                                           device=params.device,
                                           position=params.reference_position)[1]
            drift = drift_rows(data, encoded.reference, logprobs, base_logprobs)
            stage.drift.write(d.to_dict() for d in drift)
        crash_point(f"{crash_prefix}:drift")
    if trained is not None:  # the plain path, or a resume that found the task's predictions on disk
        with costs.phase("task_drift"):
            progress.phase(f"{label} · drift on {trained.name}")
            task_logprobs = answer_logprobs(model, encoded.test[trained.name], pad_id=tokenizer.pad_token_id,
                                            token_budget=params.token_budget, batch_rows=params.batch_rows,
                                            device=params.device)[1]
            write_task_drift(stage, trained, encoded, task_logprobs, task_drift)
    progress.advance(len(data.reference))
    return scores, drift, logprobs


def write_task_drift(stage: Stage, task, encoded: Encoded, logprobs: torch.Tensor, inputs: TaskDriftInput) -> None:
    prompts = encoded.test[task.name]
    golds = [p.answer_ids[0] if p.answer_ids else None for p in prompts]
    rows = per_example_drift([e.id for e in task.test], [task.name] * len(task.test), logprobs,
                             inputs.base_logprobs, golds)
    stage.task_drift.write(r.to_dict() for r in rows)


def generate_by_task(model, tokenizer, examples: Sequence[Example], prompts: Sequence[EncodedPrompt],
                     **options) -> dict[str, Generated]:
    """`generate` with the rows grouped by task: a task's rows share their prompts' long prefix (see
    evaluation.py)."""
    return generate(model, tokenizer, prompts, groups={p.id: e.task for e, p in zip(examples, prompts)}, **options)


def drift_rows(data: RunData, prompts: Sequence[EncodedPrompt], logprobs: torch.Tensor,
               base_logprobs: torch.Tensor | None) -> list[ExampleDrift]:
    """The reference rows' drift (the base model against itself while base_logprobs is None)."""
    golds = [p.answer_ids[0] if p.answer_ids else None for p in prompts]
    return per_example_drift([e.id for e in data.reference], [e.task for e in data.reference], logprobs,
                             logprobs if base_logprobs is None else base_logprobs, golds)
