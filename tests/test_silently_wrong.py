"""Inputs that used to give a wrong result, a failure that did not fail, or a traceback: each now answers with one
line, through the command line, and leaves nothing of a broken stage recorded as finished."""

from __future__ import annotations

import json

import pytest

from tiny import assert_one_line_error, cli, config_file
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import layout
from lorawatch.rundir import store


@pytest.mark.parametrize("changes, fragments", [
    ({"strategy": {"name": "kl_anchor", "weight": float("inf")}}, ("strategy.weight", "finite")),
    ({"train": {"learning_rate": float("nan")}}, ("train.learning_rate", "finite")),
    ({"train": {"max_grad_norm": float("inf")}}, ("train.max_grad_norm", "finite")),
])
def test_non_finite_settings_are_refused_before_anything_runs(tmp_path, tiny_model_dir, changes, fragments):
    path = config_file(tmp_path, tiny_model_dir, **changes)  # json.dumps writes Infinity / NaN, as JSON allows
    result = cli("run", path, "--out", tmp_path / "run")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_run_built_to_diverge_stops_at_the_step_and_records_nothing_of_the_stage(tmp_path, tiny_model_dir):
    """A finite but absurd learning rate: the first step throws the adapter to ~1e30, the next loss is not finite."""
    path = config_file(tmp_path, tiny_model_dir, train={"learning_rate": 1e30, "batch_size": 2, "grad_accum": 2},
                       seeds=[1])
    run = tmp_path / "run"
    result = cli("run", path, "--out", run)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress lines of the base stage and the training
    for fragment in ("error: seed 1, stage 1 (stance): training diverged at optimizer step 2 of 2", "not finite",
                     "train.learning_rate", "this one is not recorded"):
        assert fragment in last, last
    assert (RunFolder(run).stage(1, 0).path / "stage.json").is_file()  # the base stage finished and is kept
    stage1 = RunFolder(run).stage(1, 1).path
    assert not (stage1 / "stage.json").exists() and not (stage1 / "training.json").exists()
    assert not (RunFolder(run).summary_folder / "summary.json").exists()
    assert json.loads((run / "config.json").read_text())["train"]["learning_rate"] == 1e30


@pytest.fixture()
def built_run(tmp_path):
    from helpers import outcomes, write_run
    stage = {"stance": outcomes(12), "science": outcomes(20)}
    return write_run(tmp_path / "run", [stage, stage, stage], [0.0, 0.1, 0.2])


@pytest.mark.parametrize("value, fragment", [
    (True, "field 'stance'"), ("0.5", "field 'stance'"), (1.5, "less than or equal to 1"),
])
def test_check_and_show_refuse_records_that_do_not_fit_the_schema(built_run, value, fragment):
    path = RunFolder(built_run).stage(1, 1).path / "scores.json"
    scores = json.loads(path.read_text())
    scores["stance"] = value
    path.write_text(json.dumps(scores))
    result = cli("check", built_run)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert any(str(path) in line and fragment in line for line in result.stdout.splitlines()), result.stdout
    assert_one_line_error(cli("report", built_run, "--out", built_run.parent / "report"), str(path), fragment)


def test_check_finds_the_files_a_finished_stage_needs(built_run):
    missing = RunFolder(built_run).stage(1, 1).path / "predictions" / "science.jsonl"
    missing.unlink()
    result = cli("check", built_run)
    assert result.returncode == 1
    assert f"{missing}: missing; the stage is marked finished (stage.json) without it" in result.stdout
    assert_one_line_error(cli("show", built_run, "--html"), str(missing), "missing")


def test_check_on_a_record_from_a_newer_lorawatch_is_one_line(built_run):
    path = RunFolder(built_run).stage(1, 0).path / "reference_stats.json"
    record = json.loads(path.read_text())
    record["schema_version"] = 99
    path.write_text(json.dumps(record))
    result = cli("check", built_run)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert f"{path}: written by a newer lorawatch (record version 99" in result.stdout


# --- vague or wrong answers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["1_0", "0.2_5", "٠.٥"])
def test_metrics_reads_only_plain_decimal_numbers(tmp_path, cell):
    path = tmp_path / "m.csv"
    path.write_text(f"checkpoint,a\nbase,{cell}\na,0.3\n")
    assert_one_line_error(cli("metrics", path), "m.csv, row 1", repr(cell), "not a number")


