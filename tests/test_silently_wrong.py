"""Inputs that used to give a wrong result, a failure that did not fail, or a traceback: each now answers with one
line, through the command line, and leaves nothing of a broken stage recorded as finished."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, config_file, lorawatch
from lorawatch import store


@pytest.mark.parametrize("changes, fragments", [
    ({"strategy": {"name": "kl_anchor", "weight": float("inf")}}, ("strategy.weight", "finite")),
    ({"train": {"learning_rate": float("nan")}}, ("train.learning_rate", "finite")),
    ({"train": {"max_grad_norm": float("inf")}}, ("train.max_grad_norm", "finite")),
])
def test_non_finite_settings_are_refused_before_anything_runs(tmp_path, tiny_model_dir, changes, fragments):
    path = config_file(tmp_path, tiny_model_dir, **changes)  # json.dumps writes Infinity / NaN, as JSON allows
    result = lorawatch("run", path, "--out", tmp_path / "run")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_run_built_to_diverge_stops_at_the_step_and_records_nothing_of_the_stage(tmp_path, tiny_model_dir):
    """A finite but absurd learning rate: the first step throws the adapter to ~1e30, the next loss is not finite."""
    path = config_file(tmp_path, tiny_model_dir, train={"learning_rate": 1e30, "batch_size": 2, "grad_accum": 2},
                       seeds=[1])
    run = tmp_path / "run"
    result = lorawatch("run", path, "--out", run)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress lines of the base stage and the training
    for fragment in ("error: seed 1, stage 1 (stance): training diverged at optimizer step 2 of 2", "not finite",
                     "train.learning_rate", "this one is not recorded"):
        assert fragment in last, last
    assert (store.stage_dir(run, 1, 0) / "stage.json").is_file()  # the base stage finished and is kept
    stage1 = store.stage_dir(run, 1, 1)
    assert not (stage1 / "stage.json").exists() and not (stage1 / "training.json").exists()
    assert not (store.summary_dir(run) / "summary.json").exists()
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
    path = store.stage_dir(built_run, 1, 1) / "scores.json"
    scores = json.loads(path.read_text())
    scores["stance"] = value
    path.write_text(json.dumps(scores))
    result = lorawatch("check", built_run)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert any(str(path) in line and fragment in line for line in result.stdout.splitlines()), result.stdout
    # the builder saves no adapters: check names them too, but show and report do not need them
    assert_one_line_error(lorawatch("report", built_run, "--out", built_run.parent / "report"), str(path), fragment)


def test_check_finds_the_files_a_finished_stage_needs(built_run):
    missing = store.stage_dir(built_run, 1, 1) / "predictions" / "science.jsonl"
    missing.unlink()
    result = lorawatch("check", built_run)
    assert result.returncode == 1
    assert f"{missing}: missing; the stage is marked finished (stage.json) without it" in result.stdout
    assert_one_line_error(lorawatch("show", built_run, "--html"), str(missing), "missing")


def test_check_on_a_record_from_a_newer_lorawatch_is_one_line(built_run):
    path = store.stage_dir(built_run, 1, 0) / "reference_stats.json"
    record = json.loads(path.read_text())
    record["schema_version"] = 99
    path.write_text(json.dumps(record))
    result = lorawatch("check", built_run)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert f"{path}: written by a newer lorawatch (record version 99" in result.stdout
