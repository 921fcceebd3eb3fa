"""The run folder's layout: which file is where, and the typed handle on each. This is the only module that
spells a run file's name; everything else asks a `RunFolder`, a `SeedFolder` or a `Stage` for the file.

    RUN/
      .lorawatch-run         the marker: --overwrite deletes only folders that have it
      config.json            the resolved config
      inputs.json            digests of what the results were computed from: rows, instructions, reference
                             set, model weights, scoring and generation rules (a resume over others is refused)
      config_history.jsonl   one line per --force: the fields it changed and the config before
      environment.json       library versions, platform, device, dtype, model (of the latest start)
      environment_history.jsonl   the same, one line per start or resume
      monitor.json           the live drift monitor's settings, when one is configured
      costs.json             seconds per phase, tokens, peak memory, the fast-path parts used
      tracking.json          the MLflow/TensorBoard runs the folder is logged to and what each holds (tracking.py)
      mlflow.db  mlartifacts/  tensorboard/   the trackers' default stores, when tracking is on
      seed-<s>/
        stage-<k>/           k = 0 is the base model, k = 1..T the checkpoint after the k-th task
          stage.json         index, checkpoint name, task trained, timings, training log (written last)
          training.json      the training log, written once the adapter is saved
          scores.json        accuracy per task and on the reference set
          predictions/<task>.jsonl, predictions/reference.jsonl   one row per example
          reference_drift.jsonl    per reference row: KL to base, entropy, margin
          reference_stats.json     mean/p10/p95 of each, and deltas against stage 0
          monitor.jsonl      the live monitor's measurements during training, when one is configured
          adapter/           the cumulative LoRA adapter after this stage (PEFT format)
          deployed/<format>/ the checkpoint as llama.cpp runs it in one GGUF format (`lorawatch deploy`):
                             deployed.json (written last), deployed_drift.jsonl, predictions/<task>.jsonl
          ewc_fisher.safetensors, task_adapter.safetensors   what a strategy keeps for later stages
        accuracy_matrix.csv  cl_metrics.json  cl_metrics.csv  stability.csv  statistics.json
      summary/               mean and std over seeds of the tables above (<table>_mean.csv, <table>_std.csv),
                             summary.json
      base_reference_logprobs.safetensors   the base model's reference distributions
      .lock                  held by the process writing the run (locks.py)

Each JSON file is a record of schema/ with `schema_version` as its last key; the JSON Lines rows and CSV tables
follow the record beside them. Each file is reached through a typed handle (files.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from lorawatch.data.tasks.scoring import Prediction
from lorawatch.rundir import schema, store
from lorawatch.rundir.files import RecordFile, RowsFile, TableFile
from lorawatch.rundir.schema import Record

# --- the names ---------------------------------------------------------------------------------------------------

RUN_MARKER = ".lorawatch-run"
LOCK = ".lock"
CONFIG = "config.json"
INPUTS = "inputs.json"
CONFIG_HISTORY = "config_history.jsonl"
ENVIRONMENT = "environment.json"
ENVIRONMENT_HISTORY = "environment_history.jsonl"
MONITOR_SETTINGS = "monitor.json"
COSTS = "costs.json"
TRACKING = "tracking.json"
BASE_LOGPROBS = "base_reference_logprobs.safetensors"
SUMMARY_FOLDER = "summary"
SUMMARY = "summary.json"
SEED_FOLDER = "seed-{}"
STAGE_FOLDER = "stage-{}"
CL_METRICS = "cl_metrics.json"
STATISTICS = "statistics.json"
TABLE_FILE = "{}.csv"
SUMMARY_TABLE_FILE = "{}_{}.csv"  # table, statistic (mean | std)
STAGE = "stage.json"
TRAINING = "training.json"
SCORES = "scores.json"
REFERENCE_STATS = "reference_stats.json"
PREDICTIONS_FOLDER = "predictions"
ROWS_FILE = "{}.jsonl"  # a task's predictions
REFERENCE_DRIFT = "reference_drift.jsonl"
TASK_DRIFT = "task_drift.jsonl"  # a trained stage's drift on its own task's test prompts (since schema 3)
SPAN_DRIFT = "span_drift.jsonl"  # a trained stage's drift over the first tokens of the reference answers (schema 3)
MONITOR_SERIES = "monitor.jsonl"
ADAPTER_FOLDER = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's names inside an adapter folder
ADAPTER_CONFIG = "adapter_config.json"
EWC_FISHER = "ewc_fisher.safetensors"  # strategy ewc: the Fisher diagonal estimated after the stage
TASK_ADAPTER = "task_adapter.safetensors"  # strategy merge: this stage's own task vector
MLFLOW_DB = "mlflow.db"  # the default stores of integrations/tracking.py inside a run (or study) folder
MLFLOW_ARTIFACTS = "mlartifacts"
TENSORBOARD = "tensorboard"
TRACKER_STORES = (MLFLOW_ARTIFACTS, TENSORBOARD)  # folders of a tracker's own files, not the run's
BASE_CACHE_COMPLETE = "complete"  # written last into a base-stage cache entry
DEPLOYED_FOLDER = "deployed"  # a stage's deployed forms, one folder per GGUF format (schema/deployed.py)
DEPLOYED = "deployed.json"
DEPLOYED_DRIFT = "deployed_drift.jsonl"

# Every JSON record of a run folder, by file name: what `lorawatch check` and the tests walk.
RECORDS: dict[str, type[Record]] = {
    STAGE: schema.StageRecord,
    TRAINING: schema.TrainingRecord,
    SCORES: schema.Scores,
    REFERENCE_STATS: schema.ReferenceStats,
    COSTS: schema.CostsRecord,
    MONITOR_SETTINGS: schema.MonitorRecord,
    INPUTS: schema.Inputs,
    ENVIRONMENT: schema.Environment,
    CL_METRICS: schema.ClMetricsRecord,
    SUMMARY: schema.Summary,
    STATISTICS: schema.StatisticsRecord,
    TRACKING: schema.TrackingRecord,
    DEPLOYED: schema.DeployedRecord,
}
# The JSON Lines files beside them, by name (a stage's predictions are found by their folder).
ROWS: dict[str, type] = {REFERENCE_DRIFT: schema.ExampleDrift, TASK_DRIFT: schema.ExampleDrift,
                         SPAN_DRIFT: schema.SpanDrift,
                         MONITOR_SERIES: schema.MonitorPoint, DEPLOYED_DRIFT: schema.DeployedDrift,
                         ENVIRONMENT_HISTORY: schema.EnvironmentEntry, CONFIG_HISTORY: schema.ConfigChange}


def monitor_series(folder: Path) -> RowsFile[schema.MonitorPoint]:
    """The live monitor's measurements in `folder`: a stage's, or a Trainer's output folder (integrations/callback)."""
    return RowsFile(folder / MONITOR_SERIES, schema.MonitorPoint)


