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
