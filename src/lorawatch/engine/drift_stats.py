"""How one checkpoint's next-token distribution differs from the base model's, row by row.

The paper's signal is the reverse KL, KL(p_k ‖ p_0), at the answer position (engine/drift.py keeps it as the
headline). This module adds what llama.cpp's `--kl-divergence` reports and what the forgetting literature
measures, from the same two log-probability tensors:

    kl_reverse   KL(p_k ‖ p_0): the paper's direction
    kl_forward   KL(p_0 ‖ p_k): RL's Razor's direction (arXiv 2509.04259)
    same_top1    1 when both models' most likely token is the same (llama.cpp's "same top p")
    top5_overlap |top-5 of p_k ∩ top-5 of p_0| / 5
    dp_gold      p_k(gold) − p_0(gold) for the row's gold token (llama.cpp's Δp), when the row has one

Ties are broken towards the lower token id, for the top-1 token and the top-k set alike, so two equal
distributions always agree and the result does not depend on the sort's implementation. A token with
probability exactly 0 (a logit of −inf, or an underflow) contributes 0 to a KL where it carries the weight,
and +inf where only the other side gives it mass: the divergence is then truly infinite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TOP_K = 5
STATISTICS = ("kl_reverse", "kl_forward", "same_top1", "top5_overlap", "dp_gold")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, in float64: terms where p is 0 are 0 (x log x → 0), not NaN."""
    logp, logq = logp.double(), logq.double()
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    # Round-off can leave a tiny negative sum for nearly equal rows; a KL is never below 0.
    return terms.sum(-1).clamp(min=0.0)


def top_k_ids(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """The k most likely token ids per row, ties broken towards the lower id (a stable descending sort)."""
    return torch.sort(logprobs, dim=-1, descending=True, stable=True).indices[:, :k]


def compare_distributions(logprobs: torch.Tensor, base_logprobs: torch.Tensor,
                          gold_ids: Sequence[int | None] | None = None, *, k: int = TOP_K) -> dict[str, list]:
    """Every statistic of STATISTICS for each row of two [rows, vocab] log-probability tensors.

    `gold_ids[i]` is row i's gold token (None where the row has none: its dp_gold is None).
    """
    if logprobs.shape != base_logprobs.shape or logprobs.dim() != 2:
        raise ValueError(f"expected two [rows, vocab] tensors of one shape, got {tuple(logprobs.shape)} and "
                         f"{tuple(base_logprobs.shape)}")
    rows, vocab = logprobs.shape
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, vocab)  # a vocabulary smaller than k (only in tests' toy models) compares every token
    ours, theirs = top_k_ids(logprobs, k), top_k_ids(base_logprobs, k)
    overlap = (ours.unsqueeze(-1) == theirs.unsqueeze(-2)).any(-1).sum(-1)
    golds = list(gold_ids) if gold_ids is not None else [None] * rows
    if len(golds) != rows:
        raise ValueError(f"{len(golds)} gold ids for {rows} rows")
    dp = []
    for row, gold in enumerate(golds):
        if gold is None:
            dp.append(None)
        else:
            dp.append(float(logprobs[row, gold].double().exp() - base_logprobs[row, gold].double().exp()))
    return {
        "kl_reverse": _kl(logprobs, base_logprobs).tolist(),
        "kl_forward": _kl(base_logprobs, logprobs).tolist(),
        "same_top1": (ours[:, 0] == theirs[:, 0]).int().tolist(),
        "top5_overlap": (overlap.double() / k).tolist(),
        "dp_gold": dp,
    }
