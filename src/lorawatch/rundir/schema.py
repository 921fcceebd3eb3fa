"""What each file of a run folder holds, as typed records: checked when written and when read back.

Every JSON record carries `schema_version` (its last key). A JSON Lines file's rows follow the version of the
record beside them (a stage's predictions, drift and monitor series: its stage.json; the histories: the run's
inputs.json); the CSV tables follow their seed's cl_metrics.json and the summary's summary.json. config.json is
the resolved config, checked by the config schema itself (`config.ExperimentConfig`).

Version 0 is a folder written before records were versioned (no `schema_version` key): it reads the same,
since version 1 only added the key. Version 2 added seed-S/statistics.json and the seed intervals of summary.json
(`ci_low`, `ci_high`); a version-1 folder has neither, and its statistics are computed from its predictions when
they are asked for (verdicts.load_seed_statistics). A record from a newer lorawatch is refused with a line saying so, never
mistaken for a damaged file (which a run would recompute).

Bump SCHEMA_VERSION when a record changes meaning or shape, and teach `store.read_record` to read the old one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt

SCHEMA_VERSION = 2


class Part(BaseModel):
    """A piece of a record: every field named, nothing unknown, no NaN or infinity. Read back strictly
    (store.read_record): a number must be a JSON number, not `true` or a string."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Record(Part):
    """One JSON file of a run folder."""

    schema_version: NonNegativeInt = 0  # 0: written before records were versioned

    def body(self) -> dict:
        """The record as it was written, without its version: what a resumed run carries forward."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"schema_version"})


# --- a stage: stage.json, training.json, scores.json, reference_stats.json ------------------------------------

class Intervention(Part):
    stage: int
    task: str
    action: str
    step: int
    kl: float
    threshold: float
    kept_step: int
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
    optimizer_steps: NonNegativeInt
    stopped_early: bool
    micro_batches: NonNegativeInt
    answer_tokens: NonNegativeInt
    total_tokens: NonNegativeInt
    seconds: NonNegativeFloat
    first_loss: float | None
    last_loss: float | None
    step_losses: list[float]
    learning_rates: list[float]
    monitor: MonitorLog | None = None  # only in a monitored run
    extra_losses: list[float] | None = None  # a strategy's added loss term, per optimizer step
    strategy: StrategyLog | None = None  # only with a strategy other than `none`


class TrainingRecord(TrainingLog, Record):
    """training.json: written once the stage's adapter is saved; a resumed run reads the stage back from it."""


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


# --- the run: costs.json, monitor.json, inputs.json, environment.json and the histories -------------------------

class GenerationCounts(Part):
    rows: NonNegativeInt
    prompt_tokens: NonNegativeInt
    generated_tokens: NonNegativeInt
    decode_steps: NonNegativeInt
    draft_tokens: NonNegativeInt
    accepted_draft_tokens: NonNegativeInt
    forward_tokens: NonNegativeInt
    forward_passes: NonNegativeInt
    lookup_tokens: NonNegativeInt = 0  # absent before pooled decoding
    accepted_lookup_tokens: NonNegativeInt = 0


class FastPathRecord(Part):
    used: dict[str, bool]
    switched_off: dict[str, str]  # part -> why


class CostsRecord(Record):
    """costs.json: what the run (its latest command) spent."""

    wall_seconds: NonNegativeFloat
    phase_seconds: dict[str, NonNegativeFloat]
    generation: dict[str, GenerationCounts]
    peak_rss_bytes: NonNegativeInt
    resumed: bool = False
    fast_path: FastPathRecord | None = None
    base_stage_key: str | None = None


class MonitorParamsRecord(Part):
    every: int
    action: str
    threshold: float | None
    relative: float | None
    patience: int


class Calibration(Part):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    threshold: float
    from_: str = Field(alias="from")  # how it was obtained


class MonitorSettings(Record):
    """monitor.json: the live monitor's settings, with a calibrated threshold worked out."""

    params: MonitorParamsRecord
    calibration: Calibration | None = None


