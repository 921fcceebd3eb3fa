"""Live drift monitoring and its four actions on real (tiny-model) training runs."""

import json
import math

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import store
from lorawatch.report.compare import compare_runs, write_comparison
from lorawatch.config import build_config
from lorawatch.errors import ConfigError, UserError
from lorawatch.recipe.monitor import calibrated_threshold
from lorawatch.recipe.lora import lora_config
from lorawatch.recipe.run import run_experiment
from tiny import assert_one_line_error, cli, config_file, tiny_config, write_task_files

ADAPTER = "adapter/adapter_model.safetensors"


def monitored(model_dir, data_dir, **monitor):
    config = tiny_config(model_dir, data_dir, seeds=(1,)).model_dump(mode="json")
    config["train"].update(epochs=3)  # 8 rows, batch 2 x accumulation 2: 6 optimizer steps per stage
    if monitor:
        config["monitor"] = {"every": 1, **monitor}
    return build_config(config)


def series(run_dir, stage):
    return store.read_jsonl(RunFolder(run_dir).stage(1, stage).path / "monitor.jsonl")


def stage_info(run_dir, stage):
    return store.read_json(RunFolder(run_dir).stage(1, stage).path / "stage.json")


@pytest.fixture(scope="module")
def watched(tiny_model_dir, tmp_path_factory):
    """An unmonitored run and the same run watched (action warn, no threshold): the live KL series."""
    root = tmp_path_factory.mktemp("monitor")
    write_task_files(root / "data")
    plain = run_experiment(monitored(tiny_model_dir, root / "data"), root / "plain")
    warn = run_experiment(monitored(tiny_model_dir, root / "data", action="warn"), root / "warn")
    return root, plain, warn


def test_warn_records_the_series_and_changes_nothing(watched):
    root, plain, warn = watched
    for stage in (1, 2):
        points = series(warn, stage)
        assert [p["step"] for p in points] == [1, 2, 3, 4, 5, 6]
        assert all(p["kl_mean"] > 0 and p["threshold"] is None and not p["above"] for p in points)
        # the last live measurement is the evaluated checkpoint's drift (same weights, another code path)
        evaluated = store.read_json(RunFolder(warn).stage(1, stage).path / "reference_stats.json")["kl_mean"]
        assert math.isclose(points[-1]["kl_mean"], evaluated, rel_tol=1e-3, abs_tol=1e-6)
        warned, unwatched = (load_file(RunFolder(run).stage(1, stage).path / ADAPTER) for run in (warn, plain))
        assert warned.keys() == unwatched.keys()
        assert all(torch.equal(warned[k], unwatched[k]) for k in warned)  # by value: the same adapter
        for name in ("predictions/stance.jsonl", "predictions/sum.jsonl", "scores.json"):
            assert (RunFolder(warn).stage(1, stage).path / name).read_text() == \
                (RunFolder(plain).stage(1, stage).path / name).read_text()
    costs = store.read_json(warn / "costs.json")["phase_seconds"]
    assert 0 < costs["monitor"] < costs["training"]


def _crossing_threshold(points):
    """A threshold that the series crosses between two measurements, with at least one point below."""
    for k in range(1, len(points)):
        if points[k]["kl_mean"] > points[k - 1]["kl_mean"] and all(p["kl_mean"] < points[k]["kl_mean"]
                                                                      for p in points[:k]):
            return k, (max(p["kl_mean"] for p in points[:k]) + points[k]["kl_mean"]) / 2
    pytest.fail("the KL series never rose")


def _run_crossing_stage_1(watched, model_dir, action):
    """The run with `action` at a threshold that warn's stage-1 series crosses: (series, crossing index,
    threshold, run folder)."""
    root, _, warn = watched
    points = series(warn, 1)
    k, threshold = _crossing_threshold(points)
    run = run_experiment(monitored(model_dir, root / "data", action=action, threshold=threshold), root / action)
    return points, k, threshold, run


def test_stop_ends_the_stage_at_the_crossing_and_keeps_the_last_step_below(watched, tiny_model_dir):
    points, k, threshold, run = _run_crossing_stage_1(watched, tiny_model_dir, "stop")
    info = stage_info(run, 1)
    assert info["training"]["optimizer_steps"] == points[k]["step"] and info["training"]["stopped_early"]
    seen = series(run, 1)
    assert [p["step"] for p in seen] == [p["step"] for p in points[:k + 1]] and seen[-1]["above"]
    intervention = info["intervention"]
    assert intervention["action"] == "stop" and intervention["step"] == points[k]["step"]
    assert intervention["kept_step"] == points[k - 1]["step"]
    # the stage keeps exactly the weights of the kept step: its evaluated drift is that step's live drift
    evaluated = store.read_json(RunFolder(run).stage(1, 1).path / "reference_stats.json")["kl_mean"]
    assert math.isclose(evaluated, points[k - 1]["kl_mean"], rel_tol=1e-3, abs_tol=1e-6)
    assert evaluated <= threshold
    shown = cli("show", run)
    assert shown.returncode == 0


