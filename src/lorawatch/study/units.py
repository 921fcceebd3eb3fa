"""Running the study's units: one unit into its run folder (the same in this process and in a Ray worker), the
units still to run, and the local backend (the units one after the other in this process)."""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Callable

from lorawatch.config import TrackingSettings
from lorawatch.errors import UserError
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir.lifecycle import config_changes
from lorawatch.study.folder import read_status, run_finished, write_status
from lorawatch.study.spec import Resources, StudyPlan, Unit


def run_unit(unit: Unit, study_dir: Path, *, console=None, tracking: TrackingSettings | None = None,
             tracking_parent: str | None = None) -> dict:
    """Run (or resume) one unit into its run folder, recording its state; the same in this process and in a Ray
    worker. A user's mistake (bad data, a model that does not load) is a failed unit with its one-line error:
    retrying would repeat it. Anything else is raised, for the backend to retry. With `tracking`, the unit is
    logged live as a child of `tracking_parent`."""
    from lorawatch.recipe.run import run_experiment

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


def pending_units(study: StudyPlan, study_dir: Path) -> list[Unit]:
    return [u for u in study.units if not unit_finished(u, study_dir)]


def unit_threads(resources: Resources, default: int) -> int:
    return default if resources.cpus is None else max(1, int(resources.cpus))


def run_local(study: StudyPlan, study_dir: Path, *, console, on_unit: Callable[[Unit, dict], None],
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