# --- the folders ----------------------------------------------------------------------------------------------------

class DeployedForm:
    """stage-<k>/deployed/<format>/: the stage's checkpoint merged, converted to GGUF in one format and evaluated
    through llama.cpp. deployed.json is written last: the format is done for the stage."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"DeployedForm({str(self.path)!r})"

    @property
    def format(self) -> str:
        return self.path.name

    @property
    def record(self) -> RecordFile[schema.DeployedRecord]:
        return RecordFile(self.path / DEPLOYED, schema.DeployedRecord)

    @property
    def drift(self) -> RowsFile[schema.DeployedDrift]:
        return RowsFile(self.path / DEPLOYED_DRIFT, schema.DeployedDrift)

    def predictions(self, task: str) -> RowsFile[Prediction]:
        """One task's outputs under llama.cpp ("reference": the reference set's)."""
        return RowsFile(self.path / PREDICTIONS_FOLDER / ROWS_FILE.format(task), Prediction)

    def finished(self) -> bool:
        return self.record.exists()


class Stage:
    """stage-<k>/ of a seed: one checkpoint's training, evaluation and drift."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Stage({str(self.path)!r})"

    @property
    def record(self) -> RecordFile[schema.StageRecord]:
        """stage.json, written last: the stage is finished."""
        return RecordFile(self.path / STAGE, schema.StageRecord)

    @property
    def training(self) -> RecordFile[schema.TrainingRecord]:
        return RecordFile(self.path / TRAINING, schema.TrainingRecord)

    @property
    def scores(self) -> RecordFile[schema.Scores]:
        return RecordFile(self.path / SCORES, schema.Scores)

    @property
    def reference_stats(self) -> RecordFile[schema.ReferenceStats]:
        return RecordFile(self.path / REFERENCE_STATS, schema.ReferenceStats)

    @property
    def drift(self) -> RowsFile[schema.ExampleDrift]:
        return RowsFile(self.path / REFERENCE_DRIFT, schema.ExampleDrift)

    @property
    def task_drift(self) -> RowsFile[schema.ExampleDrift]:
        """The checkpoint against the base model on the test prompts of the task this stage trained (RL's Razor's
        measurement); absent at stage 0, for `lorawatch evaluate`'s adapters and in folders from before schema 3."""
        return RowsFile(self.path / TASK_DRIFT, schema.ExampleDrift)

    @property
    def span_drift(self) -> RowsFile[schema.SpanDrift]:
        """The checkpoint against the base model over the first `reference.span_tokens` tokens of the base model's
        own answer and of the gold answer of each reference row; absent at stage 0 (the base against itself), with
        span_tokens 0 and in folders from before lorawatch measured it."""
        return RowsFile(self.path / SPAN_DRIFT, schema.SpanDrift)

    @property
    def monitor_series(self) -> RowsFile[schema.MonitorPoint]:
        return monitor_series(self.path)

    @property
    def predictions_folder(self) -> Path:
        return self.path / PREDICTIONS_FOLDER

    def predictions(self, task: str) -> RowsFile[Prediction]:
        """One task's predictions ("reference": the reference set's)."""
        return RowsFile(self.predictions_folder / ROWS_FILE.format(task), Prediction)

    def prediction_files(self) -> list[RowsFile[Prediction]]:
        """Every predictions file there is, in name order."""
        return [RowsFile(p, Prediction) for p in sorted(self.predictions_folder.glob(ROWS_FILE.format("*")))]

    @property
    def adapter(self) -> Path:
        """The cumulative adapter after this stage (a PEFT folder)."""
        return self.path / ADAPTER_FOLDER

    @property
    def deployed_folder(self) -> Path:
        return self.path / DEPLOYED_FOLDER

    def deployed(self, fmt: str) -> DeployedForm:
        """The stage in one deployed format (a GGUF type: f16, q8_0, q4_k_m, ...)."""
        return DeployedForm(self.deployed_folder / fmt)

    def deployed_formats(self) -> list[str]:
        """The formats finished for this stage, in name order (none in folders from before `lorawatch deploy`)."""
        if not self.deployed_folder.is_dir():
            return []
        return sorted(p.name for p in self.deployed_folder.iterdir() if p.is_dir() and DeployedForm(p).finished())

    @property
    def ewc_fisher(self) -> Path:
        return self.path / EWC_FISHER

    @property
    def task_adapter(self) -> Path:
        return self.path / TASK_ADAPTER

    def finished(self) -> bool:
        """stage.json is there: the stage was finished (`stage_files.stage_complete` also checks its files)."""
        return self.record.exists()

    def base_units(self) -> tuple[Path, Path]:
        """What the base-stage cache holds of stage 0, beside the base log-probabilities."""
        return self.predictions_folder, self.drift.path

    def result_files(self, tasks: Iterable[str]) -> list[Path]:
        """The files a finished stage's results are read from (its adapter is not among them: results are
        shared without their adapters)."""
        return [self.scores.path, self.reference_stats.path, self.drift.path, self.predictions("reference").path,
                *(self.predictions(task).path for task in tasks),
                *(part.path for part in (self.task_drift, self.span_drift) if part.exists())]


