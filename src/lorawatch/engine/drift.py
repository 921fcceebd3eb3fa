"""Reference-set drift: the next-token distribution at each reference prompt's answer position.

The answer position is the last prompt token of each row. Rows are left-padded and given position ids
that count only their own tokens, so a row's distribution does not depend on which rows share its batch.
(The published code reads index `attention_mask.sum(1) - 1` of a left-padded batch, which is a token
inside the prompt for every row shorter than the longest; `reference.position: published` reproduces it.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lorawatch.engine.drift_stats import compare_distributions
from lorawatch.engine.passes import DEFAULT_TOKEN_BUDGET, budget_batches, left_pad, position_ids
from lorawatch.data.prompts import EncodedPrompt
from lorawatch.rundir.schema import AdapterCheck, ExampleDrift

STAT_NAMES = ("kl", "entropy", "margin")
# Bumped when a reference row's drift record gains or changes a statistic: a cached base stage from before is
# then computed again rather than restored without it (engine/base_cache.py).
DRIFT_RULES_VERSION = 2

# The adapter-active check's tolerance on each row's KL to base, in nats. The base model's own distribution
# computed in another batch differs from stage 0's only by float round-off, far below this in float32; a trained
# adapter moves the reference distributions by orders of magnitude more. In half precision the round-off can
# approach it: the check then errs towards "active", never towards a false alarm on a working adapter.
ADAPTER_KL_TOLERANCE = 1e-5


# The published implementation's reference pass: batches of 4 in file order, left-padded, default position
# ids, and the distribution read at index attention_mask.sum(1) - 1. Offered only to compare with the paper.
PUBLISHED_BATCH = 4


@torch.no_grad()
def published_position_logprobs(model: torch.nn.Module, prompts: Sequence[EncodedPrompt], *, pad_id: int,
                                device: str) -> tuple[list[str], torch.Tensor]:
    """The published reading: for every row but the longest of its batch this is a token inside the prompt."""
    model.eval()
    out = []
    for start in range(0, len(prompts), PUBLISHED_BATCH):
        batch = prompts[start:start + PUBLISHED_BATCH]
        ids, mask = left_pad(batch, pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        index = mask.sum(1) - 1
        out.append(torch.log_softmax(logits[torch.arange(len(batch)), index].float(), dim=-1).cpu())
    return [p.id for p in prompts], torch.cat(out)


@torch.no_grad()
def answer_logprobs(model: torch.nn.Module, prompts: Sequence[EncodedPrompt], *, pad_id: int, device: str,
                    token_budget: int = DEFAULT_TOKEN_BUDGET, position: str = "answer",
                    batch_rows: int | None = None) -> tuple[list[str], torch.Tensor]:
    """Log-probabilities (float32, [rows, vocab]) of the next token after each prompt, in input order.

    position="published" reproduces the published implementation's reading instead (see above).
    """
    if position == "published":
        return published_position_logprobs(model, prompts, pad_id=pad_id, device=device)
    model.eval()
    rows: dict[str, torch.Tensor] = {}
    for batch in budget_batches([len(p.input_ids) for p in prompts], token_budget, max_rows=batch_rows):
        chunk = [prompts[i] for i in batch]
        ids, mask = left_pad(chunk, pad_id, device)
        # logits_to_keep=1: only the last position's logits are projected onto the vocabulary.
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1).logits
        logprobs = torch.log_softmax(logits[:, -1, :].float(), dim=-1).cpu()
        for prompt, row in zip(chunk, logprobs):
            rows[prompt.id] = row
    ids_in_order = [p.id for p in prompts]
    return ids_in_order, torch.stack([rows[i] for i in ids_in_order])


def per_example_drift(ids: Sequence[str], tasks: Sequence[str | None], logprobs: torch.Tensor,
                      base_logprobs: torch.Tensor, gold_ids: Sequence[int | None] | None = None) -> list[ExampleDrift]:
    """Per reference row: KL(p_k || p_0), entropy of p_k, top-1 minus top-2 log-probability of p_k (the paper's
    statistics), and drift_stats' comparison with the base (forward KL, same top-1, top-5 overlap, Δp of the
    gold token `gold_ids[i]`, None where a row has none)."""
    probs = logprobs.exp()
    # The headline KL stays in the input's precision, as the paper computes it (drift_stats' is float64).
    kl = (probs * (logprobs - base_logprobs)).sum(-1).clamp(min=0.0)  # clamp: float round-off below 0
    entropy = -(probs * logprobs).sum(-1)
    top2 = logprobs.topk(2, dim=-1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    more = compare_distributions(logprobs, base_logprobs, gold_ids)
    return [ExampleDrift(i, t, float(k), float(h), float(m), int(top), kl_forward=kf, same_top1=bool(same),
                         top5_overlap=overlap, dp_gold=dp)
            for i, t, k, h, m, top, kf, same, overlap, dp in
            zip(ids, tasks, kl, entropy, margin, top2.indices[:, 0], more["kl_forward"], more["same_top1"],
                more["top5_overlap"], more["dp_gold"])]


def summarize(drift: Sequence[ExampleDrift]) -> dict[str, float]:
    """mean, p10 and p95 of each statistic over the reference set: keys like `kl_mean`, `entropy_p10`."""
    out: dict[str, float] = {}
    for name in STAT_NAMES:
        values = np.array([getattr(d, name) for d in drift], dtype=np.float64)
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_p10"] = float(np.percentile(values, 10))
        out[f"{name}_p95"] = float(np.percentile(values, 95))
    return out


def adapter_check(drift: Sequence[ExampleDrift], base_top1: Sequence[int],
                  tolerance: float = ADAPTER_KL_TOLERANCE) -> AdapterCheck:
    """Is the adapter doing anything? Inactive when every reference row's KL to base is within `tolerance` and its
    top-1 token is the base model's (`base_top1`, in the rows' order): one function for a trained stage (recipe),
    an adapter loaded by `lorawatch evaluate`, and the Trainer callback's model at the end of training."""
    if len(drift) != len(base_top1):
        raise ValueError(f"adapter_check: {len(drift)} drift rows but {len(base_top1)} base tokens")
    max_kl = max((d.kl for d in drift), default=0.0)
    changed = sum(d.top1_token != int(t) for d, t in zip(drift, base_top1))
    return AdapterCheck(active=max_kl > tolerance or changed > 0, max_kl=max_kl, top1_changed=changed,
                        rows=len(drift), tolerance=tolerance)


def adapter_check_of(logprobs: torch.Tensor, base_logprobs: torch.Tensor,
                     tolerance: float = ADAPTER_KL_TOLERANCE) -> AdapterCheck:
    """adapter_check from the two sets of reference log-probabilities ([rows, vocab], the same rows in order)."""
    rows = per_example_drift([str(i) for i in range(len(logprobs))], [None] * len(logprobs), logprobs, base_logprobs)
    return adapter_check(rows, base_logprobs.argmax(-1).tolist(), tolerance)
