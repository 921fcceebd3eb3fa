"""A stage's records: stage.json, training.json, scores.json, reference_stats.json, and the rows of its
reference_drift.jsonl and monitor.jsonl. The training log and the intervention are also the values the recipe,
the monitor and the Trainer callback build and pass around."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (AllowInfNan, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, Strict, StrictBool, StrictInt,
                      StrictStr)

from lorawatch.rundir.schema.base import Part, Record


class Intervention(Part):
    """What the live drift monitor did in a stage (recipe/monitor.py's StageMonitor.finish)."""

    stage: int
    task: str
    action: str
    step: int  # the optimizer step whose measurement set the action off (with patience: the streak's last)
    kl: float  # KL to base measured there
    threshold: float
    signal: str = "kl"  # what the threshold applied to (analysis/signals.py); written when it is not KL
    value: float | None = None  # the signal's value there, when the signal is not KL
    kept_step: int  # the step whose adapter the stage keeps (0: the start of the stage)
    kept_kl: float | None
    steps_trained: int


class MonitorLog(Part):
    threshold: float | None
    action: str
    every: int
    patience: int
    measurements: int
    seconds: float
    intervention: Intervention | None


class ReplayLog(Part):
    seed: int  # of the draw
    rows: dict[str, NonNegativeInt]  # earlier task -> its training rows mixed into this stage


class StrategyLog(Part):
    """What a strategy against forgetting (strategies/) did in a stage; absent with strategy `none`."""

    name: str
    replay: ReplayLog | None = None
    loss_seconds: NonNegativeFloat | None = None  # computing the added loss term (its forward part)
    loss_seconds_per_step: NonNegativeFloat | None = None
    fisher_rows: NonNegativeInt | None = None  # ewc: rows this stage's Fisher was estimated on
    fisher_seconds: NonNegativeFloat | None = None


class TrainingLog(Part):
    """A stage's training: what recipe/training.train_stage counts as it goes (it starts one with `begin` and
    adds to it), what the recipe completes with the monitor's and the strategy's logs, and what stage.json and
    training.json hold. Fields are in the order they are written."""

    optimizer_steps: NonNegativeInt
    stopped_early: bool
    micro_batches: NonNegativeInt
    answer_tokens: NonNegativeInt
    total_tokens: NonNegativeInt
    seconds: NonNegativeFloat
    first_loss: float | None
    last_loss: float | None
    step_losses: list[float]  # mean answer-token loss per optimizer step
    learning_rates: list[float]
    # With an added loss term (a strategy's, strategies/): its share of each optimizer step's objective.
    extra_losses: list[float] | None = None
    monitor: MonitorLog | None = None  # only in a monitored run
    strategy: StrategyLog | None = None  # only with a strategy other than `none`

    @classmethod
    def begin(cls, *, extra_losses: bool) -> "TrainingLog":
        """Nothing trained yet. `extra_losses`: a strategy adds a loss term, whose share is logged per step."""
        return cls(optimizer_steps=0, stopped_early=False, micro_batches=0, answer_tokens=0, total_tokens=0,
                   seconds=0.0, first_loss=None, last_loss=None, step_losses=[], learning_rates=[],
                   **({"extra_losses": []} if extra_losses else {}))

    def end(self, seconds: float) -> None:
        """Training is over: its time, and the first and last step losses."""
        self.seconds = round(seconds, 3)
        self.first_loss = self.step_losses[0] if self.step_losses else None
        self.last_loss = self.step_losses[-1] if self.step_losses else None


class TrainingRecord(TrainingLog, Record):
    """training.json: written once the stage's adapter is saved; a resumed run reads the stage back from it."""


class AdapterCheck(Part):
    """Does the stage's adapter change anything? Its reference-set distributions against the base model's
    (engine/drift.adapter_check). An adapter whose weights are zero, or that sits on modules it cannot move, gives
    the base model's outputs, and every measurement of the stage would then describe the base model."""

    active: bool  # False: every row's KL to base is within the tolerance and every top-1 token is the base's
    max_kl: float  # the largest per-row KL to base on the reference set
    top1_changed: NonNegativeInt  # reference rows whose most likely next token differs from the base model's
    rows: NonNegativeInt
    tolerance: float

    def summary(self) -> str:
        """One wording for the log, the stage's notes, the report and the gate."""
        if self.active:
            return (f"the adapter changes the reference distributions (max KL to base {self.max_kl:.3g}, top-1 "
                    f"token changed on {self.top1_changed} of {self.rows} rows)")
        return (f"the adapter has no effect: on all {self.rows} reference rows the KL to base is at most "
                f"{self.max_kl:.2g} (tolerance {self.tolerance:g}) and the top-1 token is the base model's "
                "(zero LoRA weights, or an adapter on modules that do not change the output?)")


class StageRecord(Record):
    """stage.json: written last, it marks the stage complete. Stage 0 is the base model."""

    stage: NonNegativeInt
    checkpoint: str
    task: str | None
    training: TrainingLog | None = None  # stages 1..T
    intervention: Intervention | None = None  # stages 1..T
    fast_path: dict[str, bool] = Field(default_factory=dict)  # the evaluation shortcuts used
    eval_seconds: NonNegativeFloat | None = None
    base_stage_key: str | None = None  # stage 0: the key of the base-stage cache
    reused_from_cache: bool | None = None  # stage 0
    adapter: str | None = None  # `lorawatch evaluate`: the folder of the adapter evaluated at this stage
    # stages 1..T; absent in folders written before the check existed (they read the same, unchecked)
    adapter_check: AdapterCheck | None = None


class Scores(Record):
    """scores.json: accuracy on each task and on the reference set ("reference"), by name."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    __pydantic_extra__: dict[str, Annotated[float, Field(ge=0, le=1)]]

    def accuracy(self) -> dict[str, float]:
        return dict(self.__pydantic_extra__)


class ReferenceStats(Record):
    """reference_stats.json: the checkpoint's drift on the reference set, and each statistic minus stage 0's."""

    kl_mean: float
    kl_p10: float
    kl_p95: float
    entropy_mean: float
    entropy_p10: float
    entropy_p95: float
    margin_mean: float
    margin_p10: float
    margin_p95: float
    kl_mean_delta: float
    kl_p10_delta: float
    kl_p95_delta: float
    entropy_mean_delta: float
    entropy_p10_delta: float
    entropy_p95_delta: float
    margin_mean_delta: float
    margin_p10_delta: float
    margin_p95_delta: float

    def statistics(self) -> dict[str, float]:
        """The statistics themselves, without their deltas."""
        return {k: v for k, v in self.body().items() if not k.endswith("_delta")}


class MonitorPoint(Part):
    """One row of a stage's monitor.jsonl: a live measurement during training."""

    step: int
    kl_mean: float
    entropy_mean: float
    margin_mean: float
    train_loss: float
    threshold: float | None
    above: bool
    signal_value: float | None = None  # the watched signal's value, when it is not KL (monitor.json's `signal`)
    # Every signal's value at this measurement (analysis/signals.py; None where the reference set cannot give one),
    # since schema 3: what a study of which signal warns first reads.
    signals: dict[str, float | None] | None = None


# A JSON number (an int too), never a bool, a string, NaN or infinity.
FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]


