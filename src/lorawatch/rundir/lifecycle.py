"""The run folder's life cycle: checking a folder against the command before any model work, creating,
resuming or clearing it (--overwrite, --force), what a run records of itself (config, inputs, histories), and
the lock that makes one process its only writer (locks.py).

Which file is where is layout.py's, every read and write store.py's; a stage's files are stage_files.py's.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lorawatch.rundir import atomic, locks, store
from lorawatch.config import ExperimentConfig, build_config
from lorawatch.errors import ConfigError, UserError
from lorawatch.rundir.files import RecordFile, RowsFile
from lorawatch.rundir.layout import ADAPTER_FOLDER, LOCK, RECORDS, RunFolder
from lorawatch.rundir.store import DAMAGED


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    fields = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            fields += config_differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b:
            fields += config_differences(dict(enumerate(a)), dict(enumerate(b)), f"{prefix}{key}.")
        elif a != b:
            fields.append(f"{prefix}{key}")
    return fields


# Config fields whose change would make finished stages mean something else: --force never resumes over them.
MEANING_FIELDS = ("order", "tasks", "reference", "lora", "train", "strategy", "model.dtype")
MOVABLE_FIELDS = ("tasks.*.train", "tasks.*.test", "reference.path")  # data may move if its rows do not change


def is_run_folder(path: Path) -> bool:
    """A folder lorawatch wrote: its marker, or (written before the marker existed) a config.json beside the
    environment or seed folders that only a run writes."""
    run = RunFolder(path)
    if run.marker.is_file():
        return True
    return run.config.is_file() and (run.environment.exists() or bool(run.seeds_on_disk()))


@dataclass(frozen=True)
class FolderPlan:
    mode: str  # "new" | "resume" | "overwrite"
    created: bool  # the folder did not exist before this command
    forced: tuple[str, ...] = ()  # config fields --force resumes over


def plan_run_dir(run_dir: Path, config: ExperimentConfig, inputs: dict, *, overwrite: bool,
                 force: bool) -> FolderPlan:
    """Check the folder against this command, before any model work: the config, and the inputs known without
    the model (data, rules). On disk it only creates an empty folder (for the lock). Nothing is deleted here:
    --overwrite clears the folder once the run's checks have passed and its lock is held (`clear_run_dir`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder")
    created = not run_dir.exists()
    contents = [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []
    if not contents:
        mode, forced = "new", ()
    elif not is_run_folder(run_dir):
        raise UserError(f"{run_dir}: folder is not empty and is not a lorawatch run; choose another --out"
                        + (" (--overwrite deletes only lorawatch run folders)" if overwrite else ""))
    elif overwrite:
        mode, forced = "overwrite", ()
    else:
        _check_same_job(run_dir, inputs)
        _check_versions(run_dir)
        mode, forced = "resume", _check_config(run_dir, config, force)
        check_inputs(run_dir, inputs)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
    if mode == "resume":
        # A read-only folder inside the run would otherwise be found only when a stage, trained, is saved.
        locked = [p for p in [run_dir, *run_dir.rglob("*")] if p.is_dir() and not os.access(p, os.W_OK | os.X_OK)]
        if locked:
            raise UserError(f"{locked[0]}: the run folder is not writable there"
                            + (f" (and {len(locked) - 1} more folders)" if len(locked) > 1 else "")
                            + "; make it writable and run the same command again")
    return FolderPlan(mode, created, tuple(forced))


def _read_record(record: RecordFile | Path) -> dict:
    """A run's own record (a typed one such as inputs.json, or the config at its path): a mapping, or a one-line
    error if it is damaged."""
    path = record.path if isinstance(record, RecordFile) else record
    try:
        recorded = record.read().body() if isinstance(record, RecordFile) else store.read_json(path)
    except DAMAGED:
        recorded = None
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: damaged; pass --overwrite to start this run again")
    return recorded


def _check_versions(run_dir: Path) -> None:
    """A record from a newer lorawatch is refused before any model work (a damaged one is the run's to redo)."""
    for path in run_dir.rglob("*.json"):
        if path.name in RECORDS and ADAPTER_FOLDER not in path.parts:
            try:
                store.read_record(path, RECORDS[path.name])
            except (OSError, ValueError):
                continue


def _check_same_job(run_dir: Path, inputs: dict) -> None:
    """`run` trains its adapters, `evaluate` reads them from elsewhere: neither resumes the other's folder."""
    record = RunFolder(run_dir).inputs
    evaluated = record.exists() and bool(_read_record(record).get("adapters"))
    if evaluated and "adapters" not in inputs:
        raise UserError(f"{run_dir}: made by `lorawatch evaluate` (adapters trained elsewhere); `lorawatch run` does "
                        "not resume it: use another --out, or evaluate it again with `lorawatch evaluate`")
    if not evaluated and "adapters" in inputs and record.exists():
        raise UserError(f"{run_dir}: made by `lorawatch run`; `lorawatch evaluate` does not write into it: use "
                        "another --out")


def config_changes(run_dir: Path, config: ExperimentConfig) -> list[str]:
    """The fields in which `config` differs from the one the run folder was started with."""
    config_path = RunFolder(run_dir).config
    recorded = _read_record(config_path)
    try:  # read through today's schema, so that a field added since (with its default) is no difference
        recorded = build_config(recorded, source=str(config_path)).model_dump(mode="json")
    except ConfigError:
        pass  # an older or hand-edited config: compare what is there
    # Where a run is also logged (tracking) changes no result, nor do the deployed forms measured after its last
    # stage (deploy, each in files of its own): a resume may add, change or drop them.
    return [field for field in config_differences(recorded, config.model_dump(mode="json"))
            if not _matches(field, ("tracking", "overrides.tracking", "deploy", "overrides.deploy"))]


def _check_config(run_dir: Path, config: ExperimentConfig, force: bool) -> list[str]:
    changed = config_changes(run_dir, config)
    if changed and not force:
        raise UserError(f"{run_dir}: the run was started with a different config (changed: {', '.join(changed)}); "
                        "use another --out for a new run, --overwrite to start again, or --force to continue")
    meaning = [f for f in changed if _matches(f, MEANING_FIELDS) and not _matches(f, MOVABLE_FIELDS)]
    if meaning:
        raise UserError(f"{run_dir}: --force cannot resume over {', '.join(meaning)}: finished stages were computed "
                        "with the old values; use another --out, or --overwrite to start again")
    return changed


def _matches(field: str, patterns: tuple[str, ...]) -> bool:
    parts = field.split(".")
    for pattern in patterns:
        want = pattern.split(".")
        if len(parts) >= len(want) and all(w in ("*", p) for w, p in zip(want, parts)):
            return True
    return False


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite, with the lock held: everything but the lock file goes (deleting the lock file would let a
    second writer lock a new one)."""
    for path in run_dir.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def start_run_dir(run_dir: Path, plan: FolderPlan, config: ExperimentConfig, fingerprint: dict,
                  env: dict) -> list[str]:
    """With the lock held and the model loaded: clear (--overwrite), record the config and inputs (a new run),
    or check them (a resumed one). Returns lines to tell the user."""
    notes = []
    run = RunFolder(run_dir)
    if plan.mode == "overwrite":
        clear_run_dir(run_dir)
    if plan.mode == "resume":
        check_inputs(run_dir, fingerprint)
        if plan.forced:
            previous = run.read_config()
            _append_row(run.config_history, {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                             "changed": list(plan.forced), "previous": previous})
            notes.append(f"--force: resuming with changed {', '.join(plan.forced)}; finished stages keep what they "
                         "were computed with, unfinished ones use the new values (recorded in "
                         f"{run.config_history.path.name})")
    if plan.mode != "resume" or plan.forced:
        run.write_config(config.model_dump(mode="json"))
    if plan.mode != "resume" or not run.inputs.exists():
        run.inputs.write(fingerprint)
    atomic.write_text(run.marker, "a lorawatch run folder\n")
    run.environment.write(env)
    _append_row(run.environment_history, {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": plan.mode, **env})
    return notes


def check_inputs(run_dir: Path, inputs: dict) -> None:
    """Refuse to resume a run whose inputs (the parts of `inputs` given) differ from those it recorded: its
    finished stages were computed from the old ones, and --force does not change that."""
    record = RunFolder(run_dir).inputs
    if not record.exists():
        return  # written by a version before fingerprints: recorded from now on
    recorded = _read_record(record)
    changed = config_differences({k: recorded.get(k) for k in inputs}, inputs)
    if changed:
        raise UserError(f"{run_dir}: the run's inputs changed since it started (changed: {', '.join(changed)}); "
                        "finished stages were computed from the old ones: use another --out, or --overwrite to "
                        "start again")


def _append_row(history: RowsFile, row: dict) -> None:
    """History files grow by one line; rewritten whole (atomically) so that a crash never leaves half a line.
    The new line is checked; earlier ones are kept as they were written."""
    store.check_rows(history.row_type, [row])
    rows = store.read_jsonl(history.path) if history.exists() else []
    store.write_jsonl(history.path, [*rows, row])


def abandon_run_dir(run_dir: Path, plan: FolderPlan) -> None:
    """A check failed before anything was recorded: leave no folder behind that would refuse the corrected
    command (only a folder this command created, holding nothing but the lock)."""
    if plan.created and run_dir.is_dir() and all(p.name == LOCK for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def is_locked(run_dir: Path) -> bool:
    """Whether a process holds the run folder's lock (`run_lock`) now: it is being written."""
    return locks.is_held(RunFolder(run_dir).lock)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One writer per run folder: a second one is refused with a one-line error naming the holder."""
    with locks.writer_lock(RunFolder(run_dir).lock, run_dir):
        yield
