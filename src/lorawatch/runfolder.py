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
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from lorawatch import store
from lorawatch.config import ExperimentConfig, build_config
from lorawatch.errors import ConfigError, UserError
from lorawatch.evaluation import Prediction
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


def prepare_run_dir(run_dir: Path, config: ExperimentConfig, *, overwrite: bool, force: bool) -> bool:
    """Create the run folder, or check that an existing one belongs to this config. True when resuming."""
    config_path = run_dir / "config.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        if not config_path.is_file():
            raise UserError(f"{run_dir}: folder is not empty and is not a lorawatch run; choose another --out")
        try:
            recorded = store.read_json(config_path)
        except (OSError, ValueError):
            raise UserError(f"{config_path}: damaged; pass --overwrite to start this run again") from None
        try:  # read through today's schema, so that a field added since (with its default) is no difference
            recorded = build_config(recorded, source=str(config_path)).model_dump(mode="json")
        except ConfigError:
            pass  # an older or hand-edited config: compare what is there
        changed = config_differences(recorded, config.model_dump(mode="json"))
        if changed and not force:
            raise UserError(f"{run_dir}: the run was started with a different config (changed: {', '.join(changed)}); "
                            "use another --out for a new run, --overwrite to start again, or --force to continue")
        return True
    try:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
    return False


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
