"""Which drift signal warns best (analysis/signal_study.py): AUROC against a by-hand pair count, its stratified
bootstrap interval by coverage simulation, and the whole analysis on run folders built to forget."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from lorawatch.analysis.signal_study import (MIN_PER_CLASS, auroc, auroc_interval, checkpoint_frame,
                                             drop_correlation, signal_table, spearman_interval, youden_cut)
from lorawatch.config import StatisticsSettings
from helpers import outcomes, write_run


def _forgets_or_stays() -> tuple[list[str], list[dict], list[dict]]:
    """Three tasks and two histories of stages 0-2: stage 1 gains 4 stance rows (20 -> 24), then stage 2 either
    loses 16 of them (a regression by the paired verdict) or changes nothing."""
    tasks = ["stance", "science", "sum"]
    healthy = [{t: outcomes(20) for t in tasks}, {"stance": outcomes(24, flip_up=4, before=20),
                                                 "science": outcomes(20), "sum": outcomes(20)}]
    forgets = healthy + [{"stance": outcomes(8, flip_down=16, before=24), "science": outcomes(20),
                          "sum": outcomes(20)}]
    stays = healthy + [{"stance": outcomes(24), "science": outcomes(20), "sum": outcomes(20)}]
    return tasks, forgets, stays


def test_auroc_counts_pairs_and_ties_by_hand():
    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs 0.9>0.5, 0.9>0.1, 0.5=0.5 (a half), 0.5>0.1 -> 3.5 of 4
    assert auroc([0.9, 0.5, 0.5, 0.1], [True, True, False, False]) == 0.875
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert auroc([5, 5, 5, 5], [True, False, True, False]) == 0.5
    with pytest.raises(ValueError):
        auroc([1, 2], [True, True])


def test_auroc_interval_covers_the_true_auroc_about_95_percent_of_the_time():
    """Binormal scores (positives N(d, 1), negatives N(0, 1)): the true AUROC is Φ(d / √2)."""
    d, n, draws = 1.0, 40, 200
    truth = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(7)
    covered = 0
    for draw in range(draws):
        scores = np.concatenate([rng.normal(d, 1, n), rng.normal(0, 1, n)])
        labels = np.array([True] * n + [False] * n)
        low, high = auroc_interval(scores, labels, resamples=500, seed=draw)
        assert low <= auroc(scores, labels) <= high
        covered += low <= truth <= high
    assert 0.90 <= covered / draws <= 0.98, covered / draws


def test_spearman_interval_covers_the_true_rank_correlation_about_95_percent_of_the_time():
    """Bivariate normal with correlation r: the population Spearman ρ is (6/π)·asin(r/2)."""
    from scipy.stats import spearmanr

    r, n, draws = 0.6, 30, 200
    truth = 6 / math.pi * math.asin(r / 2)
    rng = np.random.default_rng(11)
    covered = 0
    for draw in range(draws):
        x, y = rng.multivariate_normal([0, 0], [[1, r], [r, 1]], size=n).T
        low, high = spearman_interval(x, y, resamples=500, seed=draw)
        assert low <= spearmanr(x, y).statistic <= high
        covered += low <= truth <= high
    assert 0.88 <= covered / draws <= 0.98, covered / draws


def test_spearman_interval_leaves_out_resamples_with_a_constant_side():
    # ties and a mostly-constant y: many resamples have one distinct y, and they must not become NaN bounds
    x, y = [0.1, 0.2, 0.2, 0.3, 0.9, 0.9], [0, 0, 0, 0, 0, 0.4]
    low, high = spearman_interval(x, y, resamples=400)
    assert -1 <= low <= high <= 1 and not math.isnan(low)


def test_youden_cut_separates_two_clean_classes():
    cut = youden_cut([0.1, 0.2, 0.3, 0.8, 0.9], [False, False, False, True, True])
    assert 0.3 < cut < 0.8


def test_on_runs_built_to_forget_kl_separates_the_checkpoints_that_forgot(tmp_path):
    """Six seeds, three tasks: in seeds 1-3 the second stage loses 16 of the first task's 24 right rows (a
    regression by the paired verdict) with KL 0.9; elsewhere nothing regresses and KL stays at or below 0.5."""
    tasks, forgets, stays = _forgets_or_stays()
    last = lambda previous: {**previous, "sum": outcomes(20)}  # noqa: E731 — the third stage changes nothing
    stages = {seed: (forgets if seed <= 3 else stays) for seed in range(1, 7)}
    stages = {seed: s + [last(s[-1])] for seed, s in stages.items()}
    kl = {seed: [0.0, 0.2, 0.9 if seed <= 3 else 0.3, 0.5] for seed in range(1, 7)}
    run = write_run(tmp_path / "run", stages, kl, seeds=tuple(range(1, 7)), tasks=tasks)
    frame = checkpoint_frame([("run", run)], StatisticsSettings())
    assert len(frame) == 12  # stages 2 and 3 of six seeds
    forgot = frame[frame["forgot"]]
    assert sorted(zip(forgot["seed"], forgot["stage"])) == [(1, 2), (2, 2), (3, 2)]
    assert set(forgot["regressed_on"]) == {"stance"}
    table = signal_table(frame, resamples=500)
    kl_row = table[table["signal"] == "kl"].iloc[0]
    assert (kl_row["forgot"], kl_row["did_not"]) == (3, 9) and kl_row["auroc"] == 1.0
    assert kl_row["ci_low"] == 1.0 and 0.5 < kl_row["cut"] < 0.9
    assert table.iloc[0]["auroc"] == 1.0  # sorted, best first
    # Folders written before the drift statistics hold the KL alone: the other signals have no values to rank.
    forward = table[table["signal"] == "kl_forward"].iloc[0]
    assert forward["checkpoints"] == 0 and math.isnan(forward["auroc"])
    assert MIN_PER_CLASS == 3

    # The size of the forgetting: stance lost 16 of 40 (0.4) in the checkpoints that forgot; no other checkpoint
    # changed an earlier task (0).
    assert sorted(frame["drop"].round(6).unique()) == [0.0, 0.4]
    correlation = drop_correlation(frame, resamples=500).set_index("signal")
    from scipy.stats import spearmanr

    expected = spearmanr(frame["kl"], frame["drop"])
    assert correlation.loc["kl", "rho"] == pytest.approx(expected.statistic)
    assert correlation.loc["kl", "p_value"] == pytest.approx(expected.pvalue)
    assert correlation.loc["kl", "p_adjusted"] >= correlation.loc["kl", "p_value"]
    assert math.isnan(correlation.loc["kl_forward", "rho"])  # not held by these folders

    # The report's section, its files and figure, from the same folders.
    from lorawatch.report.study_report import write_report

    report = write_report([run], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    section = md[md.index("## Which drift signal warns best"):]
    assert "12), labelled" in section and "3 forgot, 9 did not" in section
    assert f"| kl | 12 | 3 | 1.000 | [1.000, 1.000] | {kl_row['cut']:.4f} |" in section
    assert (tmp_path / "report" / "signals.png").stat().st_size > 5000
    written = pd.read_csv(tmp_path / "report" / "signal_study.csv")
    assert written.set_index("signal").loc["kl", "auroc"] == 1.0
    assert "### Does the signal grow with the damage?" in section
    assert f"| kl | 12 | {expected.statistic:+.3f} |" in section
    assert (tmp_path / "report" / "signals-correlation.png").stat().st_size > 5000
    written = pd.read_csv(tmp_path / "report" / "signal_correlation.csv").set_index("signal")
    assert written.loc["kl", "rho"] == pytest.approx(expected.statistic)

    # The HTML page shows both: the AUROC table and figure, the correlations and theirs.
    from lorawatch.report.html import write_report_html

    page = write_report_html(report, tmp_path / "report" / "report.html").read_text()
    signals = page[page.index('id="signals"'):]
    signals = signals[:signals.index("</section>")]
    assert "Which drift signal warns best" in signals and "3 regressed on an earlier task" in signals
    assert "<td>kl</td><td class=num>12</td><td class=num>3</td><td class=num>1.000</td>" in signals
    assert signals.count("<svg") == 2
    assert f"{expected.statistic:+.3f}" in signals


def test_too_few_checkpoints_of_a_kind_are_not_ranked(tmp_path):
    from lorawatch.report.study_report import write_report

    tasks = ["stance", "science", "sum"]
    stays = [{t: outcomes(20) for t in tasks}] * 4
    run = write_run(tmp_path / "run", stays, [0.0, 0.2, 0.3, 0.4], seeds=(1,), tasks=tasks)
    write_report([run], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Not ranked: at least 3 checkpoints of each kind are needed; these runs have 0 that forgot and 2 that " \
           "did not." in md
    assert "No correlation: at least 8 checkpoints with a varying drop are needed." in md
    assert not (tmp_path / "report" / "signals.png").exists()


def _monitor(run, seed: int, stage: int, kl_series: list[float]) -> None:
    """A monitored stage's monitor.jsonl: KL measured live at optimizer steps 2, 4, 6..."""
    from lorawatch.rundir import store
    from lorawatch.rundir.layout import RunFolder

    store.write_jsonl(RunFolder(run).stage(seed, stage).path / "monitor.jsonl", [
        {"step": 2 * (i + 1), "kl_mean": value, "entropy_mean": 1.0, "margin_mean": 1.0, "train_loss": 1.0,
         "threshold": None, "above": False, "signals": {"kl": value}} for i, value in enumerate(kl_series)])


