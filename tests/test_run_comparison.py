"""`lorawatch compare` between runs on the same rows (report/run_comparison.py): run folders built to differ by a regression
or by noise, checked against scipy and against a bootstrap written here; rows that differ and a folder given twice
are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tiny import assert_one_line_error, cli
from helpers import outcomes, reference_kl, write_run
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import store
from lorawatch.config import StatisticsSettings
from lorawatch.errors import UserError
from lorawatch.report.run_comparison import compare_final, compare_runs_paired, csv_rows, markdown

BASE = {"stance": outcomes(12), "science": outcomes(20)}
STAGE1 = {"stance": outcomes(24, flip_up=12, before=12), "science": outcomes(20)}
FINAL = {"stance": outcomes(24), "science": outcomes(25, flip_up=5, before=20)}  # the baseline's final checkpoint
SETTINGS = StatisticsSettings()


def final_like(stance: list[bool], science: list[bool] = FINAL["science"]) -> list[dict[str, list[bool]]]:
    return [BASE, STAGE1, {"stance": stance, "science": science}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    return {
        "base": write_run(root / "base", final_like(FINAL["stance"]), [0.0, 0.2, 0.5], seeds=(1, 2)),
        # loses 16 of the baseline's 24 right stance rows and gains none; drifts further (0.9 and 0.8 against 0.5)
        "worse": write_run(root / "worse", final_like(outcomes(8, flip_down=16, before=24)),
                           {1: [0.0, 0.2, 0.9], 2: [0.0, 0.2, 0.8], 3: [0.0, 0.2, 0.7]}, seeds=(1, 2, 3)),
        # 4 stance rows right -> wrong and 2 wrong -> right, 2 science rows wrong -> right: noise
        "noisy": write_run(root / "noisy", final_like(outcomes(22, flip_down=4, flip_up=2, before=24),
                                                      outcomes(27, flip_up=2, before=25)), [0.0, 0.2, 0.52],
                           seeds=(1, 2)),
    }


def test_compare_finds_the_regression_through_the_command_line(runs, tmp_path):
    result = cli("compare", runs["base"], runs["worse"], "--out", tmp_path / "out", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "Is it real? worse against base (the baseline)" in out
    assert "↓16 ↑0 · p 6.1e-05 · REGRESSED" in out
    assert "seed 1: worse regressed on 1 of 2 tasks (stance), improved on 0" in out
    assert "seed 3 only in worse: not compared" in out

    paired = json.loads((tmp_path / "out" / "compare.json").read_text())["paired"][0]
    assert (paired["baseline"], paired["run"], paired["run_only"]) == ("base", "worse", [3])
    assert [s["seed"] for s in paired["seeds"]] == [1, 2]
    stance, science = paired["seeds"][0]["tasks"]
    assert (stance["n"], stance["regressed"], stance["improved"], stance["verdict"]) == (40, 16, 0, "regressed")
    assert (stance["accuracy_before"], stance["accuracy_after"]) == (0.6, 0.2)
    assert stance["negative_flip_rate"] == pytest.approx(0.4)
    assert stance["p_value"] == pytest.approx(stats.binomtest(0, 16, 0.5).pvalue, rel=1e-9)
    assert stance["p_adjusted"] == pytest.approx(2 * stats.binomtest(0, 16, 0.5).pvalue, rel=1e-9)  # Holm, 2 tasks
    assert stance["ci_low"] < -0.4 < stance["ci_high"] < 0
    assert (science["regressed"], science["improved"], science["p_value"], science["verdict"]) == (
        0, 0, 1.0, "no detectable change")
    average, kl = paired["seeds"][0]["final_avg_accuracy"], paired["seeds"][0]["final_kl_to_base"]
    assert (average["n"], average["baseline"], average["run"]) == (80, 0.6125, 0.4125)
    assert average["difference"] == pytest.approx(-0.2) and average["low"] < -0.2 < average["high"] < 0
    assert kl["n"] == 20 and kl["difference"] == pytest.approx(0.4) and 0 < kl["low"] < 0.4 < kl["high"]

    md = (tmp_path / "out" / "compare.md").read_text()
    assert "## Is it real? Each run against base" in md and "### worse against base" in md
    assert "| 1 | stance | 40 | 0.600 | 0.200 | 0.400 | −0.400 [" in md and "| ↓16 ↑0 | 6.1e-05 | REGRESSED |" in md
    assert "| final KL to base | 1, 2 | +0.3500 [" in md


def test_noise_is_no_detectable_change(runs):
    comparison = compare_runs_paired("base", "noisy", {1: (runs["base"], runs["noisy"])}, SETTINGS)
    stance, science = comparison.seeds[0].tasks
    assert (stance.regressed, stance.improved, science.regressed, science.improved) == (4, 2, 0, 2)
    assert stance.p_value == pytest.approx(stats.binomtest(2, 6, 0.5).pvalue)
    assert science.p_value == pytest.approx(stats.binomtest(0, 2, 0.5).pvalue)
    assert [t.verdict for t in comparison.seeds[0].tasks] == ["no detectable change"] * 2
    assert stance.ci_low < stance.difference < stance.ci_high and stance.ci_low < 0 < stance.ci_high
    assert "regressed on 0 of 2 tasks, improved on 0" in markdown(comparison)


def test_average_and_kl_intervals_agree_with_a_bootstrap_written_here(runs):
    """The final average accuracy resamples rows within each task, the same indices for both runs; the KL the
    reference rows. An independent numpy bootstrap lands within Monte Carlo error of the percentile bounds."""
    found = compare_final(runs["base"], runs["noisy"], 1, SETTINGS)
    rng = np.random.default_rng(7)
    pairs = [(np.array(FINAL["stance"]), np.array(outcomes(22, flip_down=4, flip_up=2, before=24))),
             (np.array(FINAL["science"]), np.array(outcomes(27, flip_up=2, before=25)))]
    draws = np.zeros(20000)
    for before, after in pairs:
        index = rng.integers(0, before.size, size=(draws.size, before.size))
        draws += (after[index].mean(axis=1) - before[index].mean(axis=1)) / len(pairs)
    low, high = np.percentile(draws, [2.5, 97.5])
    average = found.final_avg_accuracy
    assert average.difference == pytest.approx((-2 + 2) / 80)
    step = 1 / 80 + 1e-9  # the resampled averages lie on a grid of 1/80: a bound may land one step over
    assert average.low == pytest.approx(low, abs=step) and average.high == pytest.approx(high, abs=step)
    before, after = np.array(reference_kl(0.5)), np.array(reference_kl(0.52))
    index = rng.integers(0, before.size, size=(20000, before.size))
    low, high = np.percentile(after[index].mean(axis=1) - before[index].mean(axis=1), [2.5, 97.5])
    kl = found.final_kl_to_base
    assert (kl.n, kl.baseline, kl.run) == (20, pytest.approx(0.5), pytest.approx(0.52))
    assert kl.low == pytest.approx(low, abs=5e-4) and kl.high == pytest.approx(high, abs=5e-4)


def test_means_over_seeds_use_a_t_interval(runs):
    comparison = compare_runs_paired("base", "worse", {s: (runs["base"], runs["worse"]) for s in (1, 2)}, SETTINGS,
                                     run_only=[3])
    kl = next(m for m in comparison.across_seeds if m.measure == "final_kl_to_base")
    differences = [0.4, 0.3]
    expected = stats.t.interval(0.95, 1, loc=np.mean(differences), scale=np.std(differences, ddof=1) / np.sqrt(2))
    assert kl.seeds == [1, 2] and kl.mean == pytest.approx(0.35)
    assert (kl.low, kl.high) == (pytest.approx(expected[0]), pytest.approx(expected[1]))
    stance = next(m for m in comparison.across_seeds if m.task == "stance")
    assert (stance.mean, stance.low, stance.high) == (pytest.approx(-0.4),) * 3  # the same in both seeds
    rows = csv_rows(comparison)
    assert [r["measure"] for r in rows if r["seed"] == 1] == ["accuracy", "accuracy", "final_avg_accuracy",
                                                              "final_kl_to_base"]
    assert {r["interval"] for r in rows if r["seed"] is None} == {"t over 2 seeds"}
    lonely = compare_runs_paired("base", "worse", {}, SETTINGS, baseline_only=[1], run_only=[3])
    assert lonely.seeds == [] and "no seed in common" in markdown(lonely)


def _rewrite_ids(run: Path, filename: str, change) -> None:
    for path in run.rglob(filename):
        rows = store.read_jsonl(path)
        store.write_jsonl(path, [{**row, "id": change(row["id"])} for row in rows])


def test_rows_that_differ_are_a_one_line_error_naming_the_file(runs, tmp_path):
    other = write_run(tmp_path / "other", final_like(FINAL["stance"]), [0.0, 0.2, 0.5])
    _rewrite_ids(other, "stance.jsonl", lambda i: i if i != "stance-3" else "stance-x")  # in every stage
    result = cli("compare", runs["base"], other)
    assert_one_line_error(result, str(RunFolder(other).stage(1, 2).path / "predictions" / "stance.jsonl"),
                          "rows are not those of", "2 example ids in only one of them")
    moved = write_run(tmp_path / "moved", final_like(FINAL["stance"]), [0.0, 0.2, 0.5],
                      reference_ids=[f"other-{i}" for i in range(20)])
    with pytest.raises(UserError, match=r"stage-2/reference_drift.jsonl: its reference rows are not those of"):
        compare_final(runs["base"], moved, 1, SETTINGS)


def test_the_same_run_twice_is_a_one_line_error(runs):
    assert_one_line_error(cli("compare", runs["base"], runs["base"]), "given twice")
    again = runs["worse"] / ".." / runs["base"].name  # the same folder by another path
    assert_one_line_error(cli("compare", runs["base"], runs["worse"], again), "given twice",
                          f"also as {runs['base']}")
