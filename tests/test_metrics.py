"""Tests for lorawatch.analysis.metrics: hand-computed matrices, CSV I/O, seed aggregation, and the published results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorawatch.errors import DataError
from tiny import cli
from lorawatch.rundir.schema import CheckpointMetrics
from lorawatch.analysis.metrics import (
    ClMetrics,
    compute_cl_metrics,
    mean_std_frames,
    read_matrix_csv,
    write_matrix_csv,
)

# The paper's published original-order results, kept with the tests so that the checks against the paper run
# in CI too (the paper's per-step results for its original task order: accuracies, drift, OP/BWT/FWT).
PAPER_CSV = Path(__file__).resolve().parent / "data" / "paper_results_original_order.csv"
PAPER_MODELS = ("qwen", "gemma", "llama")
# Training order of the published run. The paper's CSV lists the task columns in a different
# (alphabetical) order, so the matrix must be built by name, never by column position.
PAPER_TASKS = ("fomc", "scienceqa", "numgluecm")
TOLERANCE = 0.002  # the paper prints three decimals of seed means

METRIC_FIELDS = ("op", "bwt", "fwt", "avg_all", "gain", "delta_vs_base")
SUMMARY_KEYS = {"final_avg_accuracy", "bwt", "fwt", "fwt_gem", "learning_accuracy", "mean_gain", "num_tasks"}


# --- hand-computed matrices ----------------------------------------------------------------------
# Values are multiples of 1/8 so that the expected numbers below are easy to check by hand.

# T = 1: nothing to forget, nothing left to transfer to.
R1 = [[0.25], [0.75]]
EXPECTED_1 = {
    # checkpoint: (op, bwt, fwt, avg_all, gain, delta_vs_base)
    "base": (None, None, 0.0, 0.25, None, None),
    "a": (0.75, None, None, 0.75, 0.5, 0.5),
}
SUMMARY_1 = dict(final_avg_accuracy=0.75, bwt=None, fwt=None, fwt_gem=None, learning_accuracy=0.75,
                 mean_gain=0.5, num_tasks=1)

# T = 2
R2 = [
    [0.5, 0.25],
    [0.75, 0.5],
    [0.5, 1.0],
]
EXPECTED_2 = {
    "base": (None, None, 0.0, 0.375, None, None),
    "a": (0.75, None, 0.25, 0.625, 0.25, 0.25),
    "b": (0.75, -0.25, None, 0.75, 0.5, 0.75),
}
# For T = 2 both FWT conventions reduce to R[1,2] - R[0,2].
SUMMARY_2 = dict(final_avg_accuracy=0.75, bwt=-0.25, fwt=0.25, fwt_gem=0.25, learning_accuracy=0.875,
                 mean_gain=0.375, num_tasks=2)

# T = 3, chosen so that the two FWT conventions differ.
R3 = [
    [0.25, 0.5, 0.125],
    [0.75, 0.625, 0.375],
    [0.5, 0.875, 0.5],
    [0.625, 0.75, 1.0],
]
EXPECTED_3 = {
    "base": (None, None, 0.0, 0.875 / 3, None, None),
    # FWT_1 = mean(0.625 - 0.5, 0.375 - 0.125)
    "a": (0.75, None, 0.1875, 1.75 / 3, 0.5, 0.5),
    # BWT_2 = 0.5 - 0.75; FWT_2 = 0.5 - 0.125
    "b": (0.6875, -0.25, 0.375, 0.625, 0.25, 0.375),
    # BWT_3 = mean(0.625 - 0.75, 0.75 - 0.875)
    "c": (2.375 / 3, -0.125, None, 2.375 / 3, 0.5, 0.875),
}
# fwt = mean(FWT_1, FWT_2) = mean(0.1875, 0.375); fwt_gem = mean(0.625 - 0.5, 0.5 - 0.125)
SUMMARY_3 = dict(final_avg_accuracy=2.375 / 3, bwt=-0.125, fwt=0.28125, fwt_gem=0.25, learning_accuracy=0.875,
                 mean_gain=1.25 / 3, num_tasks=3)


def assert_same(actual: float | int | None, expected: float | int | None, what: str) -> None:
    if expected is None:
        assert actual is None, f"{what}: expected None (undefined), got {actual}"
    else:
        assert actual is not None, f"{what}: expected {expected}, got None"
        assert actual == pytest.approx(expected, abs=1e-12), what


@pytest.mark.parametrize(
    ("matrix", "tasks", "expected", "summary"),
    [
        (R1, ("a",), EXPECTED_1, SUMMARY_1),
        (R2, ("a", "b"), EXPECTED_2, SUMMARY_2),
        (R3, ("a", "b", "c"), EXPECTED_3, SUMMARY_3),
    ],
    ids=["T1", "T2", "T3"],
)
def test_hand_computed(matrix, tasks, expected, summary):
    metrics = compute_cl_metrics(matrix, tasks)

    assert isinstance(metrics, ClMetrics)
    assert metrics.tasks == tasks
    assert [row.checkpoint for row in metrics.per_checkpoint] == list(expected)
    for row in metrics.per_checkpoint:
        assert isinstance(row, CheckpointMetrics)
        for field, value in zip(METRIC_FIELDS, expected[row.checkpoint]):
            assert_same(getattr(row, field), value, f"{row.checkpoint}.{field}")
    assert set(metrics.summary) == SUMMARY_KEYS
    for key, value in summary.items():
        assert_same(metrics.summary[key], value, f"summary.{key}")
    assert type(metrics.summary["num_tasks"]) is int


def test_accepts_numpy_input_and_returns_plain_floats():
    metrics = compute_cl_metrics(np.array(R3, dtype=np.float32), ["a", "b", "c"])
    values = [getattr(row, field) for row in metrics.per_checkpoint for field in METRIC_FIELDS]
    values += list(metrics.summary.values())
    assert all(value is None or type(value) in (float, int) for value in values)


def test_to_dict_is_json_with_nulls():
    metrics = compute_cl_metrics(R2, ["a", "b"])
    data = json.loads(json.dumps(metrics.to_dict()))

    assert data["tasks"] == ["a", "b"]
    assert [set(row) for row in data["per_checkpoint"]] == [{"checkpoint", *METRIC_FIELDS}] * 3
    assert data["per_checkpoint"][0]["op"] is None
    assert data["per_checkpoint"][0]["fwt"] == 0.0
    assert data["per_checkpoint"][2]["fwt"] is None
    assert data["summary"]["bwt"] == pytest.approx(-0.25)
    assert set(data["summary"]) == SUMMARY_KEYS


def test_to_frame_has_nan_where_undefined():
    frame = compute_cl_metrics(R1, ["a"]).to_frame()

    assert list(frame.columns) == ["checkpoint", *METRIC_FIELDS]
    assert frame["checkpoint"].tolist() == ["base", "a"]
    # bwt is undefined in every row when T = 1; the column must still be numeric.
    assert all(frame[field].dtype == float for field in METRIC_FIELDS)
    assert frame["bwt"].isna().all()
    assert frame["op"].isna().tolist() == [True, False]
    assert frame["fwt"].isna().tolist() == [False, True]
    assert frame.loc[1, "gain"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("matrix", "tasks", "message"),
    [
        ([[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "shape (T+1, T)"),
        ([[0.5], [0.5], [0.5]], ["a"], "shape (T+1, T)"),
        (np.zeros((1, 0)), [], "shape (T+1, T)"),
        ([0.5, 0.5], ["a"], "shape (T+1, T)"),
        ([[0.5, 0.5], [0.5]], ["a"], "rectangular"),
        ([["0.5"], ["0.5"]], ["a"], "numbers"),
        (R2, ["a"], "2 task columns but 1 task names"),
        (R2, ["a", "a"], "distinct"),
        (R2, "ab", "not the string"),
        (R2, ["base", "b"], "base"),
        ([[0.5], [float("nan")]], ["a"], "not a finite number"),
        ([[0.5], [float("inf")]], ["a"], "not a finite number"),
        ([[50.0], [75.0]], ["a"], "divide them by 100"),
        ([[0.5], [-0.1]], ["a"], "outside [0, 1]"),
    ],
)
def test_compute_rejects_invalid_input(matrix, tasks, message):
    with pytest.raises(ValueError) as excinfo:
        compute_cl_metrics(matrix, tasks)
    assert message in str(excinfo.value)


# --- CSV ------------------------------------------------------------------------------------------


def test_csv_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.random((4, 3))
    matrix[0, 0] = 1 / 3
    matrix[1, 1] = 0.1 + 0.2  # 0.30000000000000004: needs every digit
    matrix[2, 2] = 1.0
    matrix[3, 0] = 0.0
    tasks = ["fomc", "science, qa", 'num "gluecm"']  # quoting must survive too
    path = tmp_path / "matrix.csv"

    write_matrix_csv(path, tasks, matrix)
    read_tasks, read_matrix = read_matrix_csv(str(path))

    assert read_tasks == tasks
    assert read_matrix.dtype == float
    assert np.array_equal(read_matrix, matrix)


def test_read_tolerates_spaces_bom_and_blank_lines(tmp_path):
    path = tmp_path / "matrix.csv"
    path.write_text("\ufeffcheckpoint, a ,b\nbase, 0.5,0.25\n\na,0.75 ,0.5\nb,0.5,1\n\n", encoding="utf-8")

    tasks, matrix = read_matrix_csv(path)

    assert tasks == ["a", "b"]
    assert np.array_equal(matrix, np.array(R2))


def test_write_refuses_an_invalid_matrix(tmp_path):
    path = tmp_path / "matrix.csv"
    with pytest.raises(ValueError):
        write_matrix_csv(path, ["a"], np.array([[50.0], [75.0]]))
    assert not path.exists()


GOOD_HEADER = "checkpoint,a,b\n"


@pytest.mark.parametrize(
    ("content", "row", "fragments"),
    [
        pytest.param("", None, ["empty"], id="empty-file"),
        pytest.param("\n\n", None, ["empty"], id="blank-lines-only"),
        pytest.param("step,a,b\nbase,0.1,0.2\na,0.1,0.2\nb,0.1,0.2\n", None, ["`checkpoint`", "'step'"],
                     id="first-column-name"),
        pytest.param("checkpoint\nbase\n", None, ["no task columns"], id="no-task-columns"),
        pytest.param("checkpoint,a,,b\n", None, ["column 3", "no task name"], id="unnamed-task-column"),
        pytest.param("checkpoint,a,b,a\nbase,0.1,0.2,0.3\n", None, ["duplicate", "a"], id="duplicate-columns"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\na,0.1,0.2\n", None, ["2 data rows", "expected 3"],
                     id="too-few-rows"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\na,0.1,0.2\nb,0.1,0.2\nc,0.1,0.2\n", None,
                     ["4 data rows", "expected 3"], id="too-many-rows"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\nb,0.1,0.2\na,0.1,0.2\n", 2, ["'b'", "'a'"], id="row-order"),
        pytest.param(GOOD_HEADER + "Base,0.1,0.2\na,0.1,0.2\nb,0.1,0.2\n", 1, ["'Base'", "'base'"],
                     id="base-label"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\na,0.1,oops\nb,0.1,0.2\n", 2, ["'oops'", "column 'b'", "not a number"],
                     id="non-numeric"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\na,,0.2\nb,0.1,0.2\n", 2, ["empty cell", "column 'a'"],
                     id="empty-cell"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\na,0.1\nb,0.1,0.2\n", 2, ["empty cell", "column 'b'"],
                     id="short-row"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\na,0.1,0.2\nb,0.1,0.2,0.3\n", 3, ["4 cells", "3 columns"],
                     id="long-row"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\na,0.1,0.2\nb,nan,0.2\n", 3, ["not a finite number", "column 'a'"],
                     id="nan"),
        pytest.param(GOOD_HEADER + "base,25,52\na,53.3,66\nb,54,80\n", 1, ["outside [0, 1]", "divide them by 100"],
                     id="percentages"),
        pytest.param(GOOD_HEADER + "base,0.1,0.2\na,-0.1,0.2\nb,0.1,0.2\n", 2, ["outside [0, 1]", "column 'a'"],
                     id="negative"),
        # Blank lines still count, so that row N is line N+1 of the file.
        pytest.param(GOOD_HEADER + "base,0.1,0.2\n\na,0.1,x\nb,0.1,0.2\n", 3, ["'x'"], id="row-after-blank-line"),
    ],
)
def test_read_errors_name_file_and_row(tmp_path, content, row, fragments):
    path = tmp_path / "accuracies.csv"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(DataError) as excinfo:
        read_matrix_csv(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert excinfo.value.row == row
    if row is not None:
        assert f"row {row}" in message
    for fragment in fragments:
        assert fragment in message


def test_read_missing_file(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(DataError) as excinfo:
        read_matrix_csv(path)
    assert "nowhere.csv" in str(excinfo.value)
    assert "does not exist" in str(excinfo.value)


def test_read_directory(tmp_path):
    with pytest.raises(DataError) as excinfo:
        read_matrix_csv(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def test_read_binary_file(tmp_path):
    path = tmp_path / "weights.csv"
    path.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(DataError) as excinfo:
        read_matrix_csv(path)
    assert "weights.csv" in str(excinfo.value)


# --- aggregating over seeds -----------------------------------------------------------------------


def test_mean_std_over_seeds():
    frames = [compute_cl_metrics(R, ["a", "b"]).to_frame() for R in (R2, np.array(R2) * 0.5)]
    frames = [frame.assign(model="m") for frame in frames]  # a text column that must be dropped

    mean, std = mean_std_frames(frames, "checkpoint")

    assert list(mean.columns) == ["checkpoint", *METRIC_FIELDS]
    assert list(std.columns) == ["checkpoint", *METRIC_FIELDS]
    assert mean["checkpoint"].tolist() == ["base", "a", "b"]
    # b's delta_vs_base is 0.75 and 0.375 in the two seeds
    assert mean.loc[2, "delta_vs_base"] == pytest.approx(0.5625)
    assert std.loc[2, "delta_vs_base"] == pytest.approx(np.std([0.75, 0.375], ddof=1))
    # undefined stays undefined
    assert math.isnan(mean.loc[0, "op"]) and math.isnan(std.loc[0, "op"])
    assert math.isnan(mean.loc[2, "fwt"]) and math.isnan(std.loc[2, "fwt"])


def test_mean_std_single_frame_has_zero_std():
    frame = compute_cl_metrics(R2, ["a", "b"]).to_frame()

    mean, std = mean_std_frames([frame], "checkpoint")

    pd.testing.assert_frame_equal(mean, frame)
    assert std.loc[1, "op"] == 0.0
    assert math.isnan(std.loc[0, "op"])


def test_mean_std_rejects_mismatched_frames():
    first = compute_cl_metrics(R2, ["a", "b"]).to_frame()
    other = compute_cl_metrics(R2, ["a", "c"]).to_frame()
    with pytest.raises(ValueError, match="checkpoint"):
        mean_std_frames([first, other], "checkpoint")
    with pytest.raises(ValueError, match="columns"):
        mean_std_frames([first, first.drop(columns="gain")], "checkpoint")
    with pytest.raises(ValueError, match="no column"):
        mean_std_frames([first], "step")
    with pytest.raises(ValueError):
        mean_std_frames([], "checkpoint")


# --- the published results ------------------------------------------------------------------------


def _paper_value(cell: str) -> float | None:
    # The paper marks undefined metrics with an em dash (or leaves the cell empty).
    cell = cell.strip()
    return None if cell in ("", "—", "-") else float(cell)


@pytest.fixture(scope="module")
def paper() -> pd.DataFrame:
    return pd.read_csv(PAPER_CSV, dtype=str, keep_default_na=False)


def test_the_kept_copy_of_the_published_results_is_the_shared_one():
    shared = Path(__file__).resolve().parents[2] / "shared" / "paper" / PAPER_CSV.name
    if not shared.is_file():
        pytest.skip(f"{shared} not present: no second copy of the published results to compare with")
    assert PAPER_CSV.read_bytes() == shared.read_bytes()


def _paper_rows(paper: pd.DataFrame, model: str) -> list[dict[str, str]]:
    rows = paper[paper["model"] == model].sort_values("step", key=lambda steps: steps.astype(int))
    assert rows["step"].astype(int).tolist() == [0, 1, 2, 3], f"{model}: expected steps 0..3"
    return rows.to_dict("records")


def _paper_matrix(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(row[task]) for task in PAPER_TASKS] for row in rows])


def _assert_close(ours: float | int | None, published: float | None, what: str) -> None:
    if published is None:
        assert ours is None, f"{what}: the paper leaves it undefined, we give {ours}"
    else:
        assert ours is not None, f"{what}: the paper gives {published}, we give None"
        assert abs(ours - published) <= TOLERANCE, f"{what}: ours {ours:.4f}, paper {published:.3f}"


def _assert_matches_paper(model: str, data: dict, rows: list[dict[str, str]]) -> None:
    """Check a ClMetrics.to_dict()-shaped result (from the API or the CLI's JSON) against the paper."""
    per_checkpoint, summary = data["per_checkpoint"], data["summary"]
    assert [row["checkpoint"] for row in per_checkpoint] == ["base", *PAPER_TASKS]
    for ours in per_checkpoint:
        assert set(ours) == {"checkpoint", *METRIC_FIELDS}

    for step, (ours, published) in enumerate(zip(per_checkpoint, rows)):
        where = f"{model} step {step}"
        # The base step's FWT is printed as 0.000; ours is 0.0 by the same definition, so no special case.
        for field, column in [("op", "op"), ("bwt", "bwt"), ("fwt", "fwt"),
                              ("avg_all", "avg_over_all_tasks"), ("delta_vs_base", "delta_curr_vs_base")]:
            _assert_close(ours[field], _paper_value(published[column]), f"{where} {field} vs {column}")

    # The paper has no gain column; gain_k = curr_accuracy_k - (accuracy on task k one checkpoint earlier).
    for step in range(1, 4):
        task = PAPER_TASKS[step - 1]
        published_gain = float(rows[step]["curr_accuracy"]) - float(rows[step - 1][task])
        _assert_close(per_checkpoint[step]["gain"], published_gain, f"{model} step {step} gain")

    matrix = _paper_matrix(rows)
    published_fwts = [_paper_value(rows[step]["fwt"]) for step in (1, 2)]
    curr = [float(rows[step]["curr_accuracy"]) for step in (1, 2, 3)]
    expected_summary = {
        "final_avg_accuracy": _paper_value(rows[3]["avg_over_all_tasks"]),
        "bwt": _paper_value(rows[3]["bwt"]),
        "fwt": sum(published_fwts) / 2,
        # GEM: the accuracy on task i just before learning it, minus the base model's.
        "fwt_gem": ((matrix[1, 1] - matrix[0, 1]) + (matrix[2, 2] - matrix[0, 2])) / 2,
        "learning_accuracy": sum(curr) / 3,
        "mean_gain": sum(per_checkpoint[step]["gain"] for step in (1, 2, 3)) / 3,
    }
    assert set(summary) == SUMMARY_KEYS
    assert summary["num_tasks"] == 3
    for key, value in expected_summary.items():
        _assert_close(summary[key], value, f"{model} summary {key}")


@pytest.mark.parametrize("model", PAPER_MODELS)
def test_paper_results(paper, model):
    rows = _paper_rows(paper, model)
    matrix = _paper_matrix(rows)

    # The published current-task accuracy must be the diagonal: this pins the training order.
    for step in range(1, 4):
        assert float(rows[step]["curr_accuracy"]) == matrix[step, step - 1]

    metrics = compute_cl_metrics(matrix, PAPER_TASKS)
    _assert_matches_paper(model, metrics.to_dict(), rows)


def test_paper_prose_claims_about_gain(paper):
    # Section 5: "all three models achieve largest immediate gains after being trained on FOMC" and
    # "NumGLUE-CM is the most harmful task, where [the gain] is negative for all model architectures".
    for model in PAPER_MODELS:
        gains = [row.gain for row in compute_cl_metrics(_paper_matrix(_paper_rows(paper, model)), PAPER_TASKS)
                 .per_checkpoint[1:]]
        assert gains[0] == max(gains), f"{model}: {gains}"
        assert gains[2] < 0, f"{model}: {gains}"


# --- command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", PAPER_MODELS)
def test_cli_metrics_json_matches_paper(paper, tmp_path, model):
    rows = _paper_rows(paper, model)
    csv_path = tmp_path / f"{model}.csv"
    write_matrix_csv(csv_path, PAPER_TASKS, _paper_matrix(rows))

    result = cli("metrics", str(csv_path), "--json")

    assert result.returncode == 0, result.stderr
    _assert_matches_paper(model, json.loads(result.stdout), rows)


def test_cli_metrics_bad_cell_is_one_line_error(tmp_path):
    csv_path = tmp_path / "broken_matrix.csv"
    csv_path.write_text(GOOD_HEADER + "base,0.1,0.2\na,0.1,oops\nb,0.1,0.2\n", encoding="utf-8")

    result = cli("metrics", str(csv_path), "--json")

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert csv_path.name in lines[0]
