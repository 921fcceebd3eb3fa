"""Continual-learning metrics from a checkpoint-by-task accuracy matrix.

R has shape (T+1, T): row 0 is the base model, row k the checkpoint after training task k; column i is
task i, in training order. Every metric below is an average of entries of R, so it can be computed per
seed and averaged, or computed from seed-averaged R, with the same result.

With tasks numbered 1..T (numpy column i-1 holds task i):

    OP_k            = mean_{i<=k} R[k,i]                 undefined for k=0
    avg_all_k       = mean_i R[k,i]                      every row, seen tasks or not
    BWT_k           = mean_{i<k} (R[k,i] - R[i,i])       undefined for k<=1
    FWT_k           = mean_{i>k} (R[k,i] - R[0,i])       FWT_0 = 0; undefined for k=T
    gain_k          = R[k,k] - R[k-1,k]                  undefined for k=0
    delta_vs_base_k = R[k,k] - R[0,k]                    undefined for k=0
    LA              = mean_{k=1..T} R[k,k]

"Undefined" is None (JSON null, NaN in a DataFrame), never 0: a zero would read as "no forgetting" or
"no transfer", which is a claim the data cannot make.

This module is pure numpy/pandas so that metrics can be recomputed from a CSV on any machine.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lorawatch.rundir import atomic
from lorawatch.rundir.schema import CheckpointMetrics
from lorawatch.errors import DataError, file_problem

# Accuracies that differ by less than this are equal: seed means of fractions carry float noise
# (0.275 against 0.27499999999999997), and a rank or a "below base" must not hang on it.
ACCURACY_TOLERANCE = 1e-9
# A failure-zone threshold is fitted only with at least this many failed and this many healthy checkpoints;
# below that a threshold separates a handful of points by chance, not failed checkpoints from healthy ones.
MIN_CHECKPOINTS_PER_LABEL = 3

BASE_CHECKPOINT = "base"
CHECKPOINT_COLUMN = "checkpoint"
METRIC_COLUMNS: tuple[str, ...] = ("op", "bwt", "fwt", "avg_all", "gain", "delta_vs_base")
FRAME_COLUMNS: tuple[str, ...] = (CHECKPOINT_COLUMN, *METRIC_COLUMNS)

_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PERCENT_HINT = "accuracies are fractions in [0, 1]; if these are percentages, divide them by 100"


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClMetrics:
    tasks: tuple[str, ...]
    per_checkpoint: tuple[CheckpointMetrics, ...]
    # final_avg_accuracy, bwt, fwt, fwt_gem, learning_accuracy, mean_gain, num_tasks
    summary: dict[str, float | int | None]

    def to_dict(self) -> dict:
        """A JSON-ready dict; undefined metrics stay None so that they serialize as null."""
        return {
            "tasks": list(self.tasks),
            "per_checkpoint": [row.model_dump() for row in self.per_checkpoint],
            "summary": dict(self.summary),
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per checkpoint; undefined metrics are NaN so that the metric columns stay float."""
        frame = pd.DataFrame([row.model_dump() for row in self.per_checkpoint], columns=list(FRAME_COLUMNS))
        # A column that is None in every row (e.g. bwt when T=1) would otherwise be dtype object.
        for column in METRIC_COLUMNS:
            frame[column] = frame[column].astype(float)
        return frame


# --- computing the metrics -------------------------------------------------------------------------


