"""The run folder: what is written where, always atomically (a temporary name, then a rename), and every
read of it: each JSON file is a typed record of schema.py, checked when written and when read back.

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
          adapter/           the cumulative LoRA adapter after this stage (PEFT format)
        accuracy_matrix.csv  cl_metrics.json  cl_metrics.csv  stability.csv
      summary/               mean and std over seeds of the tables above, summary.json
      base_reference_logprobs.safetensors   the base model's reference distributions
      .lock                  held (flock) by the process writing the run

Each JSON file is a record of schema.py with `schema_version` as its last key; the JSON Lines rows and CSV
tables follow the record beside them. Writers go through write_record/write_rows (checked before writing);
readers through read_record/read_rows (a run: damaged means redo) or load_record/load_rows (a report: damaged
is the user's one-line error). check_run_folder reads a whole folder against the schema.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Iterable, TypeVar

import pandas as pd
from pydantic import BaseModel, TypeAdapter, ValidationError
from safetensors import SafetensorError

from lorawatch.errors import UserError
from lorawatch.rundir.schema import SCHEMA_VERSION, TABLE_COLUMNS, Record

R = TypeVar("R", bound=Record)

_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: readers see the old file or the new one."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results unreadable to the user's group
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# What a damaged file raises when it is read back (JSON, rows, safetensors): it is then recomputed, never trusted.
DAMAGED = (OSError, ValueError, TypeError, KeyError, SafetensorError)


# --- typed records --------------------------------------------------------------------------------------------

class NewerRecordError(UserError):
    """A record written by a newer lorawatch: never mistaken for a damaged file (which a run would redo)."""


def write_record(path: Path, schema: type[Record], data: dict) -> None:
    """Check `data` against its schema (a mismatch is a bug, raised here), then write it with its version last."""
    body = {k: v for k, v in data.items() if k != "schema_version"}
    schema.model_validate(body)
    write_json(path, {**body, "schema_version": SCHEMA_VERSION})


def read_record(path: Path, schema: type[R]) -> R:
    """A record read back and checked. A missing file raises FileNotFoundError; a damaged one (unreadable JSON,
    fields that do not fit the schema) a ValueError; one from a newer lorawatch NewerRecordError."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mapping")
    version = data.get("schema_version", 0)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise NewerRecordError(f"{path}: written by a newer lorawatch (record version {version}, this one reads up "
                               f"to {SCHEMA_VERSION}); upgrade lorawatch to read this run")
    # strict: a value of the wrong JSON type (an accuracy written as `true` or as "0.5") is damage, not a number
    return schema.model_validate(data, strict=True)


@cache
def _rows_adapter(row_type: type) -> TypeAdapter:
    return TypeAdapter(list[row_type])


def check_rows(row_type: type, rows: list[dict]) -> None:
    """Each row fits `row_type` (a dataclass or a schema part); a mismatch on writing is a bug, raised here."""
    _rows_adapter(row_type).validate_python(rows)


def write_rows(path: Path, row_type: type, rows: Iterable[dict]) -> None:
    """A JSON Lines file, each row checked against `row_type` first."""
    rows = list(rows)
    check_rows(row_type, rows)
    write_jsonl(path, rows)


def read_rows(path: Path, row_type: type) -> list:
    """A JSON Lines file's rows as `row_type`; a row that does not fit raises a ValueError (damaged)."""
    # strict for schema parts; the dataclass rows (predictions, drift) declare strict field types themselves
    return _rows_adapter(row_type).validate_python(read_jsonl(path), strict=isinstance(row_type, type) and
                                                   issubclass(row_type, BaseModel) or None)


def read_table(path: Path, name: str) -> pd.DataFrame:
    """One of the CSV tables (TABLE_COLUMNS names them), checked for its columns."""
    frame = pd.read_csv(path)
    missing = [c for c in TABLE_COLUMNS[name] if c not in frame.columns]
    if missing:
        raise ValueError(f"no column {', '.join(missing)}")
    return frame


def describe_problem(path: Path, exc: Exception) -> str:
    """A one-line account of why a run file could not be read: missing, a field that does not fit, unreadable."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: missing; the run folder is incomplete"
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        # escaped: a key with a line break would split the one-line message
        field = repr(".".join(map(str, error["loc"])))[1:-1] or "(the record)"
        return f"{path}: damaged: field '{field}': {error['msg']}; run the same command that made it again to redo it"
    return (f"{path}: damaged or unreadable ({exc.__class__.__name__}: {str(exc)[:120]}); run the same command that "
            "made it again to redo it")


def read_run_file(path: Path, read=read_json):
    """Read one of a finished run's files for a report, `show` or `compare`: a missing or damaged file is the
    user's one-line error naming it (and the field, for a record), not a traceback."""
    try:
        return read(path)
    except (OSError, ValueError) as exc:  # pandas' parser errors and pydantic's ValidationError are ValueErrors too
        raise UserError(describe_problem(path, exc)) from None


