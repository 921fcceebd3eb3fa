"""A study: a grid of runs described by one STUDY.yaml, each unit a `lorawatch run` folder.

    name: lr-sweep                      # default: the file's name
    preset: demo                        # or `config: base.yaml`, relative to this file
    set:                                # every unit: dotted config fields, as `lorawatch run --set` changes them
      tasks.*.max_train_rows: 40
    grid:                               # the axes; the units are every combination, times the seeds
      train.learning_rate: [5.0e-4, 1.0e-3]      # an axis over one field: its values
      model:                                      # an axis of named points, each changing several fields
        smollm2: {preset: paper-qwen, model.spec: smollm2-135m-instruct, eval.max_new_tokens: 64}
        gemma3: {preset: paper-gemma, model.spec: gemma3-270m, eval.max_new_tokens: 32}
    seeds: [33, 42]                     # default: the base config's seeds
    resources: {cpus: 1, gpus: 0.5}     # per unit, for --backend ray (fractional GPUs share one)
    retries: 2                          # a unit that crashed is tried again this often, resuming its run folder
    tracking: {backend: mlflow}         # the study as a parent run, each unit a child

A unit is one point of the grid and one seed: its config is built by the same function as `lorawatch run`'s
(`config.with_changes`), so the command line `--plan` writes for it records the same config. The study folder:

    DIR/study.json           the units (name, folder, changes, command line), for `study status`
    DIR/runs/<unit>/         each unit's run folder
    DIR/status/<unit>.json   each unit's state as last recorded by the process running it
    DIR/logs/<unit>.log      each unit's output, when it ran on Ray (and any unexpected error's traceback)
    DIR/report/              `lorawatch report` over every finished unit
    DIR/tracking.json        the study's parent run, with `tracking:` (its units are its children)
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from lorawatch.rundir import atomic
from lorawatch.rundir.layout import RunFolder
from lorawatch.config import (
    MAX_SEED,
    ExperimentConfig,
    TrackingSettings,
    build_config,
    describe_error,
    read_mapping_file,
    with_changes,
)
from lorawatch.errors import ConfigError, UserError
from lorawatch.rundir.lifecycle import config_changes, is_locked

STUDY_RECORD = "study.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    # A unit computes with this many threads wherever it runs, so that the local and the Ray backend give the
    # same numbers to the last digit (a matrix product's sums depend on the thread count).
    cpus: float | None = Field(None, gt=0, description="CPUs (threads) a unit uses; default: all of this "
                                                       "machine's on the local backend, 1 per unit on Ray")
    gpus: float = Field(0, ge=0, description="GPUs a unit needs; a fraction lets several units share one")


class StudySpec(_Strict):
    name: str | None = Field(None, min_length=1)
    preset: str | None = None
    config: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any] | dict[str, dict[str, Any]]] = Field(default_factory=dict)
    seeds: list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]] | None = Field(None, min_length=1)
    resources: Resources = Resources()
    retries: int = Field(2, ge=0)
    tracking: TrackingSettings | None = None

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


@dataclass(frozen=True)
class Unit:
    """One run of the study: a grid point and a seed."""

    name: str
    preset: str | None
    config_file: str | None
    changes: dict[str, Any]  # dotted config fields, in the order they are applied (the seed last)

    def folder(self, study_dir: Path) -> Path:
        return study_dir / "runs" / self.name

    def config(self) -> ExperimentConfig:
        from lorawatch.presets import base_config

        try:
            return with_changes(base_config(self.config_file, self.preset), self.changes, self.preset,
                                source=f"unit {self.name}")
        except ConfigError as error:
            raise ConfigError(str(error) if str(error).startswith("unit ") else f"unit {self.name}: {error}") \
                from None

    def command(self, study_dir: Path) -> str:
        """The same unit as a plain `lorawatch run` command line."""
        argv = ["lorawatch", "run"] + ([self.config_file] if self.config_file else ["--preset", self.preset])
        for field, value in self.changes.items():
            if field == "seeds":
                argv += ["--seeds", ",".join(map(str, value))]
            else:
                argv += ["--set", f"{field}={_as_option(value)}"]
        argv += ["--out", str(self.folder(study_dir))]
        return shlex.join(argv)


def _as_option(value: Any) -> str:
    """A value as `--set` reads it back: JSON, except text that JSON would not read as that same text."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


@dataclass
class Study:
    name: str
    spec: StudySpec
    units: list[Unit]
    source: Path


