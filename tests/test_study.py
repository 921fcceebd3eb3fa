"""`lorawatch study`: a grid from STUDY.yaml, run here or on an embedded Ray, resumed, reported, planned."""

import json
import os
from pathlib import Path
import signal
import threading
import time

import pytest
import yaml

from tiny import assert_one_line_error, assert_same_results, cli, config_file, lorawatch
import lorawatch as lorawatch_api
from lorawatch.errors import ConfigError, UserError
from lorawatch.rundir.lifecycle import run_lock
from lorawatch.study.folder import study_states, unit_state
from lorawatch.study.spec import load_study_file
from lorawatch.study.driver import run_study

UNITS = ["learning_rate=0.005-original-seed1", "learning_rate=0.005-reversed-seed1",
         "learning_rate=0.01-original-seed1", "learning_rate=0.01-reversed-seed1"]


def write_study(folder, **fields):
    study = {"config": "config.json", "grid": {"train.learning_rate": [0.005, 0.01], "order": ["original", "reversed"]},
             "seeds": [1], "resources": {"cpus": 1}, **fields}
    path = folder / "STUDY.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def local_study(tiny_model_dir, tmp_path_factory):
    """The 2 x 2 study of the tiny model, run with the default backend through the command line, logged live to
    MLflow."""
    root = tmp_path_factory.mktemp("study")
    config_file(root, tiny_model_dir)
    study_file = write_study(root)
    result = cli("study", study_file, "--out", root / "local", "--track", "mlflow",
                       env={"LORAWATCH_BASE_STAGE_CACHE": str(root / "cache-local")})
    assert result.returncode == 0, result.stderr
    return root, study_file, result


@pytest.fixture(scope="module")
def ray_study(local_study, tmp_path_factory):
    """The same study on an embedded Ray with 2 workers; one unit's worker is SIGKILLed in the middle of its
    first stage's training (the first unit to get there pauses, leaving its pid). Logged to TensorBoard by the
    driver as the units finish."""
    pytest.importorskip("ray", reason="the Ray backend's tests need Ray: pip install 'lorawatch[ray]'")
    root, study_file, _ = local_study
    paused = root / "paused.pid"
    env = {"LORAWATCH_BASE_STAGE_CACHE": str(root / "cache-ray"), "LORAWATCH_PAUSE_AT": "1:1:train:2",
           "LORAWATCH_PAUSE_FILE": str(paused), "LORAWATCH_PAUSE_SECONDS": "120"}
    killed, niceness = [], []

    def kill_when_paused() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (paused.is_file() and paused.read_text()):
            time.sleep(0.2)
        if paused.is_file():
            pid = int(paused.read_text())
            niceness.append(os.getpriority(os.PRIO_PROCESS, pid))  # a unit's worker, before it is killed
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_paused, daemon=True)
    killer.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        from rich.console import Console

        code = run_study(study_file, root / "ray", backend="ray", address=None, workers=2, plan=False,
                         as_html=False, console=Console(stderr=True), track="tensorboard")
    killer.join(timeout=5)
    assert niceness == [0]  # Ray's default nice 15 for workers is not a study's: its units are the work
    return root, code, killed


def test_the_grid_expands_into_named_units_with_their_command_lines(local_study):
    root, study_file, _ = local_study
    study = load_study_file(study_file)
    assert [u.name for u in study.units] == UNITS
    config = study.units[2].config()
    assert config.train.learning_rate == 0.01 and config.order == "original" and config.seeds == [1]
    assert config.overrides == {"train.learning_rate": 0.01, "order": "original", "seeds": [1]}
    lines = (root / "local" / "units.txt").read_text().splitlines()
    assert lines[2].startswith("lorawatch run ") and "--set train.learning_rate=0.01 --set order=original --seeds 1" \
        in lines[2] and lines[2].endswith(f"--out {root / 'local' / 'runs' / UNITS[2]}")


def test_a_planned_command_line_records_the_same_config_as_the_study(local_study):
    root, _, _ = local_study
    line = (root / "local" / "units.txt").read_text().splitlines()[1]
    argv = line.split()[1:-2] + ["--out", str(root / "by-hand")]
    # one thread, as the study's units (resources.cpus: 1)
    env = {"LORAWATCH_BASE_STAGE_CACHE": str(root / "cache-local"), "OMP_NUM_THREADS": "1"}
    assert lorawatch(*argv, env=env).returncode == 0
    by_study = json.loads((root / "local" / "runs" / UNITS[1] / "config.json").read_text())
    by_hand = json.loads((root / "by-hand" / "config.json").read_text())
    assert by_study.pop("tracking")["backend"] == "mlflow" and by_hand.pop("tracking") is None  # where it is logged
    assert by_hand == by_study
    assert_same_results(root / "by-hand", root / "local" / "runs" / UNITS[1])


