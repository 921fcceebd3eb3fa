"""The run folder: what is written where, always atomically (a temporary name, then a rename).

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
      seed-<s>/
        stage-<k>/           k = 0 is the base model, k = 1..T the checkpoint after the k-th task
          stage.json         index, checkpoint name, task trained, timings, training log (written last)
          training.json      the training log, written once the adapter is saved
          scores.json        accuracy per task and on the reference set
          predictions/<task>.jsonl, predictions/reference.jsonl   one row per example
          reference_drift.jsonl    per reference row: KL to base, entropy, margin
          reference_stats.json     mean/p10/p95 of each, and deltas against stage 0
          adapter/           the cumulative LoRA adapter after this stage (PEFT format)
        accuracy_matrix.csv  cl_metrics.json  cl_metrics.csv  stability.csv
      summary/               mean and std over seeds of the tables above, summary.json
      base_reference_logprobs.safetensors   the base model's reference distributions
      .lock                  held (flock) by the process writing the run
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import pandas as pd

from lorawatch.errors import UserError

_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: readers see the old file or the new one."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRORS:
            # disk full, read-only or forbidden: the user's environment, not a bug; finished files stay
            raise UserError(f"{path}: cannot write ({exc.strerror or exc}); finished results are kept, "
                            "free the problem and run the same command again to resume") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copytree(source: Path, target: Path) -> None:
    """Copy a folder so that `target` appears whole or not at all."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def write_json(path: Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))


def read_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def read_run_file(path: Path, read=read_json):
    """Read one of a finished run's files for a report, `show` or `compare`: a missing or damaged file is the
    user's one-line error naming it, not a traceback."""
    try:
        return read(path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the run folder is incomplete") from None
    except (OSError, ValueError) as exc:  # pandas' parser errors are ValueErrors too
        raise UserError(f"{path}: damaged or unreadable ({exc.__class__.__name__}); run the same command that "
                        "made it again to redo it") from None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def seed_dir(run_dir: Path, seed: int) -> Path:
    return run_dir / f"seed-{seed}"


def stage_dir(run_dir: Path, seed: int, stage: int) -> Path:
    return seed_dir(run_dir, seed) / f"stage-{stage}"


def summary_dir(run_dir: Path) -> Path:
    return run_dir / "summary"
