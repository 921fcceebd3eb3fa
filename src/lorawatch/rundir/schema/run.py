"""The run's records: costs.json, monitor.json, inputs.json, environment.json, tracking.json, and the rows of
the histories (environment_history.jsonl, config_history.jsonl)."""

from __future__ import annotations

from pydantic import ConfigDict, Field, NonNegativeFloat, NonNegativeInt

from lorawatch.rundir.schema.base import Part, Record


class GenerationCounts(Part):
    """What generation cost, in tokens: counted by the engine as it generates (engine/passes.py), summed per
    phase in costs.json; the benchmark reports these. Every count is written, a zero too."""

    rows: NonNegativeInt = 0
    prompt_tokens: NonNegativeInt = 0
    generated_tokens: NonNegativeInt = 0  # each row up to and including its own stop token: the decoding work needed
    # row-steps computed by incremental decoding (the first token of a prefill, or the token after a checked draft,
    # included): generated tokens = decode steps + accepted draft tokens + accepted lookup tokens
    decode_steps: NonNegativeInt = 0
    draft_tokens: NonNegativeInt = 0  # draft tokens checked in a single pass
    accepted_draft_tokens: NonNegativeInt = 0
    forward_tokens: NonNegativeInt = 0  # every position run through the model, padding included
    forward_passes: NonNegativeInt = 0
    lookup_tokens: NonNegativeInt = 0  # tokens proposed by lookup (pooled decoding); absent before pooled decoding
    accepted_lookup_tokens: NonNegativeInt = 0

    def add(self, other: "GenerationCounts") -> None:
        for name in type(self).model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, int]:
        return self.model_dump()


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
    threshold: int | float | None  # an int given to the Trainer callback is recorded as it was given
    relative: float | None
    patience: int
    signal: str = "kl"  # analysis/signals.py; written only when it is not the default (older folders have none)


class Calibration(Part):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    threshold: float
    from_: str = Field(alias="from")  # how it was obtained


class MonitorRecord(Record):
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