def _acting_measurement(points, threshold, patience):
    """Index of the measurement that sets the action off: the end of the first streak of `patience` measurements
    above the threshold, or the stage's last measurement when it is above."""
    streak = 0
    for i, point in enumerate(points):
        streak = streak + 1 if point["kl_mean"] > threshold else 0
        if streak and (streak >= patience or i == len(points) - 1):
            return i
    return None


@pytest.mark.parametrize("patience", [2, 99])
def test_stop_with_patience_waits_for_consecutive_measurements_above(watched, tiny_model_dir, patience):
    root, _, warn = watched
    points = series(warn, 1)
    k, threshold = _crossing_threshold(points)
    j = _acting_measurement(points, threshold, patience)
    assert j is not None and j > k  # the premise: the first crossing alone no longer stops the stage
    run = run_experiment(monitored(tiny_model_dir, root / "data", action="stop", threshold=threshold,
                                   patience=patience), root / f"stop-patience-{patience}")
    info = stage_info(run, 1)
    # training went on past the first crossing, exactly as the unmonitored stage did, until the streak was long
    # enough (patience 99: never, so the stage's last measurement acted)
    seen = series(run, 1)
    assert [round(p["kl_mean"], 6) for p in seen] == [round(p["kl_mean"], 6) for p in points[:j + 1]]
    assert info["training"]["optimizer_steps"] == points[j]["step"]
    assert info["training"]["stopped_early"] == (j < len(points) - 1)
    intervention = info["intervention"]
    assert intervention["step"] == points[j]["step"] and info["training"]["monitor"]["patience"] == patience
    kept = max(i for i in range(j) if points[i]["kl_mean"] <= threshold)
    assert intervention["kept_step"] == points[kept]["step"]
    evaluated = store.read_json(RunFolder(run).stage(1, 1).path / "reference_stats.json")["kl_mean"]
    assert math.isclose(evaluated, points[kept]["kl_mean"], rel_tol=1e-3, abs_tol=1e-6)


