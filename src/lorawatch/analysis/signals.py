"""The drift signals a monitor can watch: one number per checkpoint, from its reference rows' drift records.

Each signal grows as the checkpoint moves away from the base model, so one rule serves them all: act when the
signal is above its threshold. `kl` is the paper's and the default; the others are the statistics of
engine/drift_stats.py averaged over the reference rows:

    kl           mean KL(p_k ‖ p_0) at the answer position (the paper's reverse KL)
    kl_forward   mean KL(p_0 ‖ p_k) (the direction RL's Razor, arXiv 2509.04259, finds predictive)
    top1_change  share of rows whose most likely next token is not the base model's (1 − llama.cpp's "same top p")
    top5_change  1 − mean overlap of the two top-5 sets
    gold_drop    mean fall of the gold answer token's probability, p_0(gold) − p_k(gold) (−llama.cpp's Δp), over
                 the rows that have a gold

No torch here: the config names the signals, and it is read before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

SignalName = Literal["kl", "kl_forward", "top1_change", "top5_change", "gold_drop"]

SIGNALS: dict[str, str] = {
    "kl": "mean KL(checkpoint ‖ base) at the answer position (the paper's)",
    "kl_forward": "mean KL(base ‖ checkpoint) at the answer position",
    "top1_change": "share of reference rows whose most likely next token differs from the base model's",
    "top5_change": "1 − mean overlap of the checkpoint's and the base model's top-5 next tokens",
    "gold_drop": "mean fall in the probability of the gold answer's first token",
}
DEFAULT_SIGNAL = "kl"


class DriftRow(Protocol):  # rundir.schema.ExampleDrift
    kl: float
    kl_forward: float | None
    same_top1: bool | None
    top5_overlap: float | None
    dp_gold: float | None


def _mean(values: list[float], signal: str) -> float:
    if not values:
        raise ValueError(f"signal '{signal}' has no values on these rows (drift records written before lorawatch "
                         "measured it, or no reference row with a gold answer)")
    return sum(values) / len(values)


def signal_value(rows: Sequence[DriftRow], signal: str) -> float:
    """The signal's value over a checkpoint's reference rows (see the module's table)."""
    if signal == "kl":
        return _mean([r.kl for r in rows], signal)
    if signal == "kl_forward":
        return _mean([r.kl_forward for r in rows if r.kl_forward is not None], signal)
    if signal == "top1_change":
        return _mean([0.0 if r.same_top1 else 1.0 for r in rows if r.same_top1 is not None], signal)
    if signal == "top5_change":
        return _mean([1.0 - r.top5_overlap for r in rows if r.top5_overlap is not None], signal)
    if signal == "gold_drop":
        return _mean([-r.dp_gold for r in rows if r.dp_gold is not None], signal)
    raise ValueError(f"unknown drift signal '{signal}'; expected one of {', '.join(SIGNALS)}")


def signal_values(rows: Sequence[DriftRow]) -> dict[str, float | None]:
    """Every signal's value (None where the rows cannot give it)."""
    out: dict[str, float | None] = {}
    for name in SIGNALS:
        try:
            out[name] = signal_value(rows, name)
        except ValueError:
            out[name] = None
    return out
