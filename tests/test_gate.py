"""`lorawatch gate` through the command line, and the verdicts it rests on, on run folders built to regress or not:
real files in the run folder's layout, read back by the same code as a real run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tiny import cli, lorawatch
from helpers import outcomes, write_run
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import schema, store


BASE = {"stance": outcomes(12), "science": outcomes(20)}
STAGE1 = {"stance": outcomes(24, flip_up=12, before=12), "science": outcomes(20)}


@pytest.fixture(scope="module")
def regressed_run(tmp_path_factory) -> Path:
    """Stage 2 (science) loses 16 of stance's 24 right rows and gains none: a regression no test size hides."""
    stage2 = {"stance": outcomes(8, flip_down=16, before=24), "science": outcomes(25, flip_up=5, before=20)}
    return write_run(tmp_path_factory.mktemp("gate") / "regressed", [BASE, STAGE1, stage2], [0.0, 0.2, 0.9])


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory) -> Path:
    """Stage 2 flips 3 of stance's rows each way: noise, not a regression."""
    stage2 = {"stance": [*outcomes(24, flip_down=3, flip_up=3, before=24)], "science": outcomes(23, flip_up=3,
                                                                                                before=20)}
    return write_run(tmp_path_factory.mktemp("gate") / "healthy", [BASE, STAGE1, stage2], [0.0, 0.2, 0.3])


def test_gate_fails_a_run_built_to_regress_and_says_why(regressed_run):
    result = lorawatch("gate", regressed_run)
    assert result.returncode == 2, result.stderr
    reasons = [line for line in result.stdout.splitlines() if line.startswith("reason: ")]
    assert len(reasons) == 1 and "stance regressed" in reasons[0] and "0.600 → 0.200" in reasons[0]
    assert "↓16 ↑0" in reasons[0] and "stage 2 (science) against stage 1 (stance)" in reasons[0]
    assert result.stdout.strip().splitlines()[-1] == "gate: failed (1 reason(s))"
    as_json = json.loads(cli("gate", regressed_run, "--json").stdout)
    assert as_json["passed"] is False
    stance = as_json["checks"][0]["comparison"]["tasks"][0]
    assert (stance["task"], stance["regressed"], stance["improved"], stance["verdict"]) == ("stance", 16, 0,
                                                                                           "regressed")
    assert stance["negative_flip_rate"] == pytest.approx(16 / 40)


def test_gate_passes_a_run_that_does_not_regress(healthy_run):
    result = lorawatch("gate", healthy_run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reason:" not in result.stdout and result.stdout.strip().endswith("gate: passed")
    # against the base, stance is still up (0.30 -> 0.60): nothing regressed there either
    assert cli("gate", healthy_run, "--against", "base").returncode == 0


def test_gate_limits_on_flips_and_drift(healthy_run):
    result = cli("gate", healthy_run, "--max-nfr", "0.05", "--max-kl", "0.25")
    assert result.returncode == 2
    reasons = [line for line in result.stdout.splitlines() if line.startswith("reason: ")]
    assert any("stance negative flip rate 0.075 (3 of 40 rows right → wrong) > --max-nfr 0.05" in r for r in reasons)
    assert any("KL to base on the reference set 0.3000 > --max-kl 0.25" in r for r in reasons)
    assert cli("gate", healthy_run, "--max-nfr", "0.1", "--max-kl", "0.5").returncode == 0


def test_gate_names_any_two_stages_and_any_alpha(regressed_run):
    # stage 2 against stage 1 by number is the default comparison
    assert cli("gate", regressed_run, "--stage", "2", "--against", "1").returncode == 2
    # stage 1 against the base: stance went up, nothing regressed
    assert cli("gate", regressed_run, "--stage", "1", "--against", "base").returncode == 0
    # p for 16 flips one way is 3e-5: only an absurdly small alpha lets it through
    assert cli("gate", regressed_run, "--alpha", "1e-6").returncode == 0


def test_gate_errors_exit_1_with_one_line(regressed_run, tmp_path):
    for args, fragment in [((tmp_path / "nowhere",), "no such folder"),
                           ((regressed_run, "--against", "7"), "no finished stage 7"),
                           ((regressed_run, "--stage", "0"), "no previous checkpoint"),
                           ((regressed_run, "--stage", "two"), "--stage: expected last or a stage number"),
                           ((regressed_run, "--alpha", "2"), "--alpha: expected a level between 0 and 1"),
                           ((tmp_path,), "neither a lorawatch run folder nor a study folder")]:
        result = cli("gate", *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_gate_covers_every_unit_of_a_study(regressed_run, healthy_run, tmp_path):
    study = tmp_path / "study"
    (study / "runs").mkdir(parents=True)
    (study / "study.json").write_text("{}")
    for run in (regressed_run, healthy_run):
        shutil.copytree(run, study / "runs" / run.name)
    result = cli("gate", study)
    assert result.returncode == 2
    assert [line.split()[0] for line in result.stdout.splitlines()[:2]] == ["pass", "FAIL"]  # healthy, regressed


def test_statistics_record_holds_intervals_verdicts_and_detectable_drops(regressed_run):
    record = store.read_record(RunFolder(regressed_run).seed(1).path / "statistics.json", schema.StatisticsRecord)
    assert record.schema_version == schema.SCHEMA_VERSION
    cell = next(a for a in record.accuracy if a.checkpoint == "science" and a.task == "stance")
    assert (cell.n, cell.correct, cell.accuracy) == (40, 8, 0.2) and cell.low < 0.2 < cell.high
    previous = record.comparison(2, "previous")
    assert [t.verdict for t in previous.tasks] == ["regressed", "no detectable change"]  # science: 5 up, p 0.0625
    assert previous.kl_after - previous.kl_before == pytest.approx(0.7)  # KL 0.2 -> 0.9 on every reference row
    assert previous.kl_ci_low <= 0.7 <= previous.kl_ci_high
    base = record.comparison(2, "base")
    assert base.against_checkpoint == "base" and base.tasks[0].difference == pytest.approx(-0.1)
    assert {m.metric for m in record.headline} >= {"final_avg_accuracy", "bwt"}
    bwt = next(m for m in record.headline if m.metric == "bwt")
    assert bwt.value == pytest.approx(-0.4) and bwt.low <= -0.4 <= bwt.high
    assert [(d.task, d.n, d.min_flips) for d in record.detectable] == [("stance", 40, 7), ("science", 40, 7)]
    summary = store.read_record(RunFolder(regressed_run).summary_folder / "summary.json", schema.Summary)
    assert summary.mean_std["final_avg_accuracy"].ci_low is None  # one seed: no interval over seeds


def test_show_prints_intervals_and_the_verdicts(regressed_run):
    result = cli("show", regressed_run, env={"COLUMNS": "160"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "0.200 [0.10, 0.35]" in out  # stance after science: 8 of 40, Wilson
    assert "REGRESSED" in out and "Regressions: seed 1: science regressed on stance against the previous checkpoint" \
        in " ".join(out.split())
    assert "40 rows cannot show a drop smaller than 0.175" in " ".join(out.split())


def test_a_folder_from_before_statistics_still_shows_and_gates(tmp_path):
    """tests/data/run-v0 predates statistics.json: its statistics are computed from its predictions, and the
    folder is left as it was."""
    run = tmp_path / "run-v0"
    shutil.copytree(Path(__file__).parent / "data" / "run-v0", run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert cli("show", run).returncode == 0
    result = cli("gate", run, "--against", "base")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert cli("check", run).returncode == 0
