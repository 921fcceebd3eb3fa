"""Live drift monitoring while a stage trains, and what to do when KL to base crosses a threshold.

Every `every` optimizer steps (and at the stage's last step) the reference drift is measured on the adapter
as it is at that moment: one forward pass over the reference prompts, only the answer-position logits,
against the base distributions computed once per run. The series goes to stage-K/monitor.jsonl.

The watched signal is the KL to base unless `signal` names another (analysis/signals.py: forward KL, top-1 or
top-5 change, the gold token's probability drop); thresholds below are in the signal's units.

Actions when the signal is above the stage's threshold:
- warn      record and show an alert; change nothing.
- stop      end the stage at the measurement that crossed; keep the adapter of the last measurement below
            the threshold (the start of the stage when there was none).
- revert    end the stage there and discard it: the adapter goes back, bit for bit, to the start of the stage.
- rollback  train the whole stage; then keep, among the measurements below the threshold (the start of the
            stage included), the one with the lowest training loss over the steps that led to it.

With `patience` k > 1 an action waits for k consecutive measurements above the threshold, so a transient
crossing (one measurement up, the next back down) is recorded but not acted on; a stage's last measurement
above the threshold acts whatever the streak, since it is the checkpoint the stage would keep.

The threshold of a stage is the largest of: `threshold` (absolute), `relative` x the previous checkpoint's value
of the signal, and the calibrated value (`calibrate_from`; see `calibrated_threshold`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import ConfigDict

from lorawatch.rundir import store
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir.schema import Intervention, MonitorParamsRecord
from lorawatch.engine.checkpoint_eval import drift_rows, generate_by_task
from lorawatch.engine.drift import summarize
from lorawatch.analysis.signals import SIGNALS, signal_values, stage_signal_value
from lorawatch.engine.span_drift import measure_span_drift
from lorawatch.engine.generation import FastPath
from lorawatch.engine.passes import DEFAULT_TOKEN_BUDGET
from lorawatch.errors import UserError
from lorawatch.analysis.metrics import ACCURACY_TOLERANCE, MIN_CHECKPOINTS_PER_LABEL
from lorawatch.data.inputs import RunData
from lorawatch.data.prompts import EncodedPrompt
from lorawatch.data.tasks.base import Example

ACTIONS = ("warn", "stop", "revert", "rollback")


class MonitorParams(MonitorParamsRecord):
    """The monitor's settings as a run applies them (monitor.json records exactly these fields; the threshold is
    absolute, any calibration already folded in), and its rules."""

    model_config = ConfigDict(frozen=True)

    def stage_threshold(self, previous_kl: float) -> float | None:
        candidates = [t for t in (self.threshold, None if self.relative is None else self.relative * previous_kl)
                      if t is not None and t > 0]
        return max(candidates) if candidates else None

    def due(self, step: int, total_steps: int) -> bool:
        """A measurement is due every `every` optimizer steps, and at the last step: its adapter is the one
        training leaves."""
        return step > 0 and (step % self.every == 0 or step == total_steps)


def resolve_threshold(threshold: float | None, calibrate_from: str | Path | None,
                      signal: str = "kl") -> tuple[float | None, dict | None]:
    """The absolute threshold with a calibrated one folded in (the larger of the two), and the calibration as
    monitor.json records it (None without `calibrate_from`). Worked out before any model work."""
    if calibrate_from is None:
        return threshold, None
    value, how = calibrated_threshold(calibrate_from, signal)
    return max(threshold or 0.0, value), {"threshold": value, "from": how}


def calibrated_threshold(source: str | Path, signal: str = "kl") -> tuple[float, str]:
    """A threshold from earlier results: a report's correlation.json (its fitted failure-zone threshold, a KL), or
    a run folder (the largest value of the signal among its checkpoints whose average accuracy did not fall below
    the base model's). Returns the value and how it was obtained."""
    path = Path(source)
    if path.is_dir() and (path / "correlation.json").is_file():
        path = path / "correlation.json"
    if path.is_file():
        if signal != "kl":
            raise UserError(f"{path}: a report's failure-zone threshold is a KL to base; monitor.signal '{signal}' "
                            "calibrates from a run folder")
        try:
            zone = store.read_json(path).get("failure_zone") or {}
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{path}: not a readable correlation.json (expected a lorawatch report's)") from None
        value = zone.get("threshold")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"{path}: field 'failure_zone.threshold' is missing or not a positive number; "
                            "the report could not fit one")
        counts = [zone.get("n_failed"), zone.get("n_healthy")]
        if not all(isinstance(n, int) for n in counts) or min(counts) < MIN_CHECKPOINTS_PER_LABEL:
            raise UserError(f"{path}: the failure-zone threshold was fitted on {counts[0]} failed and {counts[1]} "
                            f"healthy checkpoint(s); at least {MIN_CHECKPOINTS_PER_LABEL} of each are needed to "
                            "calibrate from it")
        return float(value), f"failure-zone threshold fitted in {path}"
    run = RunFolder(path)
    if path.is_dir() and run.config.is_file():
        healthy = []
        for seed in run.seeds_on_disk():
            for k in run.seed(seed).stages_on_disk()[1:]:
                stage = run.stage(seed, k)
                try:
                    stage.record.read()  # only finished stages count
                    scores = stage.scores.read().accuracy()
                    kl = (stage.reference_stats.read().kl_mean if signal == "kl"
                          else stage_signal_value(stage, signal))
                    base = run.stage(seed, 0).scores.read().accuracy()
                except (OSError, ValueError):  # ValueError too: drift rows written before the signal was measured
                    continue
                tasks = [t for t in scores if t != "reference"]
                if not all(t in base for t in tasks):
                    continue
                average = np.mean([scores[t] for t in tasks])
                if average >= np.mean([base[t] for t in tasks]) - ACCURACY_TOLERANCE and kl > 0:
                    healthy.append(kl)
        if not healthy:
            raise UserError(f"{path}: no trained checkpoint kept the base model's average accuracy; "
                            "cannot calibrate a threshold from this run")
        what = "KL" if signal == "kl" else signal
        return float(max(healthy)), f"largest {what} of {len(healthy)} checkpoint(s) without accuracy loss in {path}"
    raise UserError(f"{source}: monitor.calibrate_from must be a report folder, its correlation.json, or a run folder")


def reference_logprobs(model: torch.nn.Module, tokenizer, reference: Sequence[Example],
                       prompts: Sequence[EncodedPrompt], *, device: str, token_budget: int = DEFAULT_TOKEN_BUDGET,
                       batch_rows: int | None = None, fast: FastPath = FastPath()) -> torch.Tensor:
    """The next-token log-probabilities at each reference row's answer position ([rows, vocab]), read from the
    first forward pass of a one-token generation: the answer-position logits only."""
    was_training = model.training
    first = generate_by_task(model, tokenizer, reference, prompts, max_new_tokens=1, device=device,
                             token_budget=token_budget, batch_rows=batch_rows, first_logprobs=True, fast=fast)
    model.train(was_training)  # generate() switched to eval mode (no dropout) for the measurement
    return torch.stack([first[e.id].first_logprobs for e in reference])


def measure_drift(model: torch.nn.Module, tokenizer, data: RunData, prompts: Sequence[EncodedPrompt],
                  base_logprobs: torch.Tensor, span: Sequence | None = None, **generation) -> dict:
    """The monitor's measurement of the adapter as it is now: KL to base, entropy and top-2 margin at the answer
    position, averaged over the reference rows (`kl_mean`, ...), and every signal of analysis/signals.py by its name
    (`generation`: reference_logprobs' batching and fast path). The span signals are measured only when `span` gives
    the answers to read (engine/span_drift.span_tokens: a span signal is watched), else None: they cost two
    teacher-forced passes with the adapter on and off."""
    logprobs = reference_logprobs(model, tokenizer, data.reference, prompts, **generation)
    rows = drift_rows(data, prompts, logprobs, base_logprobs)
    span_rows = None
    if span:
        was_training = model.training
        span_rows = measure_span_drift(model, span, {e.id: e.task for e in data.reference},
                                       pad_id=tokenizer.pad_token_id, device=generation.get("device", "cpu"),
                                       token_budget=generation.get("token_budget", DEFAULT_TOKEN_BUDGET),
                                       batch_rows=generation.get("batch_rows"))
        model.train(was_training)
    return {**summarize(rows), **signal_values(rows, span_rows)}


@dataclass
class StageMonitor:
    """Hooked into train_stage: measures, records, and decides whether training goes on."""
    model: torch.nn.Module
    measure: Callable[[], dict]  # -> {"kl_mean", "entropy_mean", "margin_mean", and each signal by name}
    params: MonitorParams
    stage: int
    task: str
    threshold: float | None
    start_kl: float
    on_point: Callable[[dict], None] | None = None
    series: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    trigger: dict | None = None  # the measurement that set the action off
    _streak: int = 0  # consecutive measurements above the threshold
    _losses: list[float] = field(default_factory=list)
    _candidates: list[tuple[dict, dict]] = field(default_factory=list)  # (point, adapter weights)
    _start: dict | None = None

    def __post_init__(self) -> None:
        self._start = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])

    def on_step(self, step: int, total_steps: int, loss: float) -> bool:
        """Called after each optimizer step; True ends the stage's training."""
        self._losses.append(loss)
        if not self.params.due(step, total_steps):
            return False
        started = time.perf_counter()
        stats = self.measure()
        value = self.value(stats)
        above = self.threshold is not None and value > self.threshold
        point = {"step": step, "kl_mean": stats["kl_mean"], "entropy_mean": stats["entropy_mean"],
                 "margin_mean": stats["margin_mean"], "train_loss": float(np.mean(self._losses)),
                 "threshold": self.threshold, "above": above}
        if self.params.signal != "kl":
            point["signal_value"] = value
        point["signals"] = {name: stats[name] for name in SIGNALS if name in stats}
        self._losses = []
        self.series.append(point)
        self._streak = self._streak + 1 if above else 0
        acts = above and (self._streak >= self.params.patience or step == total_steps)
        if acts and self.trigger is None:
            self.trigger = point
        action = self.params.action
        if not above and action == "stop":
            self._candidates = [(point, self._snapshot())]  # only the latest one below is kept
        elif not above and action == "rollback":
            self._candidates.append((point, self._snapshot()))
        self.seconds += time.perf_counter() - started
        if self.on_point:
            self.on_point(point)
        return acts and action in ("stop", "revert")

    def value(self, stats: dict) -> float:
        """The watched signal's value in a measurement."""
        value = stats["kl_mean"] if self.params.signal == "kl" else stats.get(self.params.signal)
        if value is None:
            raise UserError(f"monitor.signal '{self.params.signal}' cannot be measured on this reference set "
                            "(gold_drop needs reference rows with answers)")
        return value

    def finish(self, steps_trained: int) -> Intervention | None:
        """Apply the action to the model's adapter; the intervention taken, or None."""
        if self.trigger is None:
            return None
        action = self.params.action
        kept_step, kept_kl = steps_trained, self.series[-1]["kl_mean"]
        if action == "revert" or (action in ("stop", "rollback") and not self._candidates):
            self._restore(self._start)
            kept_step, kept_kl = 0, self.start_kl
        elif action == "stop":
            point, weights = self._candidates[-1]
            self._restore(weights)
            kept_step, kept_kl = point["step"], point["kl_mean"]
        elif action == "rollback":
            point, weights = min(self._candidates, key=lambda c: (c[0]["train_loss"], -c[0]["step"]))
            self._restore(weights)
            kept_step, kept_kl = point["step"], point["kl_mean"]
        self._start = None
        self._candidates = []
        signal = {} if self.params.signal == "kl" else {"signal": self.params.signal,
                                                        "value": self.trigger["signal_value"]}
        return Intervention(stage=self.stage, task=self.task, action=action, step=self.trigger["step"],
                            kl=self.trigger["kl_mean"], threshold=float(self.threshold), **signal,
                            kept_step=kept_step, kept_kl=kept_kl, steps_trained=steps_trained)