def test_two_models_are_ranked_apart_and_their_leads_use_their_own_cuts(tmp_path):
    """Model b's KL is ten times model a's: each model alone separates its checkpoints perfectly, pooled they do
    not (b's healthy checkpoints drift more than a's forgetful ones), and a live series of b crosses its own cut
    (7) two steps later than the pooled cut (0.7) would say."""
    from lorawatch.report.study_report import write_report

    tasks, forgets, stays = _forgets_or_stays()
    stages = {seed: (forgets if seed <= 3 else stays) for seed in range(1, 7)}
    stages = {seed: s + [{**s[-1], "sum": outcomes(20)}] for seed, s in stages.items()}
    runs = []
    for name, scale in (("a", 1.0), ("b", 10.0)):
        kl = {seed: [0.0, 0.2 * scale, (0.9 if seed <= 3 else 0.3) * scale, 0.5 * scale] for seed in range(1, 7)}
        # Each model's seeds in two run folders at two learning rates: two report groups, one model.
        for part, (seeds, rate) in enumerate((((1, 2, 4), 1e-4), ((3, 5, 6), 2e-4))):
            run = write_run(tmp_path / f"{name}{part}", {s: stages[s] for s in seeds}, {s: kl[s] for s in seeds},
                            seeds=seeds, tasks=tasks, model={"spec": f"org/model-{name}"},
                            train={"learning_rate": rate})
            for seed in set(seeds) & {1, 2, 3}:
                _monitor(run, seed, 2, [0.2 * scale, 0.75 * scale, 0.9 * scale])
            runs.append(run)

    write_report(runs, tmp_path / "report")
    pooled = pd.read_csv(tmp_path / "report" / "signal_study.csv").set_index("signal")
    assert pooled.loc["kl", "forgot"] == 6 and pooled.loc["kl", "auroc"] < 1.0
    by_model = pd.read_csv(tmp_path / "report" / "signal_study_by_model.csv")
    kl_rows = by_model[by_model["signal"] == "kl"].set_index("model")
    assert list(kl_rows.index) == ["model-a", "model-b"]
    assert (kl_rows["auroc"] == 1.0).all() and (kl_rows["forgot"] == 3).all()
    assert kl_rows.loc["model-a", "cut"] == pytest.approx(0.7) and kl_rows.loc["model-b", "cut"] == pytest.approx(7.0)

    leads = pd.read_csv(tmp_path / "report" / "signal_leads.csv")
    assert set(leads["signal"]) == {"kl"}  # the monitor measured only kl: no other signal "never crossed"
    kl_leads = leads[leads["signal"] == "kl"]
    assert len(kl_leads) == 6 and set(kl_leads["model"]) == {"model-a", "model-b"}
    assert (kl_leads["first_step_above"] == 4).all() and (kl_leads["steps_before_end"] == 2).all()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| kl | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in md
    assert "model-a: AUROC (3 of 12 forgot)" in md and "| kl_forward | — | — |" not in md
    assert "| kl | 6 of 6 | 2.0 |" in md