def test_the_local_study_runs_every_unit_and_reports_them_all(local_study):
    root, study_file, result = local_study
    assert result.stdout.strip().splitlines()[-1] == str(root / "local" / "report" / "report.md")
    assert [s.state for s in study_states(root / "local")] == ["done"] * 4
    table3 = (root / "local" / "report" / "table3.md").read_text()
    for label in ("[train.learning_rate=0.005]", "[train.learning_rate=0.01]"):
        assert label in table3
    assert "units, 0 finished before, 4 to run" in result.stderr
    again = cli("study", study_file, "--out", root / "local")
    assert again.returncode == 0 and "4 finished before, 0 to run" in again.stderr
    status = cli("study", "status", root / "local")
    assert status.returncode == 0 and status.stdout.count("done") >= 4 and "4 done" in status.stdout


def test_the_study_report_weighs_the_drift_signals_and_signal_costs_reads_what_they_cost(local_study):
    """On real runs: the report's signal section (the tiny model forgets nothing a paired test shows, so it ranks
    nothing, and the rank correlation has its say), and study/signal_costs.py's table from the runs' costs."""
    import subprocess
    import sys

    root, _, _ = local_study
    md = (root / "local" / "report" / "report.md").read_text()
    assert "## Which drift signal warns best" in md and "### Does the signal grow with the damage?" in md
    assert (root / "local" / "report" / "signal_correlation.csv").is_file()
    script = Path(__file__).resolve().parents[1] / "study" / "signal_costs.py"
    result = subprocess.run([sys.executable, str(script), str(root / "local")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert ": 4 runs, 8 checkpoints, " in result.stdout
    costs = {line.split(" | ")[0].strip("| "): float(line.split(" | ")[1])
             for line in result.stdout.splitlines() if line.startswith("| ") and "median" not in line}
    assert costs["evaluation, s per checkpoint"] > 0 and costs["span drift ÷ evaluation"] > 0


def test_ray_study_finishes_every_unit_with_the_local_results(ray_study):
    root, code, killed = ray_study
    assert code == 0
    for name in UNITS:
        assert_same_results(root / "ray" / "runs" / name, root / "local" / "runs" / name)
    for table in ("table3", "table4", "table5", "table6"):
        assert (root / "ray" / "report" / f"{table}.csv").read_text() == \
            (root / "local" / "report" / f"{table}.csv").read_text()


def test_a_killed_worker_is_retried_and_its_unit_resumes(ray_study):
    root, _, killed = ray_study
    assert len(killed) == 1
    states = {s.name: s for s in study_states(root / "ray")}
    retried = [name for name, s in states.items() if s.attempts == 2]
    assert len(retried) == 1 and all(s.state == "done" for s in states.values())
    history = (root / "ray" / "runs" / retried[0] / "environment_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["mode"] for line in history] == ["new", "resume"]


def test_units_started_together_compute_their_base_stage_once(ray_study):
    root, _, _ = ray_study
    reused = [json.loads((root / "ray" / "runs" / name / "seed-1" / "stage-0" / "stage.json").read_text())
              ["reused_from_cache"] for name in UNITS]
    assert sorted(reused) == [False, True, True, True]


def test_a_failing_unit_is_reported_and_retried_on_the_next_run(tiny_model_dir, tmp_path):
    config_file(tmp_path, tiny_model_dir)
    study_file = write_study(tmp_path, grid={"model": {"missing": {"model.spec": str(tmp_path / "no-model")}}})
    result = cli("study", study_file, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "unit missing-seed1 failed" in result.stderr and "no-model" in result.stderr
    status = cli("study", "status", tmp_path / "out")
    assert status.returncode == 1 and "failed" in status.stdout and "1 failed" in status.stdout
    again = cli("study", study_file, "--out", tmp_path / "out")
    assert again.returncode == 1
    assert json.loads((tmp_path / "out" / "status" / "missing-seed1.json").read_text())["attempts"] == 2
    with pytest.raises(UserError, match="unit.s. missing-seed1 did not finish"):
        lorawatch_api.run_study(study_file, tmp_path / "out")


def test_a_unit_whose_run_folder_is_locked_is_running(tiny_model_dir, tmp_path):
    folder = tmp_path / "runs" / "u"
    folder.mkdir(parents=True)
    assert unit_state(tmp_path, "u", folder).state == "interrupted"
    with run_lock(folder):
        assert unit_state(tmp_path, "u", folder).state == "running"
    assert unit_state(tmp_path, "v", tmp_path / "runs" / "v").state == "waiting"


@pytest.mark.parametrize("study, fragment", [
    ({"config": "config.json", "grid": {"order": []}}, "grid axis 'order' has no values"),
    ({"config": "config.json", "gird": {}}, "field 'gird': unknown field"),
    ({"config": "config.json", "preset": "demo"}, "give 'preset' or 'config', not both"),
    ({"grid": {"order": ["original"]}}, "the study needs a base"),
    ({"config": "config.json", "set": {"train.learnin_rate": 1}}, "field 'train.learnin_rate'"),
    ({"config": "config.json", "grid": {"train.learning_rate": [0.1, -1]}}, "unit learning_rate=-1-seed33"),
    ({"config": "config.json", "grid": {"a": {"x y": {}, "x-y": {"order": "reversed"}}}}, "named 'x-y-seed33'"),
    ({"config": "config.json", "seeds": [1, 1]}, "seeds must be distinct"),
    # fields the study sets in every unit itself: refused, not silently replaced
    ({"config": "config.json", "grid": {"seeds": [[1], [2]]}}, "grid axis 'seeds': the study gives each unit one "
                                                                "seed itself"),
    ({"config": "config.json", "grid": {"m": {"a": {"seeds": [2]}}}}, "grid point 'm.a' sets 'seeds': the study"),
    ({"config": "config.json", "set": {"seeds": [1, 2]}}, "field 'set.seeds': the study gives each unit one seed"),
    ({"config": "config.json", "grid": {"tracking.backend": ["mlflow", "tensorboard"]}},
     "grid axis 'tracking.backend': the study logs its units where its 'tracking:' (or --track) says"),
])
def test_bad_study_files_are_one_line_errors(tiny_model_dir, tmp_path, study, fragment):
    config_file(tmp_path, tiny_model_dir)
    (tmp_path / "STUDY.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    with pytest.raises(ConfigError, match=None) as error:
        load_study_file(tmp_path / "STUDY.yaml")
    assert fragment in str(error.value)
    assert_one_line_error(cli("study", tmp_path / "STUDY.yaml", "--out", tmp_path / "out"), fragment)


def test_a_local_study_is_a_parent_mlflow_run_with_its_units_as_children(local_study):
    mlflow = pytest.importorskip("mlflow", reason="the tracking tests need MLflow: pip install 'lorawatch[mlflow]'")
    root, _, result = local_study
    client = mlflow.MlflowClient(f"sqlite:///{(root / 'local').resolve()}/mlflow.db")
    parent_id = json.loads((root / "local" / "tracking.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["units"] == "4"
    assert {a.path for a in client.list_artifacts(parent_id, "report")} >= {"report/table3.csv", "report/report.md"}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.info.run_name for c in children) == UNITS
    for child in children:
        scores = json.loads((root / "local" / "runs" / child.info.run_name / "seed-1" / "stage-2" / "scores.json")
                            .read_text())
        assert child.info.status == "FINISHED"
        assert child.data.metrics["stage/accuracy/stance"] == scores["stance"]
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 4  # 2 optimizer steps x 2 stages
    assert "logged to mlflow" in result.stderr


def test_a_ray_study_logs_its_finished_units_to_tensorboard_as_children(ray_study):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="the tracking tests need TensorBoard: pip install 'lorawatch[tensorboard]'")
    root, _, _ = ray_study
    parent = json.loads((root / "ray" / "tracking.json").read_text())["run_id"]
    for name in UNITS:
        events = accumulator.EventAccumulator(str(Path(parent) / name))
        events.Reload()
        scores = json.loads((root / "ray" / "runs" / name / "seed-1" / "stage-1" / "scores.json").read_text())
        [point] = [e for e in events.Scalars("stage/accuracy/stance") if e.step == 1]
        assert point.value == pytest.approx(scores["stance"])


def test_a_ray_address_nothing_answers_on_is_one_line(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config_file(tmp_path, tiny_model_dir)
    result = lorawatch("study", write_study(tmp_path), "--backend", "ray", "--address", f"127.0.0.1:{port}",
                       "--out", tmp_path / "out", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --address 127.0.0.1:{port}: no Ray cluster "
                                                              "answers there")


def test_a_unit_that_fails_on_a_folder_of_an_earlier_config_fails_the_study_and_keeps_the_report(tiny_model_dir,
                                                                                                tmp_path):
    """The study file is edited under a finished unit: the unit's run then fails (its folder holds the old config).
    The study exits 1, `study status` shows the unit failed with its error, and the report is not rewritten from
    the old folder; once the folder is deleted, the unit runs anew and the report is written from it."""
    config_file(tmp_path, tiny_model_dir)
    env = {"LORAWATCH_BASE_STAGE_CACHE": str(tmp_path / "cache"), "COLUMNS": "1000"}  # no wrapped lines
    out, unit = tmp_path / "out", "a-seed1"

    def study(learning_rate):
        return write_study(tmp_path, grid={"lr": {"a": {"train.learning_rate": learning_rate}}})

    assert cli("study", study(0.005), "--out", out, env=env).returncode == 0
    report = {path.name: path.read_bytes() for path in (out / "report").glob("*.*")}
    assert "report.md" in report and "table5.csv" in report

    # planned only: the finished folder is not this unit's any more
    assert cli("study", study(0.01), "--out", out, "--plan").returncode == 0
    status = cli("study", "status", out, env=env)
    [row] = [line for line in status.stdout.splitlines() if f" {unit} " in line]
    assert status.returncode == 1 and "1 outdated" in status.stdout and "done" not in status.stdout
    assert [cell.strip() for cell in row.strip("│ ").split("│")][:2] == [unit, "outdated"]
    assert "run folder made with another config (changed: overrides.train.learning_rate, train.learning_rate)" in row

    result = cli("study", study(0.01), "--out", out, env=env)
    assert result.returncode == 1, result.stderr
    stderr = result.stderr
    assert f"unit {unit} failed: {out / 'runs' / unit}: made with another config than the study now gives unit " \
           f"{unit} (changed: overrides.train.learning_rate, train.learning_rate); delete that folder" in stderr
    assert "1 of 1 units did not finish; the report waits for them" in stderr
    assert f"{out / 'report' / 'report.md'} is from an earlier run of the study and was not rewritten" in stderr
    assert "Traceback" not in result.stderr and str(out / "report" / "report.md") not in result.stdout
    assert {path.name: path.read_bytes() for path in (out / "report").glob("*.*")} == report
    status = cli("study", "status", out, env=env)
    [row] = [line for line in status.stdout.splitlines() if f" {unit} " in line]
    assert status.returncode == 1 and "1 failed" in status.stdout and "done" not in status.stdout
    assert [cell.strip() for cell in row.strip("│ ").split("│")][:2] == [unit, "failed"]
    assert "made with another config than the study now gives unit" in row
    recorded = json.loads((out / "status" / f"{unit}.json").read_text())
    assert recorded["state"] == "failed" and recorded["attempts"] == 2

    # the advice works: without the old folder the unit runs with the new config, and the report is written from it
    import shutil

    shutil.rmtree(out / "runs" / unit)
    again = cli("study", study(0.01), "--out", out, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == str(out / "report" / "report.md")
    assert json.loads((out / "runs" / unit / "config.json").read_text())["train"]["learning_rate"] == 0.01
    assert (out / "report" / "table5.csv").read_bytes() != report["table5.csv"]
    status = cli("study", "status", out)
    assert status.returncode == 0 and "1 done" in status.stdout


def test_a_grid_axis_over_seeds_is_refused_before_anything_runs(tiny_model_dir, tmp_path):
    """Each unit's seed is the study's to give: an axis over seeds would make units of one seed that the report
    refuses only after they ran. The study file is refused, naming the axis and the study's `seeds:` list."""
    config_file(tmp_path, tiny_model_dir)
    study_file = write_study(tmp_path, grid={"order": ["original"], "seeds": [1, 2]})
    result = cli("study", study_file, "--out", tmp_path / "out")
    assert_one_line_error(result, f"{study_file}: grid axis 'seeds': the study gives each unit one seed itself",
                          "list the seeds there instead, e.g. seeds: [1, 2]")
    assert not (tmp_path / "out").exists()
    # the way the error points to: the seeds as the study's list, one unit per seed
    study_file = write_study(tmp_path, grid={"order": ["original"]}, seeds=[1, 2])
    assert [(u.name, u.config().seeds) for u in load_study_file(study_file).units] == \
        [("original-seed1", [1]), ("original-seed2", [2])]


def test_every_study_file_of_the_project_expands(tmp_path, monkeypatch):
    """study/*.yaml, the studies the docs are made from: each expands into units whose configs build (the TRACE ones
    with the paper's data fetched from the local copy)."""
    from lorawatch.data.fetch import fetch_dataset
    from lorawatch.study.spec import load_study_file
    from tiny import TRACE_DIR, needs_trace

    needs_trace()
    monkeypatch.setenv("LORAWATCH_DATA", str(tmp_path / "data"))
    fetch_dataset("trace-500", source=str(TRACE_DIR), log=lambda *a, **k: None)
    files = sorted((Path(__file__).resolve().parents[1] / "study").glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        plan = load_study_file(path)
        assert plan.units, path
    signals = load_study_file(files[0].parent / "signals-demo.yaml")
    configs = [unit.config() for unit in signals.units]
    assert len(configs) == 12 and {c.monitor.action for c in configs} == {"warn"}
    assert sorted({c.train.learning_rate for c in configs}) == [1e-4, 5e-4, 2e-3]