def compute_cl_metrics(matrix: np.ndarray | Sequence[Sequence[float]], tasks: Sequence[str]) -> ClMetrics:
    """Metrics for every checkpoint and for the whole run, from R (shape (T+1, T)) and the task names.

    Raises ValueError when R is not (T+1, T) with T >= 1, holds values that are not finite numbers in
    [0, 1], or when `tasks` does not name T distinct tasks.
    """
    task_names = _validate_tasks(tasks)
    R = _validate_matrix(matrix, task_names)
    T = len(task_names)
    # diagonal[i-1] = R[i,i]: each task's accuracy right after it was learned.
    diagonal = np.array([R[k, k - 1] for k in range(1, T + 1)])

    per_checkpoint = []
    for k in range(T + 1):
        seen = R[k, :k]
        # Tasks learned before task k; their reference point is the accuracy right after learning them.
        earlier = slice(0, max(k - 1, 0))
        # Tasks not learned yet; their reference point is the untouched base model.
        future = slice(k, T)
        per_checkpoint.append(
            CheckpointMetrics(
                checkpoint=BASE_CHECKPOINT if k == 0 else task_names[k - 1],
                op=_mean_or_none(seen),
                bwt=_mean_or_none(R[k, earlier] - diagonal[earlier]),
                fwt=_mean_or_none(R[k, future] - R[0, future]),
                avg_all=float(R[k].mean()),
                gain=None if k == 0 else float(R[k, k - 1] - R[k - 1, k - 1]),
                delta_vs_base=None if k == 0 else float(R[k, k - 1] - R[0, k - 1]),
            )
        )

    final = per_checkpoint[T]
    # FWT_k for k = 1..T-1: FWT_0 is 0 by construction and FWT_T is undefined, so neither is averaged.
    fwt_values = [row.fwt for row in per_checkpoint[1:T] if row.fwt is not None]
    summary: dict[str, float | int | None] = {
        "final_avg_accuracy": final.avg_all,
        "bwt": final.bwt,
        "fwt": _mean_or_none(np.array(fwt_values)),
        # GEM (Lopez-Paz & Ranzato, 2017) looks only at the task about to be learned: R[i-1,i] - R[0,i].
        # It is a different number from `fwt` for T >= 3, so it is reported under its own name.
        "fwt_gem": _mean_or_none(np.array([R[i - 1, i - 1] - R[0, i - 1] for i in range(2, T + 1)])),
        "learning_accuracy": float(diagonal.mean()),
        "mean_gain": float(np.mean([row.gain for row in per_checkpoint[1:]])),
        "num_tasks": T,
    }
    return ClMetrics(tasks=tuple(task_names), per_checkpoint=tuple(per_checkpoint), summary=summary)


def compute_unordered_metrics(matrix: np.ndarray | Sequence[Sequence[float]], tasks: Sequence[str],
                              checkpoints: Sequence[str]) -> ClMetrics:
    """What a matrix supports when it is not known which task each checkpoint was trained on (adapters trained
    elsewhere, `lorawatch evaluate` without --trained-on): R has shape (K+1, T), row 0 the base model, any K.

    Only the average over all tasks is defined per checkpoint, and how the final one moved from the base model;
    OP, BWT, FWT, gain and learning accuracy need the training order, so they are None.
    """
    task_names = _validate_tasks(tasks)
    R = np.asarray(matrix, dtype=float)
    if R.ndim != 2 or R.shape[0] < 1 or R.shape[1] != len(task_names) or len(checkpoints) != R.shape[0]:
        raise ValueError(f"the accuracy matrix must have one row per checkpoint ({len(checkpoints)}) and one column "
                         f"per task ({len(task_names)}), got shape {R.shape}")
    per_checkpoint = tuple(CheckpointMetrics(checkpoint=name, op=None, bwt=None, fwt=None, avg_all=float(row.mean()),
                                             gain=None, delta_vs_base=None) for name, row in zip(checkpoints, R))
    summary: dict[str, float | int | None] = {
        "final_avg_accuracy": per_checkpoint[-1].avg_all, "bwt": None, "fwt": None, "fwt_gem": None,
        "learning_accuracy": None, "mean_gain": None, "num_tasks": len(task_names),
    }
    return ClMetrics(tasks=tuple(task_names), per_checkpoint=per_checkpoint, summary=summary)


def _mean_or_none(values: np.ndarray) -> float | None:
    # Every "undefined" in the definitions is an average over an empty set of tasks.
    return float(values.mean()) if values.size else None


def _validate_tasks(tasks: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too, and would silently become one task per character.
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names, not the string {tasks!r}")
    names = list(tasks)
    for name in names:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"task names must be non-empty strings without surrounding spaces, got {name!r}")
    # Checkpoints are labelled "base" then the task names; those labels must identify rows unambiguously.
    if BASE_CHECKPOINT in names:
        raise ValueError(f"{BASE_CHECKPOINT!r} cannot be a task name: it labels the base model's row")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be distinct; repeated: {', '.join(duplicates)}")
    return names


def _validate_matrix(matrix: np.ndarray | Sequence[Sequence[float]], tasks: Sequence[str]) -> np.ndarray:
    try:
        raw = np.asarray(matrix)
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"the accuracy matrix must be rectangular: {err}") from None
    # Checked before converting, so that strings such as "0.5" or None are not coerced into numbers.
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"the accuracy matrix must hold numbers, got dtype {raw.dtype}")
    R = raw.astype(float)
    if R.ndim != 2 or R.shape[1] < 1 or R.shape[0] != R.shape[1] + 1:
        raise ValueError(
            "the accuracy matrix must have shape (T+1, T) with T >= 1 (a base row, then one row per task), "
            f"got shape {R.shape}"
        )
    T = R.shape[1]
    if len(tasks) != T:
        raise ValueError(f"the accuracy matrix has {T} task columns but {len(tasks)} task names were given")
    labels = [BASE_CHECKPOINT, *tasks]

    def entry(k: int, i: int) -> str:
        return f"R[{k}, {i}] (checkpoint {labels[k]!r}, task {tasks[i]!r}) is {R[k, i]}"

    if not np.isfinite(R).all():
        k, i = np.argwhere(~np.isfinite(R))[0]
        raise ValueError(f"{entry(k, i)}, not a finite number")
    if ((R < 0) | (R > 1)).any():
        k, i = np.argwhere((R < 0) | (R > 1))[0]
        raise ValueError(f"{entry(k, i)}, outside [0, 1]; {_PERCENT_HINT}")
    return R