class TaskInputs(Part):
    kind: str
    instruction: str
    train: str
    test: str


class DataInputs(Part):
    tasks: dict[str, TaskInputs]
    reference: str


class AdapterInput(Part):
    path: str
    digest: str  # of adapter_model.safetensors
    trained_on: str | None  # the task, when --trained-on gave it


class Inputs(Record):
    """inputs.json: digests of what the results were computed from."""

    data: DataInputs
    rules: dict[str, int]  # scoring, generation: the versions of lorawatch's rules
    model: dict[str, str] | None = None  # weights: a digest of the loaded weights
    adapters: list[AdapterInput] | None = None  # `lorawatch evaluate`: the adapters evaluated, in stage order


class Environment(Record):
    """environment.json: where the latest start or resume ran."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    versions: dict[str, str | None]
    python: str
    platform: str
    processor: str
    torch_threads: int
    device: str
    dtype: str
    model: dict  # the loaded model's description (models.ModelInfo)


class EnvironmentEntry(Environment):
    """A row of environment_history.jsonl: one per start or resume."""

    time: str
    mode: str  # new | resume | overwrite


class ConfigChange(Part):
    """A row of config_history.jsonl: one per --force."""

    time: str
    changed: list[str]
    previous: dict


# --- tables: cl_metrics.json per seed, summary/summary.json ---------------------------------------------------

class CheckpointMetricsRecord(Part):
    checkpoint: str
    op: float | None
    bwt: float | None
    fwt: float | None
    avg_all: float
    gain: float | None
    delta_vs_base: float | None


class ClMetricsRecord(Record):
    """seed-S/cl_metrics.json (and its CSV twins accuracy_matrix.csv, cl_metrics.csv, stability.csv)."""

    tasks: list[str]
    per_checkpoint: list[CheckpointMetricsRecord]
    summary: dict[str, float | int | None]


class MeanStd(Part):
    mean: float | None
    std: float | None
    ci_low: float | None = None  # Student t interval of the mean over seeds; None for one seed (and before v2)
    ci_high: float | None = None


class Summary(Record):
    """summary/summary.json: the headline numbers per seed and their mean and std over seeds."""

    seeds: list[int]
    per_seed: dict[str, dict[str, float | int | None]]
    mean_std: dict[str, MeanStd]


# --- seed-S/statistics.json: is a difference real? (significance.py, verdicts.py) ---------------------------

Probability = Annotated[float, Field(ge=0, le=1)]
Difference = Annotated[float, Field(ge=-1, le=1)]


class StatisticsParams(Part):
    """The settings the record was computed with (config.StatisticsSettings)."""

    alpha: float = Field(gt=0, lt=1)
    correction: Literal["holm", "none"]
    confidence: float = Field(gt=0, lt=1)
    resamples: PositiveInt
    power: float = Field(gt=0, lt=1)
    seed: NonNegativeInt


class AccuracyInterval(Part):
    """One cell of the accuracy matrix with its Wilson interval."""

    checkpoint: str
    task: str
    n: PositiveInt
    correct: NonNegativeInt
    accuracy: Probability
    low: Probability
    high: Probability


class TaskComparison(Part):
    """Two checkpoints on the same rows of one task: flips, exact McNemar, paired bootstrap, verdict."""

    task: str
    n: PositiveInt
    accuracy_before: Probability
    accuracy_after: Probability
    difference: Difference
    ci_low: Difference  # paired bootstrap interval of the difference
    ci_high: Difference
    improved: NonNegativeInt  # wrong -> right
    regressed: NonNegativeInt  # right -> wrong: the negative flips
    negative_flip_rate: Probability
    p_value: Probability
    p_adjusted: Probability  # over the comparison's tasks (settings.correction)
    verdict: Literal["regressed", "improved", "no detectable change"]


class Comparison(Part):
    """A checkpoint against an earlier one of the same seed, on every task."""

    stage: NonNegativeInt
    checkpoint: str
    against: Literal["previous", "base", "stage"]
    against_stage: NonNegativeInt
    against_checkpoint: str
    tasks: list[TaskComparison]
    # mean KL to base on the reference set, before and after, and the paired bootstrap interval of its change
    kl_before: float | None = None
    kl_after: float | None = None
    kl_ci_low: float | None = None
    kl_ci_high: float | None = None

    def regressed(self) -> list[TaskComparison]:
        return [t for t in self.tasks if t.verdict == "regressed"]


class Interval(Part):
    """A number with its bootstrap interval over test rows."""

    metric: str
    value: float
    low: float
    high: float


class MetricInterval(Interval):
    """A checkpoint's continual-learning metric with its interval."""

    checkpoint: str


