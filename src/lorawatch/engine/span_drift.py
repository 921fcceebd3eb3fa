"""Drift beyond the first answer token: the checkpoint against the base model over the first k tokens of an answer.

The headline drift (engine/drift.py) reads one distribution per reference row, the next token after the prompt.
What a fine-tune forgets can sit a few tokens later (spurious forgetting, arXiv 2501.13453: in the first few answer
tokens). Here each reference row is extended by an answer, teacher-forced, and the two models are compared at every
one of its first k positions (`reference.span_tokens`):

    answer  the base model's own greedy answer (stage 0's reference predictions): where the checkpoint stops
            following the base model along the base model's own path
    gold    the row's gold answer as training renders it: where it stops predicting the right answer

The statistics of drift_stats.py are computed at each position and averaged over the row's positions; `dp_token` is
the mean change in the probability of the teacher-forced token (for `answer`, the base model's own choice; for
`gold`, the gold token). Position 1 is the headline's answer position, so k = 1 repeats it.

Cost: one teacher-forced pass per checkpoint over the reference rows twice (answer and gold), and the same pass
with the adapter switched off (the base model) — about four reference-set prefills per checkpoint. It is read with
the adapter unmerged (the plain path) before the evaluation merges it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lorawatch.data.prompts import EncodedPrompt
from lorawatch.engine.drift_stats import compare_distributions
from lorawatch.engine.passes import budget_batches, left_pad_ids
from lorawatch.engine.passes import position_ids as own_positions
from lorawatch.rundir.schema import SpanDrift

SPANS = ("answer", "gold")


def span_tokens(prompts: Sequence[EncodedPrompt], base_answers: Mapping[str, Sequence[int]], k: int
                ) -> list[tuple[str, EncodedPrompt, list[int]]]:
    """(span, prompt, its first ≤ k answer tokens) for every reference row and span that has at least one token,
    answer spans first, in the prompts' order. `base_answers`: the base model's generated ids by row id."""
    out = []
    for span in SPANS:
        for p in prompts:
            tokens = list(base_answers.get(p.id) or []) if span == "answer" else list(p.answer_ids or [])
            if tokens[:k]:
                out.append((span, p, tokens[:k]))
    return out


@torch.no_grad()
def span_logprobs(model: torch.nn.Module, rows: Sequence[tuple[str, EncodedPrompt, list[int]]], *, pad_id: int,
                  device: str, token_budget: int, batch_rows: int | None = None) -> list[torch.Tensor]:
    """Per row, the log-probabilities ([tokens, vocab], float32) of each answer token given the prompt and the
    answer tokens before it: one teacher-forced pass over prompt + answer[:-1]."""
    out: dict[int, torch.Tensor] = {}
    for batch in _batches(rows, token_budget, batch_rows):
        out.update(zip(batch, _pass(model, [rows[i] for i in batch], pad_id=pad_id, device=device)))
    return [out[i] for i in range(len(rows))]


@torch.no_grad()
def measure_span_drift(model: torch.nn.Module, rows: Sequence[tuple[str, EncodedPrompt, list[int]]],
                       tasks: Mapping[str, str | None], *, pad_id: int, device: str, token_budget: int,
                       batch_rows: int | None = None) -> list[SpanDrift]:
    """The span drift of a PEFT model's adapter: each batch is read with the adapter on, then off (the base model,
    no second copy), and compared at once, so that no more than one batch's distributions are held (a Gemma
    vocabulary makes the whole set's ~1 GB)."""
    found: dict[int, SpanDrift] = {}
    for batch in _batches(rows, token_budget, batch_rows):
        chunk = [rows[i] for i in batch]
        ours = _pass(model, chunk, pad_id=pad_id, device=device)
        with model.disable_adapter():
            theirs = _pass(model, chunk, pad_id=pad_id, device=device)
        found.update(zip(batch, span_drift_rows(chunk, tasks, ours, theirs)))
    return [found[i] for i in range(len(rows))]


def _batches(rows, token_budget: int, batch_rows: int | None) -> list[list[int]]:
    return budget_batches([len(p.input_ids) + len(tokens) - 1 for _, p, tokens in rows], token_budget,
                          max_rows=batch_rows)


def _pass(model, chunk, *, pad_id: int, device: str) -> list[torch.Tensor]:
    model.eval()
    keep = max(len(tokens) for _, _, tokens in chunk)
    ids, mask = left_pad_ids([list(p.input_ids) + tokens[:-1] for _, p, tokens in chunk], pad_id, device)
    # left padded: every row ends at the right edge, so its answer positions are its last len(tokens) ones
    logits = model(input_ids=ids, attention_mask=mask, position_ids=own_positions(mask), logits_to_keep=keep).logits
    return [torch.log_softmax(logits[b, keep - len(tokens):].float(), dim=-1).cpu()
            for b, (_, _, tokens) in enumerate(chunk)]


def span_drift_rows(rows: Sequence[tuple[str, EncodedPrompt, list[int]]], tasks: Mapping[str, str | None],
                    logprobs: Sequence[torch.Tensor], base_logprobs: Sequence[torch.Tensor]) -> list[SpanDrift]:
    """Each row's statistics averaged over its answer positions (see the module's table)."""
    out = []
    for (span, prompt, tokens), ours, theirs in zip(rows, logprobs, base_logprobs, strict=True):
        stats = compare_distributions(ours, theirs, tokens)
        n = len(tokens)
        out.append(SpanDrift(id=prompt.id, task=tasks.get(prompt.id), span=span, tokens=n,
                             kl=sum(stats["kl_reverse"]) / n, kl_forward=sum(stats["kl_forward"]) / n,
                             same_top1=sum(stats["same_top1"]) / n, top5_overlap=sum(stats["top5_overlap"]) / n,
                             dp_token=sum(stats["dp_gold"]) / n))
    return out
