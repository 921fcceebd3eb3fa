"""The run folder against hostile input, on the command line as a user runs it: nothing lost (what --overwrite may
delete, and when), nothing stale (inputs fingerprinted, --force's limits), nothing late (checks before any model
work), no hang and no traceback for a user's mistake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import SRC, assert_one_line_error, build_tiny_model, cli, config_file, lorawatch
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import store
from lorawatch.recipe.protocol import run_lock


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """One finished run (seed 1), and its config file; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("hostile")
    config = config_file(root, tiny_model_dir)
    result = cli("run", config, "--out", root / "run", "--seeds", "1")
    assert result.returncode == 0, result.stderr
    return root, config, root / "run"


def _copy(run, target):
    import shutil

    shutil.copytree(run, target)
    (target / ".lock").unlink(missing_ok=True)
    return target


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


# --- 1. --overwrite deletes only a run folder, only with its lock, only after every check ---------------------


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model_dir):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "chapters" / "one.tex").write_text("years of work")
    result = cli("run", config_file(tmp_path, tiny_model_dir), "--out", thesis, "--overwrite")
    assert_one_line_error(result, "is not a lorawatch run", "--overwrite deletes only lorawatch run folders")
    assert (thesis / "chapters" / "one.tex").read_text() == "years of work"


def test_overwrite_keeps_the_old_run_when_a_later_check_fails(finished, tmp_path):
    root, config, run = finished
    old = _copy(run, tmp_path / "old")
    before = _snapshot(old)
    result = cli("run", config, "--out", old, "--seeds", "1", "--overwrite", "--model", tmp_path / "no-model")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = cli("run", config, "--out", old, "--seeds", "1", "--overwrite", "--device", "cuda:7")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _snapshot(old) == before


def test_overwrite_takes_the_lock_before_deleting(finished, tmp_path):
    root, config, run = finished
    live = _copy(run, tmp_path / "live")
    before = _snapshot(live)
    with run_lock(live):  # a live run holds it
        result = lorawatch("run", config, "--out", live, "--seeds", "1", "--overwrite")
    assert_one_line_error(result, "already being written")
    assert _snapshot(live) == before


# --- 2. edited inputs are noticed; --force never mixes old and new meanings --------------------------------


