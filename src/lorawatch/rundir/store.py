"""Reading and writing a run folder's files: each JSON file is a typed record of schema/, checked when written
and when read back; every write is atomic (atomic.py). Which file is where, and the typed handle on each, is
layout.py's.

Writers go through write_record/write_rows (checked before writing); readers through read_record/read_rows (a
run: damaged means redo) or load_record/load_rows (a report: damaged is the user's one-line error). check.py
reads a whole folder against the schema.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Iterable, TypeVar

import pandas as pd
from pydantic import BaseModel, TypeAdapter, ValidationError
from safetensors import SafetensorError

from lorawatch.errors import UserError
from lorawatch.rundir.atomic import write_text
from lorawatch.rundir.schema import SCHEMA_VERSION, TABLE_COLUMNS, Record

R = TypeVar("R", bound=Record)


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_text(path, frame.to_csv(index=False, float_format="%.6g"))


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