class DetectableDrop(Part):
    """The smallest drop a task's test size can show (significance.detectable_drop)."""

    task: str
    n: PositiveInt
    alpha: float = Field(gt=0, lt=1)  # per test, after the correction's strictest step
    min_flips: PositiveInt | None  # negative flips, with no positive one, needed for significance
    floor: Probability | None  # min_flips / n: no smaller drop can be significant
    drop_at_power: Probability | None  # the true drop detected with `power` (best case)
    power: float = Field(gt=0, lt=1)


class StatisticsRecord(Record):
    """seed-S/statistics.json: Wilson intervals of every accuracy, bootstrap intervals of the CL metrics, every
    trained checkpoint against the previous one and the base with a verdict per task, and what each task's test
    size can detect."""

    settings: StatisticsParams
    accuracy: list[AccuracyInterval]
    metrics: list[MetricInterval]
    headline: list[Interval]  # the run's: final average accuracy, BWT, FWT, LA, mean gain, final KL to base
    drift: list[MetricInterval]  # each checkpoint's mean KL to base, with its interval over the reference rows
    comparisons: list[Comparison]
    detectable: list[DetectableDrop]

    def comparison(self, stage: int, against: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.stage == stage and c.against == against), None)


# --- tracking.json: where the run is also logged (tracking.py) ------------------------------------------------

class TrackingDestination(Part):
    backend: str  # mlflow | tensorboard
    uri: str  # MLflow: the tracking URI; TensorBoard: the folder holding the run's log folder
    experiment: str | None  # MLflow, unless the run is a child (it goes into its parent's experiment)
    parent: str | None  # the parent's run id (TensorBoard: its log folder)


class TrackedRun(Part):
    destination: TrackingDestination
    run_id: str  # MLflow: the run id; TensorBoard: the run's log folder
    where: str  # for people: the store and the run
    logged: dict[str, list[NonNegativeInt]]  # seed -> the stages already logged
    finished: bool  # the end metrics and artifacts are logged too


class TrackingRecord(Record):
    """tracking.json: the tracker runs this run folder is logged to, and what each already holds, so that a
    resumed run or a second export continues the same tracker run and logs nothing twice."""

    runs: list[TrackedRun]


# The columns each CSV table must have (more may follow, e.g. the task columns of the accuracy matrix).
TABLE_COLUMNS = {
    "accuracy_matrix": ("checkpoint",),
    "cl_metrics": ("checkpoint", "op", "bwt", "fwt", "avg_all", "gain", "delta_vs_base"),
    "stability": ("checkpoint", "reference_accuracy", "kl_mean", "entropy_mean", "margin_mean"),
}

# Every JSON record of a run folder, by file name: what `lorawatch validate`-style checks and the tests walk.
RECORDS: dict[str, type[Record]] = {
    "stage.json": StageRecord,
    "training.json": TrainingRecord,
    "scores.json": Scores,
    "reference_stats.json": ReferenceStats,
    "costs.json": CostsRecord,
    "monitor.json": MonitorSettings,
    "inputs.json": Inputs,
    "environment.json": Environment,
    "cl_metrics.json": ClMetricsRecord,
    "summary.json": Summary,
    "statistics.json": StatisticsRecord,
    "tracking.json": TrackingRecord,
}