def test_edited_golds_are_refused_on_resume(tmp_path, tiny_model_dir):
    config = config_file(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    assert cli("run", config, "--out", out, "--seeds", "1").returncode == 0
    # the same rows, one gold changed: the row count and file name are unchanged
    test_file = tmp_path / "data" / "mc_test.json"
    rows = json.loads(test_file.read_text())
    rows[0]["answer"] = "C" if rows[0]["answer"] != "C" else "A"
    test_file.write_text(json.dumps(rows))
    for extra in ((), ("--force",)):
        result = cli("run", config, "--out", out, "--seeds", "1", *extra)
        assert_one_line_error(result, "inputs changed", "data.tasks.stance.test")
    # a stage deleted: still refused, not a matrix scored half against old golds and half against new
    import shutil

    shutil.rmtree(RunFolder(out).stage(1, 2).path)
    assert_one_line_error(cli("run", config, "--out", out, "--seeds", "1"), "inputs changed")


def test_moved_data_resumes_with_force_and_is_recorded(finished, tmp_path, tiny_model_dir):
    root, _, run = finished
    moved = config_file(tmp_path / "moved", tiny_model_dir)  # same rows, another folder
    out = _copy(run, tmp_path / "run")
    result = cli("run", moved, "--out", out, "--seeds", "1", "--force")
    assert result.returncode == 0, result.stderr
    assert "--force: resuming with changed" in result.stderr and "tasks.0.train" in result.stderr
    history = store.read_jsonl(out / "config_history.jsonl")
    assert "tasks.0.train" in history[0]["changed"] and history[0]["previous"]["tasks"][0]["train"].startswith(str(root))


def test_force_cannot_change_the_order_and_new_seeds_reach_the_summary(finished, tmp_path):
    root, config, run = finished
    out = _copy(run, tmp_path / "run")
    result = cli("run", config, "--out", out, "--seeds", "1", "--order", "reversed", "--force")
    assert_one_line_error(result, "--force cannot resume over order")
    result = cli("run", config, "--out", out, "--seeds", "1,4", "--force")
    assert result.returncode == 0, result.stderr
    summary = store.read_json(out / "summary" / "summary.json")
    assert summary["seeds"] == [1, 4] and set(summary["per_seed"]) == {"1", "4"}
    assert store.read_json(out / "config.json")["seeds"] == [1, 4]


def test_environment_history_survives_a_resume(finished, tmp_path):
    root, config, run = finished
    out = _copy(run, tmp_path / "run")
    assert cli("run", config, "--out", out, "--seeds", "1").returncode == 0
    history = store.read_jsonl(out / "environment_history.jsonl")
    assert [h["mode"] for h in history] == ["new", "resume"]
    assert all(h["versions"]["torch"] for h in history)


def test_replaced_weights_are_not_served_from_the_base_stage_cache(tmp_path):
    model = build_tiny_model(tmp_path / "model", seed=11)
    config = config_file(tmp_path, model)
    assert cli("run", config, "--out", tmp_path / "a", "--seeds", "1").returncode == 0
    build_tiny_model(tmp_path / "model", seed=12)  # the same folder, other weights
    assert cli("run", config, "--out", tmp_path / "b", "--seeds", "1").returncode == 0
    stage = [store.read_json(tmp_path / run / "seed-1" / "stage-0" / "stage.json") for run in ("a", "b")]
    assert stage[0]["base_stage_key"] != stage[1]["base_stage_key"] and not stage[1]["reused_from_cache"]
    # and a resume over replaced weights is refused
    build_tiny_model(tmp_path / "model", seed=13)
    result = cli("run", config, "--out", tmp_path / "b", "--seeds", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "inputs changed" in last and "model.weights" in last


# --- 3./4. checks before any model work; names that would collide ------------------------------------------


@pytest.mark.parametrize("tasks_change, fragments", [
    ({"name": "base"}, ["tasks.0.name", "reserved"]),
    ({"name": "Reference"}, ["tasks.0.name", "reserved"]),
    ({"name": "checkpoint"}, ["tasks.0.name", "reserved"]),
    ({"name": "schema_version"}, ["tasks.0.name", "reserved"]),
    ({"name": "Sum"}, ["'Sum' and 'sum' differ only in case"]),
    ({"name": "a/b"}, ["tasks.0.name", "must not contain '/'"]),
])
def test_bad_task_names_fail_before_any_model_work(tmp_path, tiny_model_dir, tasks_change, fragments):
    path = config_file(tmp_path, tiny_model_dir)
    config = json.loads(path.read_text())
    config["tasks"][0].update(tasks_change)
    path.write_text(json.dumps(config))
    started = time.perf_counter()
    result = cli("run", path, "--out", tmp_path / "run")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists() and time.perf_counter() - started < 60


def test_target_modules_naming_no_layer_fail_before_the_base_stage(tmp_path, tiny_model_dir):
    path = config_file(tmp_path, tiny_model_dir, lora={"target_modules": ["query_key_value"]})
    result = cli("run", path, "--out", tmp_path / "run")
    assert_one_line_error(result, "lora.target_modules", "names no layer", "q_proj")
    assert "base:" not in result.stderr  # no base evaluation ran
    assert not (tmp_path / "run").exists()  # and no folder is left to refuse the corrected command
    assert cli("run", config_file(tmp_path, tiny_model_dir), "--out", tmp_path / "run",
                     "--seeds", "1").returncode == 0


@pytest.mark.parametrize("seeds, fragment", [([True], "valid integer"), ([2**40], "less than or equal"),
                                             ([-1], "greater than or equal")])
def test_seeds_are_checked_up_front(tmp_path, tiny_model_dir, seeds, fragment):
    result = cli("run", config_file(tmp_path, tiny_model_dir, seeds=seeds), "--out", tmp_path / "run")
    assert_one_line_error(result, "seeds.0", fragment)


def test_builtin_task_kind_must_match_its_generator(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("tasks:\n  - {name: s, kind: numeric, builtin: stance, max_train_rows: 4, max_test_rows: 4}\n"
                      "reference: {builtin_per_task: 2}\n")
    assert_one_line_error(cli("run", config, "--out", tmp_path / "run"), "tasks.0",
                          "built-in task 'stance' is multiple_choice, not numeric")


def test_a_wrong_model_leaves_no_folder_behind(tmp_path, tiny_model_dir):
    config = config_file(tmp_path, tiny_model_dir)
    assert cli("run", config, "--out", tmp_path / "run", "--model", tmp_path / "missing").returncode == 2
    assert not (tmp_path / "run").exists()
    assert cli("run", config, "--out", tmp_path / "run", "--seeds", "1").returncode == 0


# --- 5./7. special files, YAML, and words that say what is wrong -------------------------------------------


def test_a_named_pipe_as_a_data_file_is_refused_not_blocked_on(tmp_path, tiny_model_dir):
    config = config_file(tmp_path, tiny_model_dir)
    pipe = tmp_path / "data" / "mc_test.json"
    pipe.unlink()
    os.mkfifo(pipe)
    result = lorawatch("run", config, "--out", tmp_path / "run", timeout=60)
    assert_one_line_error(result, "mc_test.json", "not a regular file")


@pytest.mark.parametrize("text, fragments", [
    ("tasks: []\ntasks: []\n", ["line 2 column 1", "'tasks' is given twice"]),
    ("name: [a\nseeds: 1\n", ["not a valid YAML file", "line 2 column"]),
])
def test_yaml_mistakes_name_their_line(tmp_path, text, fragments):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert_one_line_error(cli("run", config, "--out", tmp_path / "run"), "c.yaml", *fragments)


def test_config_paths_that_are_not_files(tmp_path):
    assert_one_line_error(cli("run", tmp_path), "is a folder; expected a config file")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    assert_one_line_error(cli("run", tmp_path / "loop-a"), "cannot be read", "symbolic links")


def test_show_and_compare_on_damaged_runs_are_one_line(finished, tmp_path):
    root, config, run = finished
    damaged_config = _copy(run, tmp_path / "config")
    (damaged_config / "config.json").write_text("{not json")
    damaged_summary = _copy(run, tmp_path / "summary")
    (damaged_summary / "summary" / "summary.json").write_text("[1, 2")
    for folder, name in ((damaged_config, "config.json"), (damaged_summary, "summary.json")):
        assert_one_line_error(cli("show", folder), name, "damaged")
        assert_one_line_error(cli("compare", run, folder), name, "damaged")


# --- SIGTERM and the user's terminal ---------------------------------------------------------------------


def test_sigterm_is_handled_like_ctrl_c(tmp_path, tiny_model_dir):
    config = config_file(tmp_path, tiny_model_dir, train={"learning_rate": 5e-3, "batch_size": 1, "grad_accum": 1,
                                                          "epochs": 30})
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "lorawatch", "run", str(config), "--out", str(tmp_path / "run"),
                                "--seeds", "1"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "seed-1" / "stage-0" / "stage.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == ("terminated (SIGTERM): finished work is saved; run the same command "
                                               "again to resume")
    assert "Traceback" not in stderr


def test_library_warnings_stay_out_of_the_output(finished):
    root, config, run = finished
    result = lorawatch("run", config, "--out", run, "--seeds", "1")
    assert result.returncode == 0 and "Warning" not in result.stderr + result.stdout


@pytest.mark.parametrize("damage", ["half-copied weights", "wrong-typed config field"])
def test_a_damaged_model_folder_is_one_line(tmp_path, tiny_model_dir, damage):
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    if damage == "half-copied weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
        fragment = "deserializing header"
    else:
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = "two"
        (folder / "config.json").write_text(json.dumps(config))
        fragment = "num_hidden_layers"
    result = cli("run", config_file(tmp_path, folder), "--out", tmp_path / "run")
    assert_one_line_error(result, "cannot load the model in", fragment)
    assert not (tmp_path / "run").exists()


def test_a_read_only_folder_inside_a_run_is_found_before_any_model_work(finished, tmp_path, monkeypatch):
    # as root (CI) chmod does not stop a write, so the permission the check reads is what is simulated here
    from lorawatch.config import build_config
    from lorawatch.errors import UserError
    from lorawatch.data.inputs import load_data
    from lorawatch.recipe.protocol import data_inputs
    from lorawatch.rundir.lifecycle import plan_run_dir

    root, config_path, run = finished
    out = _copy(run, tmp_path / "run")
    config = build_config(store.read_json(out / "config.json"))  # the run's own config: a plain resume
    read_only = RunFolder(out).seed(1).path
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == read_only else real_access(p, mode))
    with pytest.raises(UserError, match=r"seed-1: the run folder is not writable there"):
        plan_run_dir(out, config, data_inputs(load_data(config)), overwrite=False, force=False)