# --- the matrix as CSV -----------------------------------------------------------------------------
#
#   checkpoint,fomc,scienceqa,numgluecm
#   base,0.25,0.52,0.37
#   fomc,0.533,0.66,0.379
#   ...
#
# Rows must follow the column order: a matrix whose rows and columns disagree would produce metrics
# that look plausible and are wrong, so that is an error rather than something to reorder silently.


def read_matrix_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read (tasks, R) from a CSV written by `write_matrix_csv` or by hand.

    Raises DataError naming the file, and the 1-based data row where there is one.
    """
    path = Path(path)
    records = _read_csv_records(path)

    # Blank lines are skipped but still counted, so that "row N" is line N+1 of the file.
    numbered = [(number, record) for number, record in enumerate(records) if any(cell.strip() for cell in record)]
    if not numbered:
        raise DataError(path, f"the file is empty; expected a header `{CHECKPOINT_COLUMN},<task 1>,<task 2>,...`")
    (_, header), rows = numbered[0], numbered[1:]
    header = [cell.strip() for cell in header]

    if header[0] != CHECKPOINT_COLUMN:
        raise DataError(path, f"the first column must be named `{CHECKPOINT_COLUMN}`, found {header[0]!r}")
    tasks = header[1:]
    if not tasks:
        raise DataError(path, f"no task columns; expected `{CHECKPOINT_COLUMN},<task 1>,<task 2>,...`")
    for position, name in enumerate(tasks, start=2):
        if not name:
            raise DataError(path, f"column {position} of the header has no task name")
    if BASE_CHECKPOINT in tasks:
        raise DataError(path, f"{BASE_CHECKPOINT!r} cannot be a task column: it labels the base model's row")
    duplicates = sorted({name for name in tasks if tasks.count(name) > 1})
    if duplicates:
        raise DataError(path, f"duplicate task columns: {', '.join(duplicates)}")

    expected_labels = [BASE_CHECKPOINT, *tasks]
    if len(rows) != len(expected_labels):
        raise DataError(
            path,
            f"found {len(rows)} data rows, expected {len(expected_labels)} "
            f"(`{BASE_CHECKPOINT}`, then one row per task column: {', '.join(expected_labels)})",
        )

    matrix = np.empty((len(expected_labels), len(tasks)))
    for k, ((row_number, record), expected) in enumerate(zip(rows, expected_labels)):
        cells = [cell.strip() for cell in record]
        label = cells[0]
        if label != expected:
            raise DataError(
                path,
                f"checkpoint {label!r} where {expected!r} was expected "
                f"(rows are `{BASE_CHECKPOINT}`, then the task columns in the same order)",
                row=row_number,
            )
        if len(cells) > len(header):
            raise DataError(path, f"{len(cells)} cells but the header has {len(header)} columns", row=row_number)
        # A short row is padded so that its missing cells are reported as empty, by column name.
        cells += [""] * (len(header) - len(cells))
        for i, (task, cell) in enumerate(zip(tasks, cells[1:])):
            matrix[k, i] = _parse_accuracy(path, row_number, label, task, cell)
    return tasks, matrix


def _read_csv_records(path: Path) -> list[list[str]]:
    """The CSV's records; `-` reads standard input."""
    if str(path) == "-":
        return _csv_records(path, io.StringIO(sys.stdin.read().removeprefix("\ufeff"), newline=""))
    problem = file_problem(path, "CSV of accuracies (checkpoint rows by task columns)")
    if problem:
        if path.is_dir() or not path.exists():
            problem = f"the file {'is a directory' if path.is_dir() else 'does not exist'}; expected a CSV of " \
                      "accuracies (checkpoint rows by task columns), or - for standard input"
        raise DataError(path, problem)
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would rename `checkpoint`.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _csv_records(path, handle)
    except UnicodeDecodeError:
        raise DataError(path, "not a UTF-8 text file; expected a CSV of accuracies") from None
    except OSError as err:
        raise DataError(path, f"cannot read the file ({err.strerror or err})") from None