def load_record(path: Path, schema: type[R]) -> R:
    """A finished run's record for a report, `show` or `compare` (see read_run_file)."""
    return read_run_file(path, lambda p: read_record(p, schema))


def load_rows(path: Path, row_type: type) -> list:
    return read_run_file(path, lambda p: read_rows(p, row_type))


def load_table(path: Path, name: str) -> pd.DataFrame:
    return read_run_file(path, lambda p: read_table(p, name))


# --- layout -----------------------------------------------------------------------------------------------------


def seed_dir(run_dir: Path, seed: int) -> Path:
    return run_dir / f"seed-{seed}"


def stage_dir(run_dir: Path, seed: int, stage: int) -> Path:
    return seed_dir(run_dir, seed) / f"stage-{stage}"


def summary_dir(run_dir: Path) -> Path:
    return run_dir / "summary"


_NUMBERED = re.compile(r"(seed|stage)-(\d+)")


def _numbered(folder: Path, kind: str) -> list[int]:
    found = [_NUMBERED.fullmatch(p.name) for p in folder.glob(f"{kind}-*") if p.is_dir()] if folder.is_dir() else []
    return sorted(int(m.group(2)) for m in found if m)


def seeds_on_disk(run_dir: Path) -> list[int]:
    """The seeds with a folder in the run (temporary folders such as stage-1.tmp are not units)."""
    return _numbered(run_dir, "seed")


def stages_on_disk(run_dir: Path, seed: int) -> list[int]:
    """The stages of a seed that have a folder, in order."""
    return _numbered(seed_dir(run_dir, seed), "stage")


TRACKER_STORES = ("mlartifacts", "tensorboard")  # the default stores of tracking.py inside a run folder


def check_run_folder(run_dir: Path) -> list[str]:
    """Every file of a run folder read against its schema: one line per problem (none for a sound folder)."""
    from lorawatch.config import build_config
    from lorawatch.errors import ConfigError
    from lorawatch.rundir.schema import RECORDS, ConfigChange, EnvironmentEntry, MonitorPoint
    from lorawatch.engine.drift import ExampleDrift
    from lorawatch.data.tasks.scoring import Prediction

    rows = {"reference_drift.jsonl": ExampleDrift, "monitor.jsonl": MonitorPoint,
            "environment_history.jsonl": EnvironmentEntry, "config_history.jsonl": ConfigChange}
    problems = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(run_dir)
        if "adapter" in relative.parts or relative.parts[0] in TRACKER_STORES:
            continue  # PEFT's own format; a tracker's (copies of the run's files, event files)
        try:
            if path.name == "config.json":
                build_config(read_json(path), source=str(path))
            elif path.name in RECORDS:
                read_record(path, RECORDS[path.name])
            elif path.parent.name == "predictions" and path.suffix == ".jsonl":
                read_rows(path, Prediction)
            elif path.name in rows:
                read_rows(path, rows[path.name])
            elif path.suffix == ".csv" and path.stem.removesuffix("_mean").removesuffix("_std") in TABLE_COLUMNS:
                read_table(path, path.stem.removesuffix("_mean").removesuffix("_std"))
        except (ConfigError, NewerRecordError) as exc:
            problems.append(str(exc))
        except (OSError, ValueError) as exc:
            problems.append(describe_problem(path, exc))
    return problems + missing_stage_files(run_dir)


def missing_stage_files(run_dir: Path) -> list[str]:
    """A finished stage (one with stage.json) lacks none of the files its results are read from: one line per
    missing file. Its adapter is not among them: results are shared without their adapters, and a resume redoes
    a stage whose adapter is missing."""
    problems = []
    for seed in seeds_on_disk(run_dir):
        for stage in stages_on_disk(run_dir, seed):
            folder = stage_dir(run_dir, seed, stage)
            if not (folder / "stage.json").is_file():
                continue
            needed = ["scores.json", "reference_stats.json", "reference_drift.jsonl", "predictions/reference.jsonl"]
            try:
                scores = read_json(folder / "scores.json")
            except (OSError, ValueError):
                scores = {}  # already reported above, file by file
            tasks = [t for t in scores if t not in ("reference", "schema_version")] if isinstance(scores, dict) else []
            needed += [f"predictions/{task}.jsonl" for task in tasks]
            problems += [f"{folder / name}: missing; the stage is marked finished (stage.json) without it"
                         for name in needed if not (folder / name).is_file()]
    return problems
