"""The trackers: MLflow and TensorBoard behind one interface (`Tracker`), and opening a tracker run, a study's
parent run among them. mlflow and tensorboard are imported only when a tracker is opened."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Protocol

from lorawatch.config import TrackingSettings
from lorawatch.errors import UserError
from lorawatch.integrations.tracking_destination import destination, require, sqlite_file
from lorawatch.rundir.layout import MLFLOW_ARTIFACTS

# MLflow's limits (mlflow.utils.validation): longer values are refused, not truncated, by the server.
_MAX_PARAM_VALUE, _MAX_KEY, _PARAMS_PER_BATCH, _METRICS_PER_BATCH = 6000, 250, 100, 1000


class Tracker(Protocol):
    """One tracker run: parameters, metrics at a step, artifacts (files), and a final status on closing
    (FINISHED, FAILED or KILLED; TensorBoard has none)."""

    run_id: str  # MLflow: the run id; TensorBoard: the run's log folder
    where: str  # for people: the store and the run
    new: bool  # created by this open (a reopened run already holds its parameters)

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, folder: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker:
    # MlflowClient, not the fluent mlflow.start_run: no global active run, so a study's parent and its
    # children (and several runs of one process) can be open at once.
    def __init__(self, uri: str, experiment: str | None, name: str, *, parent: str | None, run_id: str | None,
                 tags: dict[str, str]):
        require("mlflow")
        import mlflow
        from mlflow.exceptions import MlflowException

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
        database = sqlite_file(uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)  # SQLite does not create the database's folder
        self._entities = mlflow.entities
        self.client = mlflow.MlflowClient(uri)
        try:
            self.new = run_id is None or not self._reopen(run_id)
            if self.new:
                if parent is not None:
                    experiment_id = self.client.get_run(parent).info.experiment_id
                    tags = {**tags, "mlflow.parentRunId": parent}
                else:
                    experiment_id = self._experiment(experiment or name, database)
                run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        except MlflowException as exc:
            raise UserError(f"mlflow ({uri}): {str(exc).splitlines()[0]}") from None
        self.run_id = run_id
        name = self.client.get_experiment(self.client.get_run(run_id).info.experiment_id).name
        self.where = f"mlflow {uri} · experiment {name!r} · run {run_id}"

    def _reopen(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            if self.client.get_run(run_id).info.lifecycle_stage == "deleted":
                return False
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return False  # recorded, but not in this store (deleted, or a new database): start a new run
        self.client.update_run(run_id, status="RUNNING")
        return True

    def _experiment(self, name: str, database: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            # Beside the database, not MLflow's default ./mlartifacts in whatever folder the command ran from.
            location = None if database is None else (database.parent / MLFLOW_ARTIFACTS).as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        if found.lifecycle_stage == "deleted":
            raise UserError(f"mlflow: experiment {name!r} is deleted; restore it (mlflow experiments restore) or "
                            "give another experiment name")
        return found.experiment_id

    def log_params(self, params: dict[str, str]) -> None:
        items = [self._entities.Param(_key(key), value[:_MAX_PARAM_VALUE]) for key, value in params.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [self._entities.Metric(_key(key), float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + _METRICS_PER_BATCH])

    def log_artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder or None)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.new = not log_dir.is_dir()
        self.run_id, self.where = str(log_dir), f"tensorboard {log_dir}"
        # A reopened folder gets a second event file; TensorBoard reads them all, in order.
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_params(self, params: dict[str, str]) -> None:
        rows = "".join(f"| {key} | {value} |\n" for key, value in params.items())
        self.writer.add_text("params", "| parameter | value |\n|---|---|\n" + rows)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_artifact(self, path: Path, folder: str) -> None:
        # TensorBoard has no artifacts: the file is copied beside the events, and a text one is shown in the
        # TEXT tab (indented: Markdown's code block, so that a CSV keeps its lines).
        target = Path(self.run_id) / "artifacts" / folder / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        if path.suffix in (".csv", ".json"):
            text = path.read_text(encoding="utf-8")
            self.writer.add_text(f"{folder}/{path.name}".lstrip("/"), "".join(f"    {line}\n"
                                                                              for line in text.splitlines()))

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


def _key(key: str) -> str:
    # MLflow's allowed characters; a task name or a recorded override (`tasks.*.max_train_rows`) may hold others
    # (TensorBoard takes any tag).
    return re.sub(r"[^\w\-. /:]", "_", key)[:_MAX_KEY]


def open_tracker(settings: TrackingSettings, home: Path, name: str, *, parent: str | None = None,
                 run_id: str | None = None, tags: dict[str, str] | None = None) -> Tracker:
    """Open a new tracker run named `name`, or reopen `run_id`. `home`: the folder of the default store (a run
    folder, or a study folder). `parent`: the parent's run id (TensorBoard: its log folder)."""
    where = destination(settings, home, name, parent)
    if settings.backend == "tensorboard":
        return TensorBoardTracker(Path(run_id) if run_id else Path(where["uri"]) / name)
    return MlflowTracker(where["uri"], where["experiment"], name, parent=parent, run_id=run_id, tags=tags or {})


def open_parent(settings: TrackingSettings, home: Path, name: str, params: dict, *,
                run_id: str | None = None) -> Tracker:
    """A study's parent run (reopened when `run_id` is given); its children are opened with `parent=run_id`."""
    tracker = open_tracker(settings, home, name, run_id=run_id)
    if tracker.new:
        tracker.log_params(flatten_params(params))
    return tracker


def flatten_params(data: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys (`train.learning_rate`, `tasks.0.name`); a list of plain values stays one value (`seeds`)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            value = dict(enumerate(value))
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat
