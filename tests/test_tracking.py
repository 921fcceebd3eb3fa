"""Experiment tracking (integrations/tracking.py) against real stores: a tiny run logged live to MLflow (a SQLite store read
back with MlflowClient) and exported to TensorBoard (event files read back with TensorBoard's own reader), a
study's parent with children, a run killed and resumed logging each stage once, `lorawatch track` through the
real command line, and result files that tracking leaves byte for byte as they are."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tiny import assert_one_line_error, cli, config_file, lorawatch, tiny_config, write_task_files
from lorawatch.rundir.layout import TRACKING, RunFolder
from lorawatch.rundir.check import check_run_folder
from lorawatch.rundir import layout
from lorawatch.rundir import schema, store
from lorawatch.report import verdict_view
from lorawatch.analysis import verdicts
from lorawatch.config import TrackingSettings, build_config, load_config, with_changes
from lorawatch.errors import UserError
from lorawatch.recipe.run import run_experiment
from lorawatch.report.tables import load_run_config
from lorawatch.integrations.tracking import RunLogger, export_run, export_settings, open_parent, resolve

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
tensor_util = pytest.importorskip("tensorboard.util.tensor_util")

RUN_V0 = Path(__file__).resolve().parent / "data" / "run-v0"
MLFLOW = TrackingSettings(backend="mlflow")
TENSORBOARD = TrackingSettings(backend="tensorboard")
STATS = {"kl_to_base": "kl_mean", "entropy": "entropy_mean", "margin": "margin_mean",
         "kl_to_base_delta": "kl_mean_delta", "entropy_delta": "entropy_mean_delta", "kl_to_base_p95": "kl_p95"}


def _config(model_dir, data_dir, **sections):
    # No base-stage cache: both runs compute stage 0, so that its stage.json is the same in both.
    data = tiny_config(model_dir, data_dir, seeds=(1,), reuse_base_stage=False).model_dump(mode="json")
    return build_config({**data, "monitor": {"every": 1, "action": "warn", "threshold": 100.0}, **sections})


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same tiny monitored run twice: logged live to MLflow, and without tracking."""
    root = tmp_path_factory.mktemp("tracking")
    write_task_files(root / "data")
    tracked = run_experiment(_config(tiny_model_dir, root / "data", tracking={"backend": "mlflow"}), root / "tracked")
    plain = run_experiment(_config(tiny_model_dir, root / "data"), root / "plain")
    return root, tracked, plain


def _recorded(run_dir, backend="mlflow"):
    runs = store.read_record(run_dir / TRACKING, schema.TrackingRecord).runs
    return [r for r in runs if r.destination.backend == backend]


def _client(run_dir):
    return mlflow.MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _expected_losses(run_dir, seed=1, stages=2):
    losses = [loss for k in range(1, stages + 1) for loss in
              RunFolder(run_dir).stage(seed, k).training.read().step_losses]
    return list(enumerate(losses, 1))


def _read(run_dir, seed, stage, name, record):
    return store.read_record(RunFolder(run_dir).stage(seed, stage).path / name, record)