def load_study_file(path: str | Path) -> Study:
    """Read STUDY.yaml and expand its grid into units; every unit's config is built (and so checked) here."""
    path = Path(path)
    data = read_mapping_file(path, "study file", "a mapping of study fields (preset or config, set, grid, seeds, ...)")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_error(error, str(path))) from None
    if spec.config is not None and spec.preset is not None:
        raise ConfigError(f"{path}: give 'preset' or 'config', not both")
    try:
        units = expand(spec, path.resolve().parent)
        for unit in units:
            unit.config()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return Study(spec.name or path.stem, spec, units, path)


# Config fields the study sets in every unit itself: a value for one in `set` or the grid would be replaced
# without a word (two units of one seed, refused by the report only after they ran), so it is refused up front.
STUDY_FIELDS = {
    "seeds": "the study gives each unit one seed itself (every grid point runs once per seed of the study's "
             "'seeds:' list, default: the base config's); list the seeds there instead, e.g. seeds: [1, 2]",
    "tracking": "the study logs its units where its 'tracking:' (or --track) says, one parent run for them all; "
                "give it there instead",
}


def _study_field(key: str) -> str | None:
    """Why a dotted config field cannot be given in `set` or the grid; None when it can."""
    return STUDY_FIELDS.get(str(key).split(".", 1)[0])


def expand(spec: StudySpec, base: Path) -> list[Unit]:
    """The grid's units: every combination of the axes' points (first axis slowest), then every seed."""
    for key in spec.set:
        if _study_field(key):
            raise ConfigError(f"field 'set.{key}': {_study_field(key)}")
    axes = []
    for axis, points in spec.grid.items():
        if isinstance(points, list):
            if _study_field(axis):
                raise ConfigError(f"grid axis '{axis}': {_study_field(axis)}")
            if not points:
                raise ConfigError(f"grid axis '{axis}' has no values")
            axes.append([(_label(axis, value), {axis: value}) for value in points])
        else:
            if not points:
                raise ConfigError(f"grid axis '{axis}' has no points")
            for name, changes in points.items():
                for key in changes:
                    if _study_field(key):
                        raise ConfigError(f"grid point '{axis}.{name}' sets '{key}': {_study_field(key)}")
            axes.append([(_slug(name), dict(changes)) for name, changes in points.items()])
    units, seen = [], set()
    for combination in itertools.product(*axes):
        changes = dict(spec.set)
        preset, config_file = spec.preset, spec.config
        for _, point in combination:
            point = dict(point)
            if "preset" in point or "config" in point:
                preset, config_file = point.pop("preset", None), point.pop("config", None)
            changes.update(point)
        if config_file is not None:
            config_file = str((base / config_file).resolve())
        elif preset is None:
            raise ConfigError("the study needs a base: 'preset' or 'config', at the top or in every grid point")
        label = "-".join(name for name, _ in combination) or "run"
        seeds = spec.seeds if spec.seeds is not None else _base_seeds(preset, config_file)
        for seed in seeds:
            name = f"{label}-seed{seed}"
            if name in seen:
                raise ConfigError(f"two grid points are both named '{name}'; name the points of an axis apart")
            seen.add(name)
            units.append(Unit(name, preset, config_file, {**changes, "seeds": [seed]}))
    return units


def _base_seeds(preset: str | None, config_file: str | None) -> list[int]:
    from lorawatch.presets import base_config

    return base_config(config_file, preset).seeds


def _label(axis: str, value: Any) -> str:
    """A unit name part: text as it is, anything else as field=value (learning_rate=0.0005)."""
    if isinstance(value, str):
        return _slug(value)
    shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return _slug(f"{axis.rsplit('.', 1)[-1]}={shown}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.,+_-]+", "-", str(text)).strip("-") or "x"


# --- the study folder ----------------------------------------------------------------------------------

