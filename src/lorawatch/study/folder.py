"""The study folder: the plan (study.json, units.txt) and each unit's state, as `lorawatch study status` shows
it, from the unit's status file and its run folder."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorawatch.rundir import atomic
from lorawatch.rundir.layout import RunFolder
from lorawatch.config import build_config
from lorawatch.errors import UserError
from lorawatch.rundir.lifecycle import config_changes, is_locked
from lorawatch.study.spec import StudyPlan

STUDY_RECORD = "study.json"


def write_plan(study: StudyPlan, study_dir: Path) -> Path:
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