@dataclass(frozen=True)
class ExampleDrift:
    """One row of a stage's reference_drift.jsonl: the checkpoint's next-token distribution at a reference row's
    answer position against the base model's (engine/drift.py computes it)."""

    # Strict, finite types: a row read back with a string or a NaN where a number belongs is damage.
    id: StrictStr
    task: StrictStr | None
    kl: FiniteFloat
    entropy: FiniteFloat
    margin: FiniteFloat
    top1_token: StrictInt
    # Since schema 3 (engine/drift_stats.py); None in older run folders, and dp_gold where the row has no gold.
    kl_forward: FiniteFloat | None = None
    same_top1: StrictBool | None = None
    top5_overlap: FiniteFloat | None = None
    dp_gold: FiniteFloat | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "task": self.task, "kl": self.kl, "entropy": self.entropy, "margin": self.margin,
                "top1_token": self.top1_token, "kl_forward": self.kl_forward, "same_top1": self.same_top1,
                "top5_overlap": self.top5_overlap, "dp_gold": self.dp_gold}


@dataclass(frozen=True)
class SpanDrift:
    """One row of a stage's span_drift.jsonl: the checkpoint against the base model over the first
    `reference.span_tokens` tokens of one answer to a reference prompt, teacher-forced (engine/span_drift.py).
    `span` is `answer` (the base model's own answer) or `gold`; every statistic is the mean over the `tokens`
    positions. An optional file within schema 3: absent in older folders and when span_tokens is 0."""

    id: StrictStr
    task: StrictStr | None
    span: Literal["answer", "gold"]
    tokens: Annotated[int, Strict(), Field(gt=0)]
    kl: FiniteFloat  # mean KL(p_k ‖ p_0)
    kl_forward: FiniteFloat  # mean KL(p_0 ‖ p_k)
    same_top1: FiniteFloat  # share of positions whose top-1 token is the base model's
    top5_overlap: FiniteFloat
    dp_token: FiniteFloat  # mean p_k − p_0 of the teacher-forced token

    def to_dict(self) -> dict:
        return {"id": self.id, "task": self.task, "span": self.span, "tokens": self.tokens, "kl": self.kl,
                "kl_forward": self.kl_forward, "same_top1": self.same_top1, "top5_overlap": self.top5_overlap,
                "dp_token": self.dp_token}