def test_revert_keeps_the_previous_adapter_bit_for_bit(watched, tiny_model_dir):
    root, _, warn = watched
    # above the first stage's start (KL 0) at once: every stage is reverted
    run = run_experiment(monitored(tiny_model_dir, root / "data", action="revert", threshold=1e-9), root / "revert")
    config = build_config(store.read_json(run / "config.json"))
    torch.manual_seed(1)
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           lora_config(config))
    initial = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    from lorawatch.analysis.adapter_flags import inactive_adapters

    assert inactive_adapters(run, [1]) == []
    first, second = (load_file(RunFolder(run).stage(1, s).path / ADAPTER) for s in (1, 2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # stage 1 went back to the adapter as initialised; stage 2 started from it and went back to it too
    by_suffix = {k.split("base_model.model.")[-1].replace(".default", ""): v for k, v in initial.items()}
    for key, value in first.items():
        assert torch.equal(value, by_suffix[key.split("base_model.model.")[-1]]), key
    for stage in (1, 2):
        info = stage_info(run, stage)
        assert info["intervention"]["action"] == "revert" and info["intervention"]["kept_step"] == 0
        assert info["training"]["optimizer_steps"] == 1  # stopped at the first measurement
        # the base model's distributions, as the monitor left them: recorded, but not flagged as a dead adapter
        assert info["adapter_check"]["active"] is False
        for name in ("predictions/stance.jsonl", "predictions/sum.jsonl"):
            assert (RunFolder(run).stage(1, stage).path / name).read_text() == \
                (RunFolder(run).stage(1, 0).path / name).read_text()


def test_rollback_keeps_the_best_step_under_the_threshold(watched, tiny_model_dir):
    points, k, threshold, run = _run_crossing_stage_1(watched, tiny_model_dir, "rollback")
    seen = series(run, 1)
    # rollback trains the whole stage; the measurements do not disturb training, so the series is warn's
    assert [round(p["kl_mean"], 6) for p in seen] == [round(p["kl_mean"], 6) for p in points]
    below = [p for p in seen if not p["above"]]
    best = min(below, key=lambda p: (p["train_loss"], -p["step"]))
    info = stage_info(run, 1)
    assert info["training"]["optimizer_steps"] == 6 and info["intervention"]["action"] == "rollback"
    assert info["intervention"]["kept_step"] == best["step"] and info["intervention"]["step"] == points[k]["step"]
    evaluated = store.read_json(RunFolder(run).stage(1, 1).path / "reference_stats.json")["kl_mean"]
    assert math.isclose(evaluated, best["kl_mean"], rel_tol=1e-3, abs_tol=1e-6)


def test_compare_and_report_show_the_monitor(watched, tmp_path):
    root, plain, warn = watched
    stop = root / "stop"
    runs = [plain, warn] + ([stop] if (stop / "summary").is_dir() else [])
    result = compare_runs(runs)
    labels = [r["label"] for r in result["runs"]]
    assert labels[:2] == ["plain", "warn"]
    assert result["runs"][0]["monitor"] is None and result["runs"][1]["monitor"]["params"]["action"] == "warn"
    assert result["runs"][1]["compute"]["monitor_s"] > 0
    files = write_comparison(result, tmp_path / "cmp")
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "final KL to base" in text and "monitor overhead" in text and (tmp_path / "cmp" / "monitor.png").is_file()
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"][1]["label"] == "warn"
    assert all(f.is_file() for f in files)
    assert "| strategy | none | none |" in text and (tmp_path / "cmp" / "figure3.png") in files
    assert "![final accuracy against final KL](figure3.png)" in text
    by_command = cli("compare", plain, warn, "--out", tmp_path / "cli")
    assert by_command.returncode == 0 and "interventions" in by_command.stdout


def test_calibration_from_a_run_folder_and_bad_sources(watched, tmp_path):
    import shutil

    root, plain, _ = watched

    def with_results(name: str, averages: list[float], kls: list[float]):
        """A copy of the run whose stages 0..2 score `averages` (both tasks) at KL to base `kls`."""
        copy = shutil.copytree(plain, tmp_path / name)
        for stage, (average, kl) in enumerate(zip(averages, kls)):
            folder = RunFolder(copy).stage(1, stage).path
            store.write_json(folder / "scores.json", {"stance": average, "sum": average, "reference": 0.5})
            store.write_json(folder / "reference_stats.json", {**store.read_json(folder / "reference_stats.json"),
                                                               "kl_mean": kl})
        return copy

    # stage 1 keeps the base accuracy (equal but for float noise), stage 2 loses it: stage 1's KL is the threshold
    value, how = calibrated_threshold(with_results("one-healthy", [0.275, 0.27499999999999997, 0.2], [0, 0.3, 0.9]))
    assert value == 0.3 and "largest KL of 1 checkpoint(s) without accuracy loss" in how
    with pytest.raises(UserError, match="no trained checkpoint kept"):
        calibrated_threshold(with_results("none-healthy", [0.5, 0.25, 0.25], [0, 0.3, 0.9]))
    with pytest.raises(UserError, match="must be a report folder"):
        calibrated_threshold(tmp_path / "nothing")
    bad = tmp_path / "correlation.json"
    bad.write_text(json.dumps({"failure_zone": {"threshold": None}}))
    with pytest.raises(UserError, match="failure_zone.threshold"):
        calibrated_threshold(bad)
    bad.write_text(json.dumps({"failure_zone": {"threshold": 0.25, "n_failed": 1, "n_healthy": 11}}))
    with pytest.raises(UserError, match="fitted on 1 failed and 11 healthy checkpoint.*at least 3"):
        calibrated_threshold(bad)
    bad.write_text(json.dumps({"failure_zone": {"threshold": 0.25, "n_failed": 3, "n_healthy": 9}}))
    assert calibrated_threshold(tmp_path)[0] == 0.25


def test_monitor_config_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="monitor: action 'stop' needs a threshold|needs a threshold"):
        build_config({**tiny_config(tiny_model_dir, tmp_path).model_dump(mode="json"), "monitor": {"action": "stop"}})
    path = config_file(tmp_path, tiny_model_dir, monitor={"action": "revert", "calibrate_from": "missing-report"})
    assert_one_line_error(cli("run", path, "--out", tmp_path / "r"), "missing-report", "calibrate_from")


def test_monitor_from_the_command_line(tmp_path, tiny_model_dir):
    path = config_file(tmp_path, tiny_model_dir)
    result = cli("run", path, "--out", tmp_path / "run", "--seeds", "4", "--monitor", "revert",
                       "--monitor-threshold", "1e-9", "--monitor-every", "1", "--monitor-patience", "2",
                       "--monitor-signal", "top5_change")
    assert result.returncode == 0, result.stderr
    assert "monitor" in result.stderr and "revert" in result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["monitor"]["action"] == "revert" and config["overrides"]["monitor.threshold"] == 1e-9
    assert config["monitor"]["patience"] == 2
    info = json.loads((tmp_path / "run" / "seed-4" / "stage-1" / "stage.json").read_text())
    # two optimizer steps per stage, both above the threshold: patience 2 acts at the second, not the first
    assert info["intervention"]["action"] == "revert" and info["intervention"]["step"] == 2
    assert info["intervention"]["signal"] == "top5_change" and "top5_change" in result.stderr
    assert info["training"]["optimizer_steps"] == 2 and not info["training"]["stopped_early"]
    assert_one_line_error(cli("run", path, "--out", tmp_path / "r2", "--monitor", "explode"),
                          "monitor.action")
    assert_one_line_error(cli("run", path, "--out", tmp_path / "r3", "--monitor", "warn", "--monitor-signal", "loud"),
                          "monitor.signal")


@pytest.fixture(scope="module")
def watched_signals(tiny_model_dir, tmp_path_factory):
    """For each signal besides KL, the run watched with it (action warn, no threshold): its live series."""
    root = tmp_path_factory.mktemp("signals")
    write_task_files(root / "data")
    # Built to drift on every signal: for gold_drop, reference golds that training never teaches (option E, a
    # negative number), whose probability falls as the tasks' own answers take the mass.
    write_task_files(root / "zebra")
    reference = json.loads((root / "zebra" / "reference.json").read_text())
    (root / "zebra" / "reference.json").write_text(json.dumps([
        {**row, "prompt": row["prompt"].replace("neutral.", "neutral, D. mixed, E. unclear."), "answer": "E"}
        if row.get("task") == "stance" else {**row, "answer": "-5"} for row in reference]))
    return root, {signal: run_experiment(monitored(tiny_model_dir, root / data_for(signal), action="warn",
                                                   signal=signal), root / signal)
                  for signal in WATCHED}


# every signal but KL: the first-token ones, and two span signals (engine/span_drift.py), measured live only when
# watched (two more teacher-forced passes per measurement)
WATCHED = ("kl_forward", "top1_change", "top5_change", "gold_drop", "kl_answer", "gold_span_drop")


def data_for(signal):
    return "zebra" if signal in ("gold_drop", "gold_span_drop") else "data"


@pytest.mark.parametrize("signal", WATCHED)
def test_each_signal_is_measured_live_and_sets_off_its_action(watched_signals, tiny_model_dir, signal):
    from lorawatch.analysis.signals import SPAN_SIGNALS, stage_signal_value

    root, runs = watched_signals
    warn = runs[signal]
    assert store.read_json(warn / "monitor.json")["params"]["signal"] == signal
    points = series(warn, 1)
    values = [p["signal_value"] for p in points]
    # the last live measurement is the evaluated checkpoint's value (same weights, another code path)
    assert math.isclose(values[-1], stage_signal_value(RunFolder(warn).stage(1, 1), signal), rel_tol=1e-3,
                        abs_tol=1e-6)
    # the span signals are measured live (all of them, from the same passes) only when one of them is watched
    measured = signal in SPAN_SIGNALS
    assert all((p["signals"][name] is not None) == measured for p in points for name in SPAN_SIGNALS)
    # A threshold the series crosses (the run drifts on every signal): stop acts at the first measurement above
    # it, on the signal, not on KL.
    # The first measurement that is above every earlier one and above 0; the threshold halfway up to it.
    crossing = next(i for i in range(len(values)) if values[i] > max([0.0] + values[:i]))
    below = max([0.0] + values[:crossing])
    threshold = below + (values[crossing] - below) / 2
    run = run_experiment(monitored(tiny_model_dir, root / data_for(signal), action="stop", threshold=threshold,
                                   signal=signal), root / f"{signal}-stop")
    intervention = stage_info(run, 1)["intervention"]
    assert (intervention["signal"], intervention["step"]) == (signal, points[crossing]["step"])
    assert intervention["value"] == pytest.approx(values[crossing], rel=1e-3, abs=1e-6)
    assert intervention["value"] > threshold


def test_a_signal_without_values_is_refused_in_one_line(watched, tmp_path):
    from lorawatch.analysis.signals import signal_value
    from lorawatch.rundir.schema import ExampleDrift

    old = [ExampleDrift("r1", None, 0.1, 1.0, 0.5, 3)]  # a row written before the drift statistics
    assert signal_value(old, "kl") == 0.1
    with pytest.raises(ValueError, match="top1_change"):
        signal_value(old, "top1_change")
    root, _, warn = watched
    with pytest.raises(UserError, match="a report's failure-zone threshold is a KL"):
        calibrated_threshold(_correlation_file(tmp_path), "gold_drop")


def _correlation_file(folder):
    path = folder / "correlation.json"
    path.write_text(json.dumps({"failure_zone": {"threshold": 0.5, "n_failed": 3, "n_healthy": 3}}))
    return path
