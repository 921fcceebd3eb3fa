"""The run folder's units and their life cycle: the lock, creating or resuming a folder, writing a finished
stage, telling a complete unit from a missing or damaged one, adapters, and the environment a run used.

The layout itself (which file is where) is in store.py; every write goes through its atomic writers.
Only the errors that mean "this file is damaged" (unreadable JSON, a damaged safetensors file, rows that do not
match the data) mark a unit for recomputation; any other error is a bug and is raised.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import platform
import shutil
import signal
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from lorawatch import store
from lorawatch.config import ExperimentConfig, build_config
from lorawatch.errors import ConfigError, UserError
from lorawatch.tasks.scoring import Prediction
from lorawatch.inputs import RunData
from lorawatch.models import LoadedModel
from lorawatch.stability import ExampleDrift, summarize

# What a damaged file raises when it is read back: it is then recomputed, never trusted.
DAMAGED = (OSError, ValueError, TypeError, KeyError, SafetensorError)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_LOGPROBS = "base_reference_logprobs.safetensors"


def environment(loaded: LoadedModel) -> dict:
    versions = {}
    for package in ("lorawatch", "torch", "transformers", "peft", "numpy", "pandas"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": loaded.info.device,
        "dtype": loaded.info.dtype,
        "model": loaded.info.to_dict(),
    }


def crash_point(name: str) -> None:
    """Fault injection for the resume tests: SIGKILL this process when LORAWATCH_CRASH_AT names this point."""
    if os.environ.get("LORAWATCH_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def read_unit(path: Path, expected_ids: list[str], row_type: type) -> list | None:
    """A unit's saved rows (predictions or drift), or None when missing or damaged: then it is redone."""
    if not path.is_file():
        return None
    try:
        rows = [row_type(**row) for row in store.read_jsonl(path)]
    except (ValueError, TypeError, KeyError):
        warnings.warn(f"{path}: damaged, recomputing it", stacklevel=2)
        return None
    if [r.id for r in rows] != expected_ids:
        warnings.warn(f"{path}: does not match the data, recomputing it", stacklevel=2)
        return None
    return rows


def finish_stage(folder: Path, *, stage: int, checkpoint: str, task: str | None, scores: dict, drift: list,
                 base_stats: dict | None, extra: dict) -> dict:
    """Write the stage's summary files; stage.json goes last and marks the stage complete."""
    stats = summarize(drift)
    base_stats = base_stats or stats
    deltas = {f"{key}_delta": value - base_stats[key] for key, value in stats.items()}
    store.write_json(folder / "reference_stats.json", {**stats, **deltas})
    store.write_json(folder / "scores.json", scores)
    store.write_json(folder / "stage.json", {"stage": stage, "checkpoint": checkpoint, "task": task, **extra})
    return stats


def stage_complete(folder: Path, data: RunData, *, adapter: bool) -> bool:
    """A stage is complete when every file it wrote is intact; damaged ones are reported and redone."""
    try:
        if not all(isinstance(store.read_json(folder / name), dict)
                   for name in ("stage.json", "scores.json", "reference_stats.json")):
            return False
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        warnings.warn(f"{folder}: damaged summary file, redoing that stage's missing parts", stacklevel=2)
        return False
    parts = [(t.name, [e.id for e in t.test]) for t in data.tasks] + [("reference", [e.id for e in data.reference])]
    if any(read_unit(folder / "predictions" / f"{name}.jsonl", ids, Prediction) is None for name, ids in parts):
        return False
    if read_unit(folder / "reference_drift.jsonl", [e.id for e in data.reference], ExampleDrift) is None:
        return False
    return not adapter or adapter_intact(folder / "adapter")


def adapter_intact(folder: Path) -> bool:
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return False
    try:
        load_safetensors(folder / ADAPTER_WEIGHTS)
    except DAMAGED:
        warnings.warn(f"{folder}: damaged adapter, redoing that stage", stacklevel=2)
        return False
    return readable_json(folder / "adapter_config.json")