def test_a_live_mlflow_run_holds_what_the_run_folder_holds(runs):
    _, run_dir, _ = runs
    [entry] = _recorded(run_dir)
    assert entry.finished and entry.logged == {"1": [0, 1, 2]}
    client = _client(run_dir)
    run = client.get_run(entry.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    params = run.data.params
    assert params["train.learning_rate"] == "0.005" and params["seeds"] == "[1]" and params["tasks.1.name"] == "sum"
    assert params["model.spec"] == str(build_config(json.loads((run_dir / "config.json").read_text())).model.spec)
    assert not any(key.startswith("tracking") for key in params)
    assert export_settings(run_dir) == MLFLOW  # `lorawatch track` goes where the run's own section says

    losses = _expected_losses(run_dir)
    assert len(losses) == 4 and _history(client, entry.run_id, "train/loss") == losses  # exact, one per step
    drift = [(k, p.step, p.kl_mean) for k in (1, 2)
             for p in store.read_rows(RunFolder(run_dir).stage(1, k).path / "monitor.jsonl", schema.MonitorPoint)]
    assert [v for _, v in _history(client, entry.run_id, "drift/kl_mean")] == [kl for *_, kl in drift]
    assert [s for s, _ in _history(client, entry.run_id, "drift/kl_mean")] == [1, 2, 3, 4]  # one axis with the loss
    for stage in range(3):
        scores = _read(run_dir, 1, stage, "scores.json", schema.Scores).accuracy()
        for task, value in scores.items():
            assert dict(_history(client, entry.run_id, f"stage/accuracy/{task}"))[stage] == value
        stats = _read(run_dir, 1, stage, "reference_stats.json", schema.ReferenceStats).body()
        for key, field in STATS.items():
            assert dict(_history(client, entry.run_id, f"stage/{key}"))[stage] == stats[field], key
    metrics = store.read_record(RunFolder(run_dir).seed(1).path / "cl_metrics.json", schema.ClMetricsRecord)
    for name in ("op", "bwt", "fwt", "avg_all"):
        expected = [(k, getattr(row, name)) for k, row in enumerate(metrics.per_checkpoint)
                    if getattr(row, name) is not None]
        assert expected and _history(client, entry.run_id, f"cl/{name}") == expected, name
    summary = store.read_record(RunFolder(run_dir).summary_folder / "summary.json", schema.Summary).per_seed["1"]
    assert run.data.metrics["summary/final_kl_to_base"] == summary["final_kl_to_base"]

    artifacts = {a.path for folder in ("", "seed-1", "summary") for a in client.list_artifacts(entry.run_id, folder)}
    assert {"config.json", "seed-1/accuracy_matrix.csv", "seed-1/cl_metrics.csv", "seed-1/stability.csv",
            "summary/cl_metrics_mean.csv"} <= artifacts
    # the artifacts went beside the database, and the folder still reads as a run folder
    assert (run_dir / "mlartifacts").is_dir() and check_run_folder(run_dir) == []


def _comparable(run_dir):
    """Every result file: bytes, or for JSON the data without timings and without the tracking section."""
    skipped = {TRACKING, "costs.json", "environment.json", "environment_history.jsonl", "mlflow.db", ".lock"}
    files = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(run_dir)
        if path.name in skipped or relative.parts[0] in layout.TRACKER_STORES:
            continue
        files[str(relative)] = _untimed(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return files


def _untimed(data):
    if isinstance(data, dict):
        return {k: _untimed(v) for k, v in data.items() if not k.endswith("seconds") and k != "tracking"}
    return data


def test_tracking_changes_no_result_file(runs):
    _, tracked, plain = runs
    mine, theirs = _comparable(tracked), _comparable(plain)
    assert mine.keys() == theirs.keys() and len(mine) > 30
    assert [name for name in mine if mine[name] != theirs[name]] == []


def _scalars(log_dir):
    events = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_tensorboard_export_holds_the_same_numbers_and_is_not_repeated(runs):
    _, run_dir, _ = runs
    where = export_run(run_dir, TENSORBOARD)
    log_dir = run_dir / "tensorboard" / "tiny"
    assert where == f"tensorboard {log_dir.resolve()}"
    events, scalars = _scalars(log_dir)
    assert scalars["train/loss"] == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in _expected_losses(run_dir)]
    assert [s for s, _ in scalars["drift/kl_mean"]] == [1, 2, 3, 4]
    for stage in range(3):
        kl = _read(run_dir, 1, stage, "reference_stats.json", schema.ReferenceStats).kl_mean
        assert dict(scalars["stage/kl_to_base"])[stage] == pytest.approx(kl, rel=1e-6, abs=1e-7)
        accuracy = _read(run_dir, 1, stage, "scores.json", schema.Scores).accuracy()["sum"]
        assert dict(scalars["stage/accuracy/sum"])[stage] == pytest.approx(accuracy)
    bwt = store.read_record(RunFolder(run_dir).seed(1).path / "cl_metrics.json", schema.ClMetricsRecord).summary["bwt"]
    assert scalars["cl/bwt"][-1][1] == pytest.approx(bwt)
    texts = events.Tags()["tensors"]
    assert {"params/text_summary", "seed-1/accuracy_matrix.csv/text_summary", "config.json/text_summary"} <= set(texts)
    table = tensor_util.make_ndarray(events.Tensors("seed-1/cl_metrics.csv/text_summary")[0].tensor_proto).item()
    assert "checkpoint,op,bwt,fwt" in table.decode()
    assert (log_dir / "artifacts" / "seed-1" / "stability.csv").is_file()
    # Exported again: recorded as finished, nothing new is written (no second event file either).
    event_files = sorted(p.name for p in log_dir.iterdir())
    assert export_run(run_dir, TENSORBOARD).endswith("(logged before)")
    assert sorted(p.name for p in log_dir.iterdir()) == event_files
    assert [r.destination.backend for r in store.read_record(run_dir / TRACKING, schema.TrackingRecord).runs] == \
        ["mlflow", "tensorboard"]


def test_a_study_is_a_parent_with_its_units_as_children(runs, tmp_path):
    root, tracked, plain = runs
    units = {"a": tmp_path / "a", "b": tmp_path / "b"}
    shutil.copytree(tracked, units["a"])
    shutil.copytree(plain, units["b"])
    study = tmp_path / "study"
    parent = open_parent(MLFLOW, study, "my-study", {"grid": {"lr": [1e-3, 1e-4]}, "seeds": [1]})
    for name, folder in units.items():  # the units use the study's store: the settings made explicit
        export_run(folder, resolve(MLFLOW, study), name=name, parent=parent.run_id)
    parent.close()
    client = mlflow.MlflowClient(resolve(MLFLOW, study).uri)
    experiment = client.get_experiment_by_name("my-study")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == {"my-study", "a", "b"}
    assert found["my-study"].data.params == {"grid.lr": "[0.001, 0.0001]", "seeds": "[1]"}
    assert all(found[n].data.tags["mlflow.parentRunId"] == parent.run_id for n in units)
    assert found["a"].info.artifact_uri.startswith((study / "mlartifacts").resolve().as_uri())
    # the unit folder already logged live to its own store keeps that record beside the child's
    assert len(_recorded(units["a"])) == 2 and not (units["b"] / "mlflow.db").exists()

    tb_parent = open_parent(TENSORBOARD, study, "my-study", {"seeds": [1]})
    export_run(units["b"], TENSORBOARD, name="b", parent=tb_parent.run_id)
    tb_parent.close()
    _, scalars = _scalars(study / "tensorboard" / "my-study" / "b")
    assert len(scalars["train/loss"]) == 4


def test_an_interrupted_run_is_marked_killed_and_reopened_by_the_next_command(runs, tmp_path):
    _, _, plain = runs
    folder = tmp_path / "plain"
    shutil.copytree(plain, folder)
    logger = RunLogger(folder, MLFLOW)
    logger.stage(1, 1)
    logger.abort(KeyboardInterrupt())
    client = _client(folder)
    assert client.get_run(logger.tracker.run_id).info.status == "KILLED"
    export_run(folder, MLFLOW)  # continues the same run: stages 0 and 1 are not logged again
    run = client.get_run(logger.tracker.run_id)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    assert [s for s, _ in _history(client, run.info.run_id, "stage/kl_to_base")] == [0, 1, 2]


def test_a_killed_run_resumes_into_the_same_mlflow_run_logging_each_stage_once(tiny_model_dir, tmp_path):
    path = config_file(tmp_path, tiny_model_dir, seeds=[1])
    out = tmp_path / "run"
    # --track on the command line; killed once stage 1 is finished and logged, stage 2 trained but not evaluated
    # (--max-train-rows: an override `tasks.*.max_train_rows`, recorded in the config, is a parameter too)
    killed = lorawatch("run", path, "--out", out, "--track", "mlflow", "--max-train-rows", "8",
                       env={"LORAWATCH_CRASH_AT": "1:2:trained"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "lorawatch: tracking to mlflow sqlite:" in " ".join(killed.stderr.split())  # (rich wraps lines)
    assert "INFO" not in killed.stderr  # MLflow's database-creation lines stay out of the user's terminal
    [before] = _recorded(out)
    assert before.logged == {"1": [0, 1]} and not before.finished
    client = _client(out)
    assert client.get_run(before.run_id).info.status == "RUNNING"

    unfinished = cli("track", out)
    assert_one_line_error(unfinished, str(out), "has not finished", "seed 1 stage 2")
    # resumed from Python, with the config the command line made
    run_experiment(with_changes(load_config(path), {"tasks.*.max_train_rows": 8, "tracking.backend": "mlflow"}), out)
    [after] = _recorded(out)
    assert after.run_id == before.run_id and after.finished and after.logged == {"1": [0, 1, 2]}
    assert [r.info.run_id for r in client.search_runs([client.get_run(after.run_id).info.experiment_id])] == \
        [after.run_id]
    assert client.get_run(after.run_id).info.status == "FINISHED"
    assert client.get_run(after.run_id).data.params["overrides.tasks._.max_train_rows"] == "8"
    assert _history(client, after.run_id, "train/loss") == _expected_losses(out)
    for key in ("stage/accuracy/stance", "stage/kl_to_base"):
        assert [s for s, _ in _history(client, after.run_id, key)] == [0, 1, 2], key


def test_lorawatch_track_on_the_command_line(runs, tmp_path):
    _, _, plain = runs
    folder = tmp_path / "plain"
    shutil.copytree(plain, folder)
    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}"
    result = cli("track", folder, "--to", "mlflow", "--uri", uri, "--experiment", "exported")
    assert result.returncode == 0, result.stderr
    [entry] = _recorded(folder)
    assert result.stdout == f"{folder}: mlflow {uri} · experiment 'exported' · run {entry.run_id}\n"
    assert result.stderr == ""
    client = mlflow.MlflowClient(uri)
    assert _history(client, entry.run_id, "train/loss") == _expected_losses(folder)
    assert (tmp_path / "elsewhere" / "mlartifacts").is_dir()  # beside that database, not in the working folder
    assert check_run_folder(folder) == []

    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "notes.txt").write_text("not a run")
    assert_one_line_error(cli("track", tmp_path / "loose"), "not a lorawatch run folder")
    # the other one-line errors, without another process each (the unfinished folder: the resume test)
    with pytest.raises(UserError, match="nowhere: no such folder"):
        export_run(tmp_path / "nowhere", MLFLOW)
    with pytest.raises(UserError, match="expected mlflow or tensorboard"):
        export_settings(folder, "wandb")


def _plant_regression(run_dir, rows=40):
    """Every stage's predictions replaced by `rows` rows per task: stage 1 loses 20 stance rows (a regression
    against the previous checkpoint and the base), stage 2 gains 30 sum rows; statistics.json written again."""
    for k in range(3):
        right = {"stance": [k == 0 or i >= 20 for i in range(rows)], "sum": [k == 2 and i < 30 for i in range(rows)]}
        for task, outcomes in right.items():
            store.write_jsonl(RunFolder(run_dir).stage(1, k).path / "predictions" / f"{task}.jsonl",
                              [{"id": f"{task}/test/{i}", "task": task, "gold": "A", "correct": r,
                                "prediction": "A" if r else "B", "output_ids": None, "raw_output": "A" if r else "B"}
                               for i, r in enumerate(outcomes)])
    return verdicts.write_seed_statistics(run_dir, 1, load_run_config(run_dir).statistics)


def _expected_statistics(record):
    """(key, step, value) of every tracked statistic, straight from the record."""
    expected = [(f"summary/{h.metric}_{end}", 0, getattr(h, end.removeprefix("ci_")))
                for h in record.headline for end in ("ci_low", "ci_high")]
    for c in record.comparisons:
        base = f"verdict/vs_{c.against}/"
        expected += [(f"{base}regressed_tasks", c.stage, len(c.regressed())),
                     (f"{base}max_negative_flip_rate", c.stage, max(t.negative_flip_rate for t in c.tasks))]
        expected += [(f"{base}{t.task}/{field}", c.stage, getattr(t, field)) for t in c.tasks
                     for field in ("p_adjusted", "difference", "ci_low", "ci_high")]
        expected += [(f"{base}kl_change", c.stage, c.kl_after - c.kl_before),
                     (f"{base}kl_change_ci_low", c.stage, c.kl_ci_low),
                     (f"{base}kl_change_ci_high", c.stage, c.kl_ci_high)]
    expected += [("summary/final_avg_vs_base", 0, verdict_view.interval_of(record, None, "final_avg_vs_base").value)]
    steps = {name: k for k, name in enumerate(["base", "stance", "sum"])}
    expected += [(f"stage/accuracy_ci_{end}/{a.task}", steps[a.checkpoint], getattr(a, end))
                 for a in record.accuracy for end in ("low", "high")]
    return expected


def test_the_verdicts_and_intervals_are_tracked_once(runs, tmp_path):
    _, tracked, plain = runs
    # live: the seed's statistics arrive with the run's end, one point per step
    [entry] = _recorded(tracked)
    client = _client(tracked)
    record = store.read_record(RunFolder(tracked).seed(1).path / layout.STATISTICS, schema.StatisticsRecord)
    for key, step, value in _expected_statistics(record):
        history = _history(client, entry.run_id, key)
        assert dict(history)[step] == pytest.approx(value, abs=1e-12), key
        assert len({s for s, _ in history}) == len(history), f"{key} logged twice"
    assert [s for s, _ in _history(client, entry.run_id, "verdict/vs_base/regressed_tasks")] == [1, 2]

    # exported after the fact, a folder with a regression: the same keys, to MLflow and to TensorBoard
    folder = tmp_path / "regressed"
    shutil.copytree(plain, folder)
    record = _plant_regression(folder)
    export_run(folder, MLFLOW)
    [entry] = _recorded(folder)
    client = _client(folder)
    assert _history(client, entry.run_id, "verdict/vs_previous/regressed_tasks") == [(1, 1.0), (2, 0.0)]
    assert _history(client, entry.run_id, "verdict/vs_base/regressed_tasks") == [(1, 1.0), (2, 1.0)]
    assert _history(client, entry.run_id, "verdict/vs_previous/max_negative_flip_rate") == [(1, 0.5), (2, 0.0)]
    assert _history(client, entry.run_id, "verdict/vs_previous/sum/p_adjusted")[1] == (2, pytest.approx(4 * 0.5 ** 30))
    for key, step, value in _expected_statistics(record):
        assert dict(_history(client, entry.run_id, key))[step] == pytest.approx(value, abs=1e-12), key
    assert export_run(folder, MLFLOW).endswith("(logged before)")  # again: nothing is logged twice
    assert len(_history(client, entry.run_id, "verdict/vs_base/regressed_tasks")) == 2

    export_run(folder, TENSORBOARD)
    _, scalars = _scalars(folder / "tensorboard" / "tiny")
    for key, step, value in _expected_statistics(record):  # (float32 in the event files)
        assert dict(scalars[key])[step] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert scalars["verdict/vs_base/regressed_tasks"] == [(1, 1.0), (2, 1.0)]


def test_several_seeds_track_each_seed_and_the_interval_over_seeds(tmp_path):
    """The committed version-0 folder (two seeds, no statistics.json: computed when exported)."""
    folder = tmp_path / "run-v0"
    shutil.copytree(RUN_V0, folder)
    export_run(folder, MLFLOW)
    [entry] = _recorded(folder)
    metrics = _client(folder).get_run(entry.run_id).data.metrics
    summary = store.read_record(RunFolder(folder).summary_folder / "summary.json", schema.Summary)
    values = [summary.per_seed[s]["final_avg_accuracy"] for s in ("1", "2")]
    mean, half = sum(values) / 2, 12.7062047 * abs(values[0] - values[1]) / 2  # t(0.975, 1 df) · sd / √2
    assert metrics["summary/final_avg_accuracy_ci_low"] == pytest.approx(mean - half)
    assert metrics["summary/final_avg_accuracy_ci_high"] == pytest.approx(mean + half)
    assert summary.mean_std["final_avg_accuracy"].ci_low is None  # a summary from before the intervals
    for seed in (1, 2):
        record = verdicts.load_seed_statistics(folder, seed, load_run_config(folder).statistics)
        bwt = next(h for h in record.headline if h.metric == "bwt")
        assert metrics[f"seed{seed}/summary/bwt_ci_low"] == bwt.low
        assert metrics[f"seed{seed}/verdict/vs_base/regressed_tasks"] == len(record.comparison(2, "base").regressed())
        assert f"seed{seed}/verdict/vs_previous/stance/p_adjusted" in metrics
    assert not (RunFolder(folder).seed(1).path / layout.STATISTICS).exists()  # exporting writes nothing in the folder
