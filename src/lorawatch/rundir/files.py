"""A typed handle on one run file: where it is, what it holds, and the two ways to read it: `read` for a run
(missing raises FileNotFoundError, damaged a ValueError: the part is redone) and `load` for a report, `show` or
`compare` (either is the user's one-line error naming the file); `intact` and `intact_rows` are a run's reads
that answer None for a missing or damaged part. layout.py hands them out."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Iterable, TypeVar

import pandas as pd

from lorawatch.rundir import store
from lorawatch.rundir.schema import Part, Record

R = TypeVar("R", bound=Record)
T = TypeVar("T")


@dataclass(frozen=True)
class RecordFile(Generic[R]):
    """A JSON record: checked against its schema when written and when read back."""

    path: Path
    schema: type[R]

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> R:
        return store.read_record(self.path, self.schema)

    def load(self) -> R:
        return store.load_record(self.path, self.schema)

    def intact(self) -> R | None:
        """The record, or None when it is missing or damaged (reported): then the part is redone."""
        if not self.path.is_file():
            return None
        try:
            return self.read()
        except (OSError, ValueError):
            warnings.warn(f"{self.path}: damaged, redoing that part", stacklevel=2)
            return None

    def write(self, data: dict | Part) -> None:
        store.write_record(self.path, self.schema, data.body() if isinstance(data, Part) else data)


@dataclass(frozen=True)
class RowsFile(Generic[T]):
    """A JSON Lines file, one `row_type` per line."""

    path: Path
    row_type: type[T]

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> list[T]:
        return store.read_rows(self.path, self.row_type)

    def load(self) -> list[T]:
        return store.load_rows(self.path, self.row_type)

    def write(self, rows: Iterable[dict]) -> None:
        store.write_rows(self.path, self.row_type, rows)

    def intact_rows(self, expected_ids: list[str]) -> list[T] | None:
        """A part's saved rows, or None when missing, damaged or not those of `expected_ids`: then it is redone."""
        if not self.path.is_file():
            return None
        try:
            rows = self.read()
        except ValueError:  # unreadable JSON or rows that do not fit (pydantic's ValidationError is a ValueError)
            warnings.warn(f"{self.path}: damaged, recomputing it", stacklevel=2)
            return None
        if [r.id for r in rows] != expected_ids:
            warnings.warn(f"{self.path}: does not match the data, recomputing it", stacklevel=2)
            return None
        return rows


@dataclass(frozen=True)
class TableFile:
    """One of the CSV tables (schema.TABLE_COLUMNS names them), checked for its columns when read."""

    path: Path
    name: str

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> pd.DataFrame:
        return store.read_table(self.path, self.name)

    def load(self) -> pd.DataFrame:
        return store.load_table(self.path, self.name)

    def write(self, frame: pd.DataFrame) -> None:
        store.write_csv(self.path, frame)