def _csv_records(path: Path, handle) -> list[list[str]]:
    # strict: a quote that is never closed would otherwise swallow every later line into one cell
    reader = csv.reader(handle, strict=True)
    records, line = [], 0
    try:
        for record in reader:
            records.append(record)
            line = reader.line_num
    except csv.Error as err:
        if "end of data" in str(err):
            raise DataError(path, f"a quote (\") opened on line {line + 1} is never closed") from None
        raise DataError(path, f"not a readable CSV file ({err}, line {reader.line_num})") from None
    return records


def _parse_accuracy(path: Path, row_number: int, label: str, task: str, cell: str) -> float:
    where = f"column {task!r} (checkpoint {label!r})"
    expected = "expected an accuracy in [0, 1]"
    if not cell:
        raise DataError(path, f"empty cell in {where}; {expected}", row=row_number)
    try:
        value = float(cell)
    except ValueError:
        raise DataError(path, f"{cell!r} in {where} is not a number; {expected}", row=row_number) from None
    # float() also reads "nan" and "inf", which would propagate into every average that touches them
    if not math.isfinite(value):
        raise DataError(path, f"{cell!r} in {where} is not a finite number; {expected}", row=row_number)
    # ... and 1_0 (as 10) or digits of other scripts: an accuracy is written plainly
    if not _DECIMAL.fullmatch(cell):
        raise DataError(path, f"{cell!r} in {where} is not a number; {expected}", row=row_number)
    if not 0.0 <= value <= 1.0:
        raise DataError(path, f"{cell} in {where} is outside [0, 1]; {_PERCENT_HINT}", row=row_number)
    return value


def write_matrix_csv(path: str | Path, tasks: Sequence[str], matrix: np.ndarray) -> None:
    """Write (tasks, R) so that `read_matrix_csv` returns exactly the same values."""
    task_names = _validate_tasks(tasks)
    # Validate first: a file that read_matrix_csv would reject should not be written at all.
    R = _validate_matrix(matrix, task_names)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([CHECKPOINT_COLUMN, *task_names])
    for label, row in zip([BASE_CHECKPOINT, *task_names], R):
        # repr of a Python float is the shortest string that parses back to the same float.
        writer.writerow([label, *(repr(float(value)) for value in row)])
    atomic.write_text(Path(path), text.getvalue())  # readers see the old matrix or the new one, never half


# --- aggregating over seeds -----------------------------------------------------------------------


def mean_std_frames(frames: Sequence[pd.DataFrame], index_col: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Elementwise mean and standard deviation over frames with the same rows and columns (one per seed).

    `index_col` is kept as the first column; other non-numeric columns are dropped. The std uses ddof=1
    (sample std over seeds) and is 0 for a single frame. NaN (undefined) stays NaN: a metric undefined
    in any seed is undefined in the aggregate, rather than averaged over the seeds that happen to have it.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("mean_std_frames needs at least one frame")
    first = frames[0]
    for n, frame in enumerate(frames):
        if index_col not in frame.columns:
            raise ValueError(f"frame {n} has no column {index_col!r}")
        if list(frame.columns) != list(first.columns):
            raise ValueError(f"frame {n} has columns {list(frame.columns)}, frame 0 has {list(first.columns)}")
        # Rows are matched by position, so the labels must agree position by position.
        if frame[index_col].tolist() != first[index_col].tolist():
            raise ValueError(
                f"frame {n} has {index_col} {frame[index_col].tolist()}, frame 0 has {first[index_col].tolist()}"
            )

    value_columns = []
    for column in first.columns:
        if column == index_col:
            continue
        numeric = [pd.api.types.is_numeric_dtype(frame[column]) for frame in frames]
        if all(numeric):
            value_columns.append(column)
        elif any(numeric):
            # Numbers in one seed and text in another means a broken input, not a label column.
            raise ValueError(f"column {column!r} is numeric in some frames and not in others")

    stacked = np.stack([frame[value_columns].to_numpy(dtype=float, na_value=np.nan) for frame in frames])
    mean = stacked.mean(axis=0)
    if len(frames) > 1:
        std = stacked.std(axis=0, ddof=1)
    else:
        std = np.where(np.isnan(mean), np.nan, 0.0)

    labels = first[index_col].reset_index(drop=True)

    def as_frame(values: np.ndarray) -> pd.DataFrame:
        result = pd.DataFrame(values, columns=value_columns)
        result.insert(0, index_col, labels)
        return result

    return as_frame(mean), as_frame(std)