def test_a_model_with_too_few_checkpoints_is_not_ranked_alone_and_has_no_lead(tmp_path):
    from lorawatch.analysis.signal_study import lead_steps, signal_table_by_model

    tasks, forgets, stays = _forgets_or_stays()
    a_stages = {seed: (forgets if seed <= 3 else stays) for seed in range(1, 7)}
    a = write_run(tmp_path / "a", a_stages, {s: [0.0, 0.2, 0.9 if s <= 3 else 0.3] for s in range(1, 7)},
                  seeds=tuple(range(1, 7)), tasks=tasks)
    b = write_run(tmp_path / "b", {1: forgets}, {1: [0.0, 0.2, 0.95]}, seeds=(1,), tasks=tasks)
    for run, seed in ((a, 1), (b, 1)):
        _monitor(run, seed, 2, [0.2, 0.9, 0.95])
    frame = checkpoint_frame([("a", a), ("b", b)], StatisticsSettings(), {"a": "A", "b": "B"})
    by_model = signal_table_by_model(frame, resamples=200)
    assert by_model.set_index(["model", "signal"]).loc[("B", "kl"), "forgot"] == 1
    assert math.isnan(by_model.set_index(["model", "signal"]).loc[("B", "kl"), "auroc"])
    leads = lead_steps([("a", a), ("b", b)], frame, signal_table(frame, resamples=200), by_model)
    assert set(leads["model"]) == {"A"}  # B has no cut of its own, so no lead