_NUMBERED = re.compile(r"(seed|stage)-(\d+)")


def _numbered(folder: Path, pattern: str) -> list[int]:
    """The numbers of the folders named `pattern` (temporary folders such as stage-1.tmp are not stages)."""
    kind = pattern.split("-")[0]
    found = [_NUMBERED.fullmatch(p.name) for p in folder.glob(pattern.format("*")) if p.is_dir()] \
        if folder.is_dir() else []
    return sorted(int(m.group(2)) for m in found if m and m.group(1) == kind)


class SeedFolder:
    """seed-<s>/: a seed's stages and its tables."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def stage(self, k: int) -> Stage:
        return Stage(self.path / STAGE_FOLDER.format(k))

    def stages_on_disk(self) -> list[int]:
        """The stages that have a folder, in order."""
        return _numbered(self.path, STAGE_FOLDER)

    @property
    def cl_metrics(self) -> RecordFile[schema.ClMetricsRecord]:
        return RecordFile(self.path / CL_METRICS, schema.ClMetricsRecord)

    @property
    def statistics(self) -> RecordFile[schema.StatisticsRecord]:
        return RecordFile(self.path / STATISTICS, schema.StatisticsRecord)

    def table(self, name: str) -> TableFile:
        """accuracy_matrix, cl_metrics or stability."""
        return TableFile(self.path / TABLE_FILE.format(name), name)


class RunFolder:
    """A run folder: its own records, its seeds, the summary over seeds."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def seed(self, seed: int) -> SeedFolder:
        return SeedFolder(self.path / SEED_FOLDER.format(seed))

    def stage(self, seed: int, k: int) -> Stage:
        return self.seed(seed).stage(k)

    def seeds_on_disk(self) -> list[int]:
        """The seeds with a folder in the run."""
        return _numbered(self.path, SEED_FOLDER)

    def finished_stages(self) -> int:
        """How many stages of any seed are finished (stage.json written)."""
        return sum(self.stage(s, k).finished() for s in self.seeds_on_disk() for k in self.seed(s).stages_on_disk())

    @property
    def marker(self) -> Path:
        return self.path / RUN_MARKER

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def config(self) -> Path:
        """config.json: the resolved config (checked by config.build_config, not by a record schema)."""
        return self.path / CONFIG

    def read_config(self) -> object:
        return store.read_json(self.config)

    def write_config(self, data: dict) -> None:
        store.write_json(self.config, data)

    @property
    def inputs(self) -> RecordFile[schema.Inputs]:
        return RecordFile(self.path / INPUTS, schema.Inputs)

    @property
    def environment(self) -> RecordFile[schema.Environment]:
        return RecordFile(self.path / ENVIRONMENT, schema.Environment)

    @property
    def environment_history(self) -> RowsFile[schema.EnvironmentEntry]:
        return RowsFile(self.path / ENVIRONMENT_HISTORY, schema.EnvironmentEntry)

    @property
    def config_history(self) -> RowsFile[schema.ConfigChange]:
        return RowsFile(self.path / CONFIG_HISTORY, schema.ConfigChange)

    @property
    def monitor_settings(self) -> RecordFile[schema.MonitorRecord]:
        return RecordFile(self.path / MONITOR_SETTINGS, schema.MonitorRecord)

    @property
    def costs(self) -> RecordFile[schema.CostsRecord]:
        return RecordFile(self.path / COSTS, schema.CostsRecord)

    @property
    def tracking(self) -> RecordFile[schema.TrackingRecord]:
        return RecordFile(self.path / TRACKING, schema.TrackingRecord)

    @property
    def base_logprobs(self) -> Path:
        return self.path / BASE_LOGPROBS

    @property
    def summary_folder(self) -> Path:
        return self.path / SUMMARY_FOLDER

    @property
    def summary(self) -> RecordFile[schema.Summary]:
        return RecordFile(self.summary_folder / SUMMARY, schema.Summary)

    def summary_table(self, name: str, stat: str) -> TableFile:
        """A table's mean or std over seeds (`stat`: mean | std)."""
        return TableFile(self.summary_folder / SUMMARY_TABLE_FILE.format(name, stat), name)

    def described_files(self) -> list[Path]:
        """What a run records of itself, for a reader: config, environment, inputs, monitor, histories."""
        return [self.config, self.environment.path, self.inputs.path, self.monitor_settings.path,
                self.environment_history.path, self.config_history.path]


class CachedBaseStage:
    """An entry of the base-stage cache (engine/base_cache.py): stage 0's parts and the base log-probabilities,
    shared by every run of the same key."""

    def __init__(self, path: Path):
        self.path = path
        self.stage = Stage(path)

    @property
    def logprobs(self) -> Path:
        return self.path / BASE_LOGPROBS

    @property
    def complete_marker(self) -> Path:
        return self.path / BASE_CACHE_COMPLETE

    @property
    def lock(self) -> Path:
        return self.path.with_name(self.path.name + LOCK)


def tracker_store(home: Path, backend: str) -> Path:
    """Where a tracker keeps a run logged with its default store: `home`/mlflow.db (its artifacts beside it) or
    `home`/tensorboard/."""
    return home / (MLFLOW_DB if backend == "mlflow" else TENSORBOARD)


def run_file_names() -> list[str]:
    """Every name of a file or folder in a run folder that this module spells (for the test that no other module
    spells one)."""
    return sorted(value for key, value in globals().items() if key.isupper() and isinstance(value, str))
