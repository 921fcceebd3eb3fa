"""A stage's parts in the run folder: writing a finished stage, telling a complete part from a missing or damaged
one, the adapter of a stage, the drafts and base log-probabilities a later stage reads, and the environment a
run used.

Only the errors that mean "this file is damaged" (unreadable JSON, a record or rows that do not fit the schema, a
damaged safetensors file, rows that do not match the data) mark a part for recomputation; any other error is a
bug and is raised. Where each file is, is layout.py's; the run folder's life cycle (creating, resuming, the lock)
is lifecycle.py's.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import signal
import time
import warnings
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file as load_safetensors

from lorawatch.rundir import atomic, store
from lorawatch.rundir.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Stage
from lorawatch.rundir.store import DAMAGED
from lorawatch.data.inputs import RunData
from lorawatch.models.loading import LoadedModel
from lorawatch.engine.drift import summarize


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
    """Fault injection for the resume and concurrency tests: SIGKILL this process when LORAWATCH_CRASH_AT names
    this point; sleep LORAWATCH_PAUSE_SECONDS there when LORAWATCH_PAUSE_AT names it (with LORAWATCH_PAUSE_FILE,
    only the first process that gets there, writing its pid into that file; with LORAWATCH_RESUME_FILE, the pause
    ends as soon as that file exists, so a test can hold a process here until it has seen what it waits for)."""
    if os.environ.get("LORAWATCH_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("LORAWATCH_PAUSE_AT") == name:
        marker = os.environ.get("LORAWATCH_PAUSE_FILE")
        if marker:  # only the first process to get here pauses; it leaves its pid for the test to act on
            try:
                handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(handle, str(os.getpid()).encode())
            os.close(handle)
        until = time.monotonic() + float(os.environ.get("LORAWATCH_PAUSE_SECONDS", "5"))
        resume = os.environ.get("LORAWATCH_RESUME_FILE")
        while time.monotonic() < until and not (resume and os.path.exists(resume)):
            time.sleep(0.05)


def finish_stage(stage: Stage, *, index: int, checkpoint: str, task: str | None, scores: dict, drift: list,
                 base_stats: dict | None, extra: dict) -> dict:
    """Write the stage's summary files; stage.json goes last and marks the stage complete."""
    stats = summarize(drift)
    base_stats = base_stats or stats
    deltas = {f"{key}_delta": value - base_stats[key] for key, value in stats.items()}
    stage.reference_stats.write({**stats, **deltas})
    stage.scores.write(scores)
    stage.record.write({"stage": index, "checkpoint": checkpoint, "task": task, **extra})
    return stats


def stage_complete(stage: Stage, data: RunData, *, adapter: bool) -> bool:
    """A stage is complete when every file it wrote is intact; damaged ones are reported and redone."""
    try:
        for record in (stage.record, stage.scores, stage.reference_stats):
            record.read()
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # unreadable, or fields that do not fit the schema
        warnings.warn(f"{stage.path}: damaged summary file, redoing that stage's missing parts", stacklevel=2)
        return False
    parts = [(t.name, [e.id for e in t.test]) for t in data.tasks] + [("reference", [e.id for e in data.reference])]
    if any(stage.predictions(name).intact_rows(ids) is None for name, ids in parts):
        return False
    if stage.drift.intact_rows([e.id for e in data.reference]) is None:
        return False
    return not adapter or adapter_intact(stage.adapter)


def adapter_intact(folder: Path) -> bool:
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return False
    try:
        load_safetensors(folder / ADAPTER_WEIGHTS)
    except DAMAGED:
        warnings.warn(f"{folder}: damaged adapter, redoing that stage", stacklevel=2)
        return False
    return readable_json(folder / ADAPTER_CONFIG)


def save_adapter(model, folder: Path) -> None:
    # Written beside the final name, then renamed: a crash never leaves a half-written adapter in place.
    with atomic.replace_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        # PEFT writes the target modules in set order, which changes with the interpreter's hash seed: sorted, the
        # same adapter is the same bytes in every run. (Subfolders: the earlier tasks' adapters of strategy olora.)
        for config_path in sorted(tmp.rglob(ADAPTER_CONFIG)):
            config = store.read_json(config_path)
            if isinstance(config.get("target_modules"), list):
                store.write_json(config_path, {**config, "target_modules": sorted(config["target_modules"])})


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
    # only the adapter being loaded: a model may hold others (O-LoRA's frozen task adapters)
    missing = [k for k in getattr(result, "missing_keys", None) or () if "lora_" in k and ".default." in k]
    if getattr(result, "unexpected_keys", None) or missing:  # PEFT only warns; a tensor left out is an adapter lost
        warnings.warn(f"{folder}: adapter does not fit this model, redoing that stage", stacklevel=2)
        return False
    return True


def read_drafts(stage: Stage) -> dict[str, list[int]]:
    """A finished checkpoint's generated tokens by example id: the next checkpoint's drafts."""
    drafts: dict[str, list[int]] = {}
    for predictions in stage.prediction_files():
        try:
            rows = predictions.read()
        except (OSError, ValueError):
            continue  # a draft is only a speed-up; a damaged file just means no drafts
        drafts.update({r.id: r.output_ids for r in rows if r.output_ids})
    return drafts


def readable_json(path: Path) -> bool:
    """The file is there and reads as JSON; a damaged one is reported."""
    if not path.is_file():
        return False
    try:
        store.read_json(path)
        return True
    except (OSError, ValueError):
        warnings.warn(f"{path}: damaged, redoing that part", stacklevel=2)
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