def test_the_same_runs_in_another_order_give_the_same_table(tmp_path):
    """The bootstrap draws checkpoints by position, so the frame's order must not follow the order runs are given."""
    tasks, forgets, stays = _forgets_or_stays()
    runs = [("a", write_run(tmp_path / "a", {1: forgets, 2: stays}, {1: [0.0, 0.2, 0.9], 2: [0.0, 0.2, 0.3]},
                            seeds=(1, 2), tasks=tasks)),
            ("b", write_run(tmp_path / "b", {1: forgets, 2: forgets, 3: stays, 4: stays},
                            {1: [0.0, 0.2, 0.5], 2: [0.0, 0.2, 0.35], 3: [0.0, 0.2, 0.4], 4: [0.0, 0.2, 0.2]},
                            seeds=(1, 2, 3, 4), tasks=tasks))]
    forward = checkpoint_frame(runs, StatisticsSettings())
    backward = checkpoint_frame(runs[::-1], StatisticsSettings())
    assert list(forward["run"]) == ["a", "a", "b", "b", "b", "b"]
    pd.testing.assert_frame_equal(forward, backward)
    table = signal_table(forward, resamples=300).set_index("signal").loc["kl"]
    assert table["auroc"] == pytest.approx(8 / 9) and table["ci_low"] < table["auroc"]  # not a degenerate interval
    pd.testing.assert_frame_equal(signal_table(forward, resamples=300), signal_table(backward, resamples=300))


def test_a_signal_the_monitor_did_not_measure_has_no_lead(tmp_path):
    """The monitor measured only kl: top1_change has a cut but no live series, so no lead row (not "never crossed")."""
    from lorawatch.analysis.signal_study import lead_steps

    tasks, forgets, stays = _forgets_or_stays()
    run = write_run(tmp_path / "a", {s: (forgets if s <= 3 else stays) for s in range(1, 7)},
                    {s: [0.0, 0.2, 0.9 if s <= 3 else 0.3] for s in range(1, 7)}, seeds=tuple(range(1, 7)),
                    tasks=tasks)
    for seed in (1, 2, 3):
        _monitor(run, seed, 2, [0.2, 0.9, 0.95])
    frame = checkpoint_frame([("a", run)], StatisticsSettings())
    table = signal_table(frame, resamples=200)
    table = pd.concat([table, pd.DataFrame([{"signal": "top1_change", "cut": 0.1}])], ignore_index=True)
    leads = lead_steps([("a", run)], frame, table)
    assert len(leads) == 3 and set(leads["signal"]) == {"kl"}
    assert (leads["first_step_above"] == 4).all()
