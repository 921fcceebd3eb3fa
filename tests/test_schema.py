"""The run folder's typed records (rundir/schema.py): every file a run writes fits its schema and carries its version;
a folder written before records were versioned still loads everywhere; a record from a newer lorawatch is
refused (never redone); a record whose field does not fit is named, and a resumed run redoes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from tiny import assert_one_line_error, cli, config_file, tiny_config, write_task_files
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir.check import check_run_folder
from lorawatch.rundir import layout
from lorawatch.rundir import schema, store
from lorawatch.config import build_config
from lorawatch.report.monitoring_view import interventions, monitor_series
from lorawatch.recipe.run import run_experiment
from lorawatch.report.tables import load_run

# Written by lorawatch at commit f5aeb08, the last release before versioned records: the tiny model, two seeds,
# a rollback monitor (so every kind of file is there), adapters and base log-probs left out.
RUN_V0 = Path(__file__).parent / "data" / "run-v0"


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("schema")
    write_task_files(root / "data")
    config = tiny_config(tiny_model_dir, root / "data").model_dump(mode="json")
    config["monitor"] = {"every": 1, "action": "rollback", "threshold": 0.02}
    return run_experiment(build_config(config), root / "run")


def test_every_file_of_a_run_fits_its_schema_and_carries_its_version(fresh_run):
    assert check_run_folder(fresh_run) == []
    records = [p for p in fresh_run.rglob("*.json") if p.name in layout.RECORDS and "adapter" not in p.parts]
    # every kind of record was written, and checked (tracking.json: only with a tracker, test_tracking.py's;
    # deployed.json: only with a deploy section, test_deployed.py's)
    assert {p.name for p in records} == set(layout.RECORDS) - {"tracking.json", "deployed.json"}
    for path in records:
        data = json.loads(path.read_text())
        assert list(data)[-1] == "schema_version" and data["schema_version"] == schema.SCHEMA_VERSION, path
    # the version is not a task: the scores read back hold tasks and the reference set only
    scores = store.read_record(RunFolder(fresh_run).stage(1, 1).path / "scores.json", schema.Scores).accuracy()
    assert set(scores) == {"stance", "sum", "reference"}


def test_a_record_that_does_not_fit_is_a_bug_caught_before_it_is_written(tmp_path):
    with pytest.raises(ValidationError):
        store.write_record(tmp_path / "scores.json", schema.Scores, {"stance": "high"})
    with pytest.raises(ValidationError):
        store.write_record(tmp_path / "stage.json", schema.StageRecord, {"stage": 1, "checkpoint": "a", "task": "a",
                                                                         "surprise": True})
    assert not list(tmp_path.iterdir())


def test_a_folder_written_before_versioned_records_still_loads(tmp_path):
    assert check_run_folder(RUN_V0) == []
    assert not any("schema_version" in json.loads(p.read_text()) for p in RUN_V0.rglob("*.json"))

    results = load_run(RUN_V0)
    assert results.seeds == [1, 2] and results.tasks == ["stance", "sum"]
    for seed in results.seeds:
        matrix = results.accuracy_matrix(seed)
        recorded = [store.read_record(RunFolder(RUN_V0).stage(seed, k).path / "scores.json", schema.Scores).accuracy()
                    for k in range(3)]
        assert matrix[["stance", "sum"]].to_numpy().tolist() == [[r["stance"], r["sum"]] for r in recorded]
        assert results.stage(seed, 1).training.optimizer_steps > 0
    assert results.summary()["seeds"] == [1, 2]
    assert len(results.predictions(1, 2, "stance")) == 4 and len(results.reference_drift(1, 2)) == 4
    assert results.costs().generation["task_eval"].rows > 0  # written before pooled decoding
    assert results.monitor_settings().params.action == "rollback"
    found = interventions(RUN_V0)
    assert [(i["seed"], i["stage"]) for i in found] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    series = monitor_series(RUN_V0)
    assert set(series["stage"]) == {1, 2} and (series["cumulative_step"].diff().dropna() != 0).all()

    copy = tmp_path / "copy"
    shutil.copytree(RUN_V0, copy)
    for args in (("show", RUN_V0), ("check", RUN_V0), ("report", RUN_V0, "--out", tmp_path / "report"),
                 ("compare", RUN_V0, copy, "--out", tmp_path / "compare")):
        result = cli(*args)
        assert result.returncode == 0, (args, result.stderr)
    table = pd.read_csv(tmp_path / "report" / "table3.csv")
    assert len(table) == 2  # one row per trained checkpoint
    assert "rollback" in (tmp_path / "compare" / "compare.md").read_text()


@pytest.fixture(scope="module")
def finished_cli_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("schema-cli")
    config = config_file(root, tiny_model_dir)
    result = cli("run", config, "--out", root / "run", "--seeds", "1")
    assert result.returncode == 0, result.stderr
    return config, root / "run"


def test_a_record_from_a_newer_lorawatch_is_refused_never_redone(finished_cli_run, tmp_path):
    config, original = finished_cli_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    stage_json = RunFolder(run).stage(1, 2).path / "stage.json"
    record = json.loads(stage_json.read_text())
    stage_json.write_text(json.dumps({**record, "schema_version": schema.SCHEMA_VERSION + 1, "new_field": 1}))
    before = {p: p.read_bytes() for p in RunFolder(run).stage(1, 2).path.rglob("*") if p.is_file()}

    result = cli("run", config, "--out", run, "--seeds", "1")
    assert_one_line_error(result, "stage.json", "newer lorawatch", "upgrade")
    assert {p: p.read_bytes() for p in RunFolder(run).stage(1, 2).path.rglob("*") if p.is_file()} == before
    assert_one_line_error(cli("report", run, "--out", tmp_path / "report"), "stage.json", "newer lorawatch")


def test_a_field_that_does_not_fit_is_named_and_a_resumed_run_redoes_it(finished_cli_run, tmp_path):
    config, original = finished_cli_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    scores = RunFolder(run).stage(1, 1).path / "scores.json"
    good = scores.read_bytes()
    scores.write_text(json.dumps({**json.loads(good), "stance": "high"}))  # valid JSON, a field of the wrong type

    assert_one_line_error(cli("report", run, "--out", tmp_path / "report"), "scores.json", "field 'stance'")
    checked = cli("check", run)
    assert checked.returncode == 1 and "scores.json" in checked.stdout and "'stance'" in checked.stdout

    result = cli("run", config, "--out", run, "--seeds", "1")
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stderr and scores.read_bytes() == good
    assert cli("check", run).returncode == 0