def save_adapter(model, folder: Path) -> None:
    # Written beside the final name, then renamed: a crash never leaves a half-written adapter in place.
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_adapter_weights(model, folder: Path) -> bool:
    """Put a saved adapter's weights into the model's adapter; False (with a warning) if it is damaged."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return False
    try:
        state = load_safetensors(path)
    except DAMAGED as exc:
        warnings.warn(f"{folder}: damaged adapter ({exc.__class__.__name__}), redoing that stage", stacklevel=2)
        return False
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError:  # tensors of other shapes: an adapter of another rank or model
        warnings.warn(f"{folder}: adapter does not fit this model, redoing that stage", stacklevel=2)
        return False
    if getattr(result, "unexpected_keys", None):
        warnings.warn(f"{folder}: adapter does not fit this model, redoing that stage", stacklevel=2)
        return False
    return True


def read_drafts(folder: Path) -> dict[str, list[int]]:
    """A finished checkpoint's generated tokens by example id: the next checkpoint's drafts."""
    drafts: dict[str, list[int]] = {}
    for path in sorted((folder / "predictions").glob("*.jsonl")):
        try:
            rows = store.read_jsonl(path)
        except (OSError, ValueError):
            continue  # a draft is only a speed-up; a damaged file just means no drafts
        drafts.update({r["id"]: r["output_ids"] for r in rows if isinstance(r, dict) and r.get("output_ids")})
    return drafts


def readable_json(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        store.read_json(path)
        return True
    except (OSError, ValueError):
        warnings.warn(f"{path}: damaged, redoing that unit", stacklevel=2)
        return False


def read_logprobs(path: Path, rows: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        tensor = load_safetensors(path)["logprobs"]
    except DAMAGED:
        warnings.warn(f"{path}: damaged, recomputing the base reference pass", stacklevel=2)
        return None
    return tensor if tensor.shape[0] == rows else None


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


RUN_MARKER = ".lorawatch-run"  # in every run folder: --overwrite deletes only folders that have it
INPUTS = "inputs.json"  # what the results were computed from: data, model weights, scoring and generation rules
CONFIG_HISTORY = "config_history.jsonl"  # one line per --force: what changed and what was kept
ENVIRONMENT_HISTORY = "environment_history.jsonl"  # one line per start or resume of the run
# Config fields whose change would make finished stages mean something else: --force never resumes over them.
MEANING_FIELDS = ("order", "tasks", "reference", "lora", "train", "model.dtype")
MOVABLE_FIELDS = ("tasks.*.train", "tasks.*.test", "reference.path")  # data may move if its rows do not change


def is_run_folder(path: Path) -> bool:
    """A folder lorawatch wrote: its marker, or (written before the marker existed) a config.json beside the
    environment or seed folders that only a run writes."""
    if (path / RUN_MARKER).is_file():
        return True
    return (path / "config.json").is_file() and ((path / "environment.json").is_file() or
                                                 any(p.is_dir() for p in path.glob("seed-*")))


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
    contents = [p for p in run_dir.iterdir() if p.name != ".lock"] if run_dir.is_dir() else []
    if not contents:
        mode, forced = "new", ()
    elif not is_run_folder(run_dir):
        raise UserError(f"{run_dir}: folder is not empty and is not a lorawatch run; choose another --out"
                        + (" (--overwrite deletes only lorawatch run folders)" if overwrite else ""))
    elif overwrite:
        mode, forced = "overwrite", ()
    else:
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


def _read_record(path: Path) -> dict:
    """A run's own record (config.json, inputs.json): a mapping, or a one-line error if it is damaged."""
    try:
        recorded = store.read_json(path)
    except DAMAGED:
        recorded = None
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: damaged; pass --overwrite to start this run again")
    return recorded


def _check_config(run_dir: Path, config: ExperimentConfig, force: bool) -> list[str]:
    config_path = run_dir / "config.json"
    recorded = _read_record(config_path)
    try:  # read through today's schema, so that a field added since (with its default) is no difference
        recorded = build_config(recorded, source=str(config_path)).model_dump(mode="json")
    except ConfigError:
        pass  # an older or hand-edited config: compare what is there
    changed = config_differences(recorded, config.model_dump(mode="json"))
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
        if path.name == ".lock":
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
    if plan.mode == "overwrite":
        clear_run_dir(run_dir)
    if plan.mode == "resume":
        check_inputs(run_dir, fingerprint)
        if plan.forced:
            previous = store.read_json(run_dir / "config.json")
            _append_jsonl(run_dir / CONFIG_HISTORY, {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                     "changed": list(plan.forced), "previous": previous})
            notes.append(f"--force: resuming with changed {', '.join(plan.forced)}; finished stages keep what they "
                         "were computed with, unfinished ones use the new values (recorded in "
                         f"{CONFIG_HISTORY})")
    if plan.mode != "resume" or plan.forced:
        store.write_json(run_dir / "config.json", config.model_dump(mode="json"))
    if plan.mode != "resume" or not (run_dir / INPUTS).is_file():
        store.write_json(run_dir / INPUTS, fingerprint)
    store.atomic_write_text(run_dir / RUN_MARKER, "a lorawatch run folder\n")
    store.write_json(run_dir / "environment.json", env)
    _append_jsonl(run_dir / ENVIRONMENT_HISTORY, {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": plan.mode,
                                                 **env})
    return notes


def check_inputs(run_dir: Path, inputs: dict) -> None:
    """Refuse to resume a run whose inputs (the parts of `inputs` given) differ from those it recorded: its
    finished stages were computed from the old ones, and --force does not change that."""
    path = run_dir / INPUTS
    if not path.is_file():
        return  # written by a version before fingerprints: recorded from now on
    recorded = _read_record(path)
    changed = config_differences({k: recorded.get(k) for k in inputs}, inputs)
    if changed:
        raise UserError(f"{run_dir}: the run's inputs changed since it started (changed: {', '.join(changed)}); "
                        "finished stages were computed from the old ones: use another --out, or --overwrite to "
                        "start again")


def _append_jsonl(path: Path, row: dict) -> None:
    """History files grow by one line; rewritten whole (atomically) so that a crash never leaves half a line."""
    rows = store.read_jsonl(path) if path.is_file() else []
    store.write_jsonl(path, [*rows, row])


def abandon_run_dir(run_dir: Path, plan: FolderPlan) -> None:
    """A check failed before anything was recorded: leave no folder behind that would refuse the corrected
    command (only a folder this command created, holding nothing but the lock)."""
    if plan.created and run_dir.is_dir() and all(p.name == ".lock" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


@contextmanager
def run_lock(run_dir: Path):
    """One writer per run folder. The OS drops the lock when its holder dies, so a crash never leaves it stuck."""
    handle = open(run_dir / ".lock", "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{run_dir}: already being written by {holder}; wait for it to finish or use another --out")
        handle.seek(0)
        handle.truncate()
        handle.write(f"lorawatch pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()
