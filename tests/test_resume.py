"""Runs that survive crashes: SIGKILL at several points, resume, and compare with an uninterrupted run."""

import json
import os
import shutil
import signal

import pytest

from lorawatch.rundir.layout import RunFolder
from lorawatch.recipe.protocol import run_lock
from tiny import SRC, assert_one_line_error, assert_same_results, config_file, lorawatch

@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    config = config_file(root, tiny_model_dir)
    reference = root / "uninterrupted"
    result = lorawatch("run", config, "--out", reference, "--seeds", "1",
                       env={"LORAWATCH_BASE_STAGE_CACHE": str(root / "cache-reference")})
    assert result.returncode == 0, result.stderr
    return root, config, reference


def own_base_cache(root, name) -> dict:
    """A base-stage cache of the run's own, as the reference run has: a base stage cached in this test session by
    another test's process (another torch thread count) differs from a computed one by float round-off (1e-6 in
    a margin percentile), which a byte-for-byte comparison would see."""
    return {"LORAWATCH_BASE_STAGE_CACHE": str(root / f"cache-{name}")}


@pytest.mark.parametrize("point", [
    "base:eval:stance",   # during the base evaluation
    "1:1:train:4",        # in the middle of training stage 1
    "1:1:trained",        # after training, before its evaluation
    "1:2:eval:stance",    # during stage 2's evaluation
    "1:2:eval:reference", # after the reference generation (and its drift), before the stage is complete
    "1:1:done",           # between stages
])
def test_sigkill_then_resume_gives_identical_results(setup, point):
    root, config, reference = setup
    out = root / point.replace(":", "-")
    # A base-stage cache of its own, so that the base evaluation really runs (and can be killed).
    cache = {"LORAWATCH_BASE_STAGE_CACHE": str(root / f"cache-{point.replace(':', '-')}")}
    killed = lorawatch("run", config, "--out", out, "--seeds", "1", env={"LORAWATCH_CRASH_AT": point, **cache})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = lorawatch("run", config, "--out", out, "--seeds", "1", env=cache)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_same_results(out, reference)


def test_finished_units_are_not_redone(setup):
    root, config, _ = setup
    out = root / "not-redone"
    assert lorawatch("run", config, "--out", out, "--seeds", "1", env={"LORAWATCH_CRASH_AT": "1:2:trained"}
                     ).returncode == -signal.SIGKILL
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "stage-1" in str(p)}
    assert any(p.name == "adapter_model.safetensors" for p in before)  # stage 1 had finished before the kill
    assert lorawatch("run", config, "--out", out, "--seeds", "1").returncode == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())

    # compare counts the stages of both sessions (costs.json holds only the last one's) and shows no wall time
    from lorawatch.report.compare import compare_runs
    stages = [json.loads((RunFolder(out).stage(1, k).path / "stage.json").read_text()) for k in range(3)]
    compute = compare_runs([out, setup[2]])["runs"][0]["compute"]
    assert compute["resumed"] is True and "wall_s" not in compute
    assert compute["training_s"] == pytest.approx(sum(s["training"]["seconds"] for s in stages[1:]))
    assert compute["eval_s"] == pytest.approx(sum(s["eval_seconds"] for s in stages))
    assert compute["training_s"] > json.loads((out / "costs.json").read_text())["phase_seconds"].get("training", 0)


def test_second_writer_is_refused_with_the_holder_named(setup):
    root, config, reference = setup
    with run_lock(reference):
        result = lorawatch("run", config, "--out", reference, "--seeds", "1")
    assert_one_line_error(result, "already being written by lorawatch pid", str(os.getpid()))
    # the lock died with its holder: the same command now goes through
    assert lorawatch("run", config, "--out", reference, "--seeds", "1").returncode == 0


def test_changed_config_is_refused_unless_forced(setup, tiny_model_dir):
    root, _, reference = setup
    changed = config_file(root / "changed", tiny_model_dir, train={"learning_rate": 1e-3, "batch_size": 2,
                                                                   "grad_accum": 2})
    result = lorawatch("run", changed, "--out", reference, "--seeds", "1")
    assert_one_line_error(result, "different config", "train.learning_rate", "tasks.0.train")
    # finished stages were trained at the old rate: --force does not resume over that (moved data it does)
    forced = lorawatch("run", changed, "--out", reference, "--seeds", "1", "--force")
    assert_one_line_error(forced, "--force cannot resume over train.learning_rate", "--overwrite")
    assert "tasks.0.train" not in forced.stderr


def test_a_run_recorded_before_a_field_existed_still_resumes(setup):
    """A config.json written by an older lorawatch lacks fields added since; their defaults are no change."""
    root, config, reference = setup
    older = root / "older"
    shutil.copytree(reference, older)
    recorded = json.loads((older / "config.json").read_text())
    del recorded["eval"]["token_budget"], recorded["train"]["lr_scheduler"]
    (older / "config.json").write_text(json.dumps(recorded))
    result = lorawatch("run", config, "--out", older, "--seeds", "1")
    assert result.returncode == 0, result.stderr
    assert_same_results(older, reference)


def test_damaged_files_are_detected_and_redone(setup):
    root, config, reference = setup
    out = root / "damaged"
    own = own_base_cache(root, "damaged")
    assert lorawatch("run", config, "--out", out, "--seeds", "1", env=own).returncode == 0
    predictions = RunFolder(out).stage(1, 2).path / "predictions" / "sum.jsonl"
    predictions.write_text(predictions.read_text()[:40])  # truncated JSON
    adapter = RunFolder(out).stage(1, 1).path / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # damaged adapter
    result = lorawatch("run", config, "--out", out, "--seeds", "1", env=own)
    assert result.returncode == 0, result.stderr
    # each damage is one line on stderr, `warning: <message>`, and no source line of lorawatch's follows it
    lines = result.stderr.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("warning: ")]
    assert f"warning: {predictions}: damaged, recomputing it" in [lines[i] for i in warned], result.stderr
    assert any(lines[i].startswith(f"warning: {adapter.parent}: damaged adapter") for i in warned)
    assert "UserWarning" not in result.stderr
    source = {line.strip() for path in (SRC / "lorawatch").rglob("*.py") for line in path.read_text().splitlines()}
    assert not [line for line in lines if line.strip() in source - {""}], result.stderr
    assert_same_results(out, reference)


def test_same_config_twice_is_byte_identical(setup):
    root, config, reference = setup
    again = root / "again"
    assert lorawatch("run", config, "--out", again, "--seeds", "1", env=own_base_cache(root, "again")).returncode == 0
    assert_same_results(again, reference)