def test_metrics_and_run_read_standard_input_from_dash(tmp_path, tiny_model_dir):
    result = subprocess_with_stdin(["metrics", "-", "--json"], "checkpoint,a\nbase,0.5\na,0.75\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["per_checkpoint"][1]["gain"] == 0.25
    config = json.loads(config_file(tmp_path, tiny_model_dir, name="from-stdin").read_text())
    result = subprocess_with_stdin(["run", "-", "--out", tmp_path / "bad", "--max-new-tokens", "0"], json.dumps(config),
                                   cwd=tmp_path)  # relative data paths from the current folder; a bad value refused
    assert_one_line_error(result, "max_new_tokens")


def subprocess_with_stdin(args, text, cwd=None):
    import os
    import subprocess
    import sys

    from tiny import SRC
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "lorawatch", *map(str, args)], input=text, capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_an_unbalanced_quote_is_named(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('checkpoint,a\nbase,"0.5\na,0.3\n')
    assert_one_line_error(cli("metrics", path), "q.csv", 'a quote (") opened on line 2 is never closed')


@pytest.mark.parametrize("text, fragments", [
    ('[{"prompt": "Q: 1 plus 1?", "answer": NaN}]', ("row 1", "'answer' is nan", "not a number")),
    ('[{"prompt": "Q: 1 plus 1?", "answer": Infinity}]', ("row 1", "'answer' is inf",)),
    ('[{"prompt": "Q: 1 plus 1?", "answer": "2", "answer": "3"}]', ("row 1", "key 'answer' is given twice")),
])
def test_data_rows_with_non_finite_golds_or_repeated_keys(tmp_path, tiny_model_dir, text, fragments):
    path = config_file(tmp_path, tiny_model_dir)
    (tmp_path / "data" / "num_test.json").write_text(text)
    assert_one_line_error(cli("run", path, "--out", tmp_path / "run"), "num_test.json", *fragments)


@pytest.mark.parametrize("lora, fragment", [
    ({"target_modules": 5}, "field 'lora.target_modules': expected a list of module names"),
    ({"target_modules": ["q_proj", 3]}, "or all-linear (got ['q_proj', 3])"),
])
def test_config_messages_say_what_a_field_takes_not_pydantics_union_members(tmp_path, tiny_model_dir, lora,
                                                                             fragment):
    result = cli("run", config_file(tmp_path, tiny_model_dir, lora=lora), "--out", tmp_path / "run")
    assert_one_line_error(result, fragment)
    assert ".str'" not in result.stderr and "list[str]" not in result.stderr


# --- arbitrary input: a result or one line, never a traceback -------------------------------------------------

from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st  # noqa: E402

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)


@hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["name", "model", "tasks", "order", "reference", "lora", "train", "eval",
                                        "monitor", "strategy", "statistics", "seeds", "colour"]), json_values,
                       max_size=6))
def test_the_config_loader_gives_a_config_or_one_config_error(data):
    from lorawatch.config import build_config
    from lorawatch.errors import ConfigError
    try:
        build_config(data)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("config: ")


@hyp_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_the_metrics_reader_gives_a_matrix_or_one_data_error(tmp_path, content):
    from lorawatch.errors import DataError
    from lorawatch.analysis.metrics import compute_cl_metrics, read_matrix_csv
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    try:
        tasks, matrix = read_matrix_csv(path)
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    compute_cl_metrics(matrix, tasks)  # what the reader accepts, the metrics take


@hyp_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["stage.json", "scores.json", "reference_stats.json", "statistics.json", "summary.json",
                        "costs.json", "cl_metrics.json"]), json_values | st.binary(max_size=60))
def test_the_record_reader_gives_a_record_or_one_line(tmp_path, name, content):
    from lorawatch.errors import UserError
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    try:
        store.load_record(path, layout.RECORDS[name])
    except UserError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)


# --- late failures: tracking destinations are checked before any model work ----------------------------------

@pytest.mark.parametrize("tracking, fragment", [
    ({"backend": "mlflow", "uri": "ftp://example.org/x"}, "MLflow has no store for scheme 'ftp'"),
    ({"backend": "mlflow", "uri": "http://127.0.0.1:9"}, "no MLflow server answers there"),
    ({"backend": "tensorboard", "uri": "{file}"}, "is a file; expected a folder for TensorBoard's logs"),
    ({"backend": "mlflow", "uri": "sqlite:///{file}/mlflow.db"}, "is a file; expected the folder of the SQLite"),
])
def test_tracking_destinations_are_checked_before_any_model_work(tmp_path, tiny_model_dir, tracking, fragment):
    import time
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tracking = {k: v.replace("{file}", str(blocker)) for k, v in tracking.items()}
    path = config_file(tmp_path, tiny_model_dir, tracking=tracking)
    started = time.monotonic()
    result = cli("run", path, "--out", tmp_path / "run")
    assert_one_line_error(result, "tracking uri", fragment)
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


def test_track_checks_its_destination_too(built_run, tmp_path):
    result = cli("track", built_run, "--to", "mlflow", "--uri", "ftp://example.org/x")
    assert_one_line_error(result, "tracking uri 'ftp://example.org/x'", "no store for scheme 'ftp'")
    assert not (built_run / "tracking.json").exists()


@hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=160) | st.text(max_size=160).map(str.encode), st.sampled_from(["c.yaml", "c.json"]))
def test_a_config_file_of_any_bytes_gives_a_config_or_one_config_error(tmp_path, content, name):
    from lorawatch.config import load_config
    from lorawatch.errors import ConfigError
    path = tmp_path / name
    path.write_bytes(content)
    try:
        load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
