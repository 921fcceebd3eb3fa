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

The span signals read the drift over the first `reference.span_tokens` tokens of an answer, teacher-forced
(engine/span_drift.py, a stage's span_drift.jsonl): each row's mean over its positions, averaged over the rows.

    kl_answer           KL(p_k ‖ p_0) along the base model's own answer
    kl_forward_answer   KL(p_0 ‖ p_k) along it
    top1_change_answer  share of those positions where the checkpoint's top token is not the base model's
    answer_drop         fall of the probability of the base model's own answer tokens
    kl_gold             KL(p_k ‖ p_0) along the gold answer
    gold_span_drop      fall of the probability of the gold answer's tokens

No torch here: the config names the signals, and it is read before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

SignalName = Literal["kl", "kl_forward", "top1_change", "top5_change", "gold_drop", "kl_answer", "kl_forward_answer",
                     "top1_change_answer", "answer_drop", "kl_gold", "gold_span_drop"]

FIRST_TOKEN_SIGNALS: dict[str, str] = {
    "kl": "mean KL(checkpoint ‖ base) at the answer position (the paper's)",
    "kl_forward": "mean KL(base ‖ checkpoint) at the answer position",
    "top1_change": "share of reference rows whose most likely next token differs from the base model's",
    "top5_change": "1 − mean overlap of the checkpoint's and the base model's top-5 next tokens",
    "gold_drop": "mean fall in the probability of the gold answer's first token",
}
# name -> (span, what is read of its SpanDrift rows, what it is); `drop` is −dp_token, `top1_change` 1 − same_top1
_SPAN: dict[str, tuple[str, str, str]] = {
    "kl_answer": ("answer", "kl", "mean KL(checkpoint ‖ base) over the first answer tokens of the base model"),
    "kl_forward_answer": ("answer", "kl_forward", "mean KL(base ‖ checkpoint) over the base model's first answer "
                          "tokens"),
    "top1_change_answer": ("answer", "top1_change", "share of the base model's first answer tokens the checkpoint "
                           "would not pick"),
    "answer_drop": ("answer", "drop", "mean fall in the probability of the base model's own first answer tokens"),
    "kl_gold": ("gold", "kl", "mean KL(checkpoint ‖ base) over the gold answer's first tokens"),
    "gold_span_drop": ("gold", "drop", "mean fall in the probability of the gold answer's first tokens"),
}
SPAN_SIGNALS: dict[str, str] = {name: text for name, (_, _, text) in _SPAN.items()}
SIGNALS: dict[str, str] = {**FIRST_TOKEN_SIGNALS, **SPAN_SIGNALS}
assert set(SignalName.__args__) == set(SIGNALS)  # the config's choices are the signals this module computes
DEFAULT_SIGNAL = "kl"


class DriftRow(Protocol):  # rundir.schema.ExampleDrift
    kl: float
    kl_forward: float | None
    same_top1: bool | None
    top5_overlap: float | None
    dp_gold: float | None


class SpanRow(Protocol):  # rundir.schema.SpanDrift
    span: str
    kl: float
    kl_forward: float
    same_top1: float
    dp_token: float


def _mean(values: list[float], signal: str) -> float:
    if not values:
        raise ValueError(f"signal '{signal}' has no values on these rows (drift records written before lorawatch "
                         "measured it, or no reference row with a gold answer)")
    return sum(values) / len(values)


def signal_value(rows: Sequence[DriftRow], signal: str, span_rows: Sequence[SpanRow] | None = None) -> float:
    """The signal's value over a checkpoint's reference rows (see the module's table); a span signal reads
    `span_rows` (a stage's span_drift.jsonl rows)."""
    if signal in _SPAN:
        return span_signal_value(span_rows or [], signal)
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


def span_signal_value(rows: Sequence[SpanRow], signal: str) -> float:
    span, statistic, _ = _SPAN[signal]
    mine = [r for r in rows if r.span == span]
    if not mine:
        raise ValueError(f"signal '{signal}' has no values on these rows (no span drift recorded: "
                         "reference.span_tokens 0, a folder from before lorawatch measured it, or no row with "
                         f"{'a base answer' if span == 'answer' else 'a gold answer'})")
    if statistic == "kl":
        return sum(r.kl for r in mine) / len(mine)
    if statistic == "kl_forward":
        return sum(r.kl_forward for r in mine) / len(mine)
    if statistic == "top1_change":
        return sum(1.0 - r.same_top1 for r in mine) / len(mine)
    return sum(-r.dp_token for r in mine) / len(mine)


def signal_values(rows: Sequence[DriftRow], span_rows: Sequence[SpanRow] | None = None) -> dict[str, float | None]:
    """Every signal's value (None where the rows cannot give it: the span signals without `span_rows`)."""
    out: dict[str, float | None] = {}
    for name in SIGNALS:
        try:
            out[name] = signal_value(rows, name, span_rows)
        except ValueError:
            out[name] = None
    return out


def _span_rows(stage) -> list | None:
    return stage.span_drift.read() if stage.span_drift.exists() else None


def stage_signal_value(stage, signal: str) -> float:
    """One signal of a finished stage folder (rundir.layout.Stage), from its reference and span drift files;
    ValueError where the folder cannot give it."""
    return signal_value(stage.drift.read(), signal, _span_rows(stage) if signal in _SPAN else None)


def stage_signal_values(stage) -> dict[str, float | None]:
    """Every signal of a finished stage folder (None where it cannot give one)."""
    return signal_values(stage.drift.read(), _span_rows(stage))