def write_plan(study: Study, study_dir: Path) -> Path:
    """study.json (what `study status` reads) and units.txt: one `lorawatch run` line per unit, for any
    scheduler (`parallel < units.txt`, a SLURM array running line $SLURM_ARRAY_TASK_ID)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    # each unit's config, so that `study status` calls a unit done only when its run folder holds that config
    record = {"name": study.name, "source": str(study.source.resolve()),
              "units": [{"name": u.name, "folder": str(u.folder(study_dir)), "changes": u.changes,
                         "command": u.command(study_dir), "config": u.config().model_dump(mode="json")}
                        for u in study.units]}
    atomic.write_text(study_dir / STUDY_RECORD, json.dumps(record, indent=2) + "\n")
    lines = [u.command(study_dir) for u in study.units]
    atomic.write_text(study_dir / "units.txt", "\n".join(lines) + "\n")
    return study_dir / "units.txt"


def status_path(study_dir: Path, unit_name: str) -> Path:
    return study_dir / "status" / f"{unit_name}.json"


def read_status(study_dir: Path, unit_name: str) -> dict:
    try:
        status = json.loads(status_path(study_dir, unit_name).read_text(encoding="utf-8"))
        return status if isinstance(status, dict) else {}
    except (OSError, ValueError):
        return {}


def write_status(study_dir: Path, unit_name: str, **fields: Any) -> dict:
    status = {**read_status(study_dir, unit_name), **fields}
    path = status_path(study_dir, unit_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(status, indent=2) + "\n")
    return status


def run_finished(run_dir: Path) -> bool:
    """A run folder whose run got to its end: costs.json is the last file a run writes."""
    run = RunFolder(run_dir)
    return run.costs.exists() and run.summary_folder.is_dir()


@dataclass
class UnitState:
    name: str
    state: str          # done, running, failed, outdated, interrupted, waiting
    seconds: float | None
    attempts: int
    error: str | None
    folder: Path
    stages: tuple[int, int] | None  # finished stages (base stages included) of all the run's, when it has started


def stages_done(run_dir: Path) -> tuple[int, int] | None:
    """How far a run folder is: its finished stages, of all it will have."""
    try:
        config = json.loads(RunFolder(run_dir).config.read_text(encoding="utf-8"))
        total = (len(config["tasks"]) + 1) * len(config["seeds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return RunFolder(run_dir).finished_stages(), total


def unit_state(study_dir: Path, name: str, folder: Path, config: dict | None = None) -> UnitState:
    """A unit's state from its status file and run folder. With `config` (the unit's, as study.json records it),
    a finished run folder is `done` only when it was made with that config: one left from an earlier study file
    is `outdated` (the next `lorawatch study` fails it), and `failed` once a run of the unit has failed on it."""
    status = read_status(study_dir, name)
    attempts = int(status.get("attempts", 0))
    started, seconds = status.get("started"), status.get("seconds")
    if seconds is None and started and status.get("finished"):
        seconds = status["finished"] - started
    error = None
    if is_locked(folder):
        state = "running"
        seconds = (seconds or 0.0) + time.time() - started if started else None
    elif run_finished(folder) and status.get("state") != "running":
        changed = _changes(folder, config)
        failed = status.get("state") == "failed"
        if failed and (changed != [] or _finished_at(folder) <= float(status.get("finished") or 0)):
            # the unit failed after its folder last finished, or on a folder of another config: its old results
            # are not this unit's (a folder finished since, with the unit's config, by its units.txt line is done)
            state, error = "failed", status.get("error")
        elif changed:
            state, seconds = "outdated", None
            error = ("run folder made with another config than the study gives the unit" if changed is None
                     else f"run folder made with another config (changed: {', '.join(changed)})")
        else:
            state = "done"
    elif status.get("state") == "queued":
        state, seconds = "waiting", None
    elif status.get("state") == "failed":
        state, error = "failed", status.get("error")
    elif status.get("state") == "running" or folder.is_dir():
        # started, and nobody holds its lock: the process running it died (the next study run resumes it)
        state, seconds = "interrupted", None
    else:
        state, seconds = "waiting", None
    return UnitState(name, state, seconds, attempts, error, folder, stages_done(folder))


def _changes(folder: Path, config: dict | None) -> list[str] | None:
    """The fields in which the run folder's config differs from the unit's; None when that cannot be told (a
    damaged config.json, or a unit config this lorawatch cannot read)."""
    if config is None:  # a study.json written before it recorded the units' configs
        return []
    try:
        return config_changes(folder, build_config(config, source=str(folder)))
    except UserError:
        return None


def _finished_at(folder: Path) -> float:
    try:
        return RunFolder(folder).costs.path.stat().st_mtime
    except OSError:
        return 0.0


def study_states(study_dir: Path) -> list[UnitState]:
    path = study_dir / STUDY_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        units = [(u["name"], Path(u["folder"]), u.get("config")) for u in record["units"]]
    except FileNotFoundError:
        raise UserError(f"{study_dir}: not a study folder (no {STUDY_RECORD}; `lorawatch study STUDY.yaml --out "
                        f"{study_dir}` makes one)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: damaged ({exc}); run `lorawatch study STUDY.yaml --out {study_dir}` again") \
            from None
    return [unit_state(study_dir, name, folder, config) for name, folder, config in units]


# --- running one unit ----------------------------------------------------------------------------------

def run_unit(unit: Unit, study_dir: Path, *, console=None, tracking: TrackingSettings | None = None,
             tracking_parent: str | None = None) -> dict:
    """Run (or resume) one unit into its run folder, recording its state; the same in this process and in a Ray
    worker. A user's mistake (bad data, a model that does not load) is a failed unit with its one-line error:
    retrying would repeat it. Anything else is raised, for the backend to retry. With `tracking`, the unit is
    logged live as a child of `tracking_parent`."""
    from lorawatch.recipe.protocol import run_experiment

    folder = unit.folder(study_dir)
    previous = read_status(study_dir, unit.name)
    now = time.time()
    spent = float(previous.get("seconds") or 0.0)
    if previous.get("state") == "running" and previous.get("started"):
        spent += now - previous["started"]  # an attempt that died without a word: until this one began
    write_status(study_dir, unit.name, state="running", started=now, finished=None, error=None, seconds=spent,
                 attempts=int(previous.get("attempts", 0)) + 1, host=socket.gethostname(), pid=os.getpid())

    def ended(state: str, error: str | None = None) -> dict:
        finished = time.time()
        return write_status(study_dir, unit.name, state=state, finished=finished, error=error,
                            seconds=round(spent + finished - now, 3))

    try:
        config = unit.config()
        if RunFolder(folder).config.is_file():
            # `run` would refuse it too, but advise its own options (--overwrite, --force), not the study's way
            changed = config_changes(folder, config)
            if changed:
                raise UserError(f"{folder}: made with another config than the study now gives unit {unit.name} "
                                f"(changed: {', '.join(changed)}); delete that folder (or use another --out) to run "
                                "the unit anew")
        if tracking is not None:  # where a run is logged is not part of its config's meaning (runfolder)
            config = config.model_copy(update={"tracking": tracking})
        run_experiment(config, folder, console=console, tracking_parent=tracking_parent, tracking_name=unit.name)
    except UserError as error:
        return ended("failed", " ".join(str(error).split()))
    except Exception as error:
        # the whole traceback where the unit's output goes; the status keeps its last line
        log = study_dir / "logs" / f"{unit.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as handle:
            handle.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        ended("failed", " ".join(traceback.format_exception_only(type(error), error)[-1].split()))
        raise
    return ended("done")


def unit_finished(unit: Unit, study_dir: Path) -> bool:
    """Finished with the config the study gives it now: a unit whose study file changed since runs again (and
    `run` then says what changed)."""
    folder = unit.folder(study_dir)
    try:
        return run_finished(folder) and not config_changes(folder, unit.config())
    except UserError:  # a damaged config.json: the run says so
        return False


def pending_units(study: Study, study_dir: Path) -> list[Unit]:
    return [u for u in study.units if not unit_finished(u, study_dir)]


def unit_threads(resources: Resources, default: int) -> int:
    return default if resources.cpus is None else max(1, int(resources.cpus))


def run_local(study: Study, study_dir: Path, *, console, on_unit: Callable[[Unit, dict], None],
              tracking: TrackingSettings | None = None, tracking_parent: str | None = None) -> None:
    """The units one after the other in this process, each with the usual live progress (and live tracking)."""
    import torch

    todo = pending_units(study, study_dir)
    threads = torch.get_num_threads()  # the caller's, given back afterwards (lorawatch.run_study runs in-process)
    torch.set_num_threads(unit_threads(study.spec.resources, threads))
    try:
        for index, unit in enumerate(todo, 1):
            console.print(f"[bold]study[/bold] {study.name}: unit {index}/{len(todo)} {unit.name}")
            try:
                status = run_unit(unit, study_dir, console=console, tracking=tracking,
                                  tracking_parent=tracking_parent)
            except Exception:  # recorded by run_unit (its traceback in the unit's log): the other units go on
                status = read_status(study_dir, unit.name)
            on_unit(unit, status)
    finally:
        torch.set_num_threads(threads)
