"""The statistics behind verdicts and intervals, checked against independent code (scipy, statsmodels, by-hand
values), by simulation (coverage, power) and by properties that must hold for any outcomes (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings as hyp_settings, strategies as st
from scipy import stats
from statsmodels.stats.weightstats import DescrStatsW

from lorawatch.analysis import significance
from lorawatch.config import StatisticsSettings
from lorawatch.analysis.metrics import compute_cl_metrics

SETTINGS = StatisticsSettings()


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_rows():
    for improved in range(0, 31, 3):
        for regressed in range(0, 31, 2):
            n = improved + regressed
            expected = 1.0 if n == 0 else stats.binomtest(improved, n, 0.5, alternative="two-sided").pvalue
            assert significance.mcnemar_p(improved, regressed) == pytest.approx(expected, abs=1e-12, rel=1e-12)
    # a hand computation on the demo: 6 right -> wrong against 10 wrong -> right
    assert significance.mcnemar_p(10, 6) == pytest.approx(0.454498291015625, abs=1e-12)


def test_wilson_interval_matches_scipy_and_the_formula():
    for correct, n in [(0, 24), (1, 24), (12, 24), (24, 24), (7, 40), (33, 40), (1, 1)]:
        ci = stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = significance.wilson_interval(correct, n, 0.95)
        assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    # by hand: p = 0.5, n = 24, z = 1.959964: centre 0.5, half-width z/(1+z²/n) * sqrt(p(1-p)/n + z²/4n²)
    z = stats.norm.ppf(0.975)
    half = z / (1 + z * z / 24) * math.sqrt(0.25 / 24 + z * z / (4 * 24 * 24))
    assert significance.wilson_interval(12, 24, 0.95) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)


def test_paired_bootstrap_is_scipys_paired_bootstrap():
    rng = np.random.default_rng(7)
    for n in (24, 40, 100):
        before = rng.random(n) < 0.5
        after = np.where(rng.random(n) < 0.3, ~before, before)
        expected = stats.bootstrap((before.astype(float), after.astype(float)),
                                   lambda b, a, axis: a.mean(axis) - b.mean(axis), paired=True, vectorized=True,
                                   n_resamples=SETTINGS.resamples, confidence_level=0.95, method="percentile",
                                   rng=np.random.default_rng(SETTINGS.seed)).confidence_interval
        result = significance.paired(before, after, SETTINGS)
        assert (result.ci_low, result.ci_high) == pytest.approx((expected.low, expected.high), abs=1e-12)
        assert result.improved == int((~before & after).sum()) and result.regressed == int((before & ~after).sum())
        assert result.difference == pytest.approx(after.mean() - before.mean(), abs=1e-12)


def test_metric_intervals_resample_rows_within_a_task_and_keep_the_pairing():
    """With one task, a checkpoint's accuracy interval is scipy's one-sample bootstrap of its row, and the gain's
    is scipy's paired bootstrap of two checkpoints: the same row indices serve every checkpoint."""
    rng = np.random.default_rng(3)
    outcomes = rng.random((2, 40)) < np.array([[0.4], [0.6]])

    def metrics(R):
        m = compute_cl_metrics(R, ["task"])
        return {"base": m.per_checkpoint[0].avg_all, "trained": m.per_checkpoint[1].avg_all,
                "gain": m.per_checkpoint[1].gain}

    got = significance.metric_intervals([outcomes], metrics, SETTINGS)
    common = dict(n_resamples=SETTINGS.resamples, confidence_level=0.95, method="percentile")
    one = stats.bootstrap((outcomes[1].astype(float),), np.mean, rng=np.random.default_rng(SETTINGS.seed),
                          **common).confidence_interval
    assert got["trained"] == pytest.approx((one.low, one.high), abs=1e-12)
    gain = stats.bootstrap((outcomes[0].astype(float), outcomes[1].astype(float)),
                           lambda b, a, axis: a.mean(axis) - b.mean(axis), paired=True, vectorized=True,
                           rng=np.random.default_rng(SETTINGS.seed), **common).confidence_interval
    assert got["gain"] == pytest.approx((gain.low, gain.high), abs=1e-12)


def test_mean_interval_is_scipys_bootstrap_of_the_mean():
    kl = np.random.default_rng(5).gamma(0.5, 0.4, size=48)
    expected = stats.bootstrap((kl,), np.mean, n_resamples=SETTINGS.resamples, confidence_level=0.95,
                               method="percentile", rng=np.random.default_rng(SETTINGS.seed)).confidence_interval
    assert significance.mean_interval(kl, SETTINGS) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert significance.mean_interval(np.zeros(48), SETTINGS) == (0.0, 0.0)  # the base checkpoint's KL


def test_holm_matches_the_step_down_by_hand():
    p = [0.01, 0.04, 0.03, 0.20]
    # sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08 -> cumulative max 0.09, 0.20
    assert significance.adjust(p, "holm") == pytest.approx([0.04, 0.09, 0.09, 0.20], abs=1e-12)
    assert significance.adjust(p, "none") == p


def test_seed_interval_is_the_t_interval_of_the_mean():
    values = [0.21, 0.25, 0.18]
    assert significance.seed_interval(values, 0.95) == pytest.approx(DescrStatsW(values).tconfint_mean(0.05),
                                                                     abs=1e-12)
    assert significance.seed_interval([0.2], 0.95) is None


def test_detectable_drop_floor_is_exact_and_power_holds_by_simulation():
    d = significance.detectable_drop(40, 0.05, 0.8)
    assert d.min_flips == 6 and d.floor == pytest.approx(6 / 40)  # 2 * 0.5**6 = 0.031 < 0.05 <= 2 * 0.5**5
    assert significance.mcnemar_p(0, d.min_flips) < 0.05 <= significance.mcnemar_p(0, d.min_flips - 1)
    # Holm over three tasks: the strictest step tests at 0.05 / 3
    assert significance.detectable_drop(24, 0.05, 0.8, family_size=3).min_flips == 7
    assert significance.detectable_drop(4, 0.05, 0.8).min_flips is None
    # at drop_at_power, rows flipping right -> wrong with that probability are detected 80% of the time
    rng = np.random.default_rng(11)
    flips = rng.binomial(40, d.drop_at_power, size=20000)
    detected = np.mean([significance.mcnemar_p(0, int(m)) < 0.05 for m in flips])
    assert abs(detected - 0.8) < 0.015


def test_paired_interval_covers_the_true_difference_95_percent_of_the_time():
    """Rows right before with probability 0.6; a right row flips to wrong with probability 0.25, a wrong one to
    right with 0.2: the true difference is 0.4 * 0.2 - 0.6 * 0.25 = -0.07."""
    rng = np.random.default_rng(2024)
    settings = StatisticsSettings(resamples=1000)
    truth, draws, covered, wilson_covered = 0.4 * 0.2 - 0.6 * 0.25, 300, 0, 0
    for _ in range(draws):
        before = rng.random(100) < 0.6
        flip = rng.random(100) < np.where(before, 0.25, 0.2)
        after = before ^ flip
        result = significance.paired(before, after, settings)
        covered += result.ci_low <= truth <= result.ci_high
        low, high = significance.wilson_interval(int(before.sum()), 100, 0.95)
        wilson_covered += low <= 0.6 <= high
    assert 0.91 <= covered / draws <= 0.985, covered / draws
    assert 0.91 <= wilson_covered / draws <= 0.99, wilson_covered / draws


outcome_pairs = st.integers(min_value=1, max_value=60).flatmap(
    lambda n: st.tuples(st.lists(st.booleans(), min_size=n, max_size=n), st.lists(st.booleans(), min_size=n,
                                                                                   max_size=n)))


@hyp_settings(max_examples=60, deadline=None)
@given(outcome_pairs)
def test_swapping_the_checkpoints_mirrors_everything(pair):
    before, after = pair
    settings = StatisticsSettings(resamples=200)
    forward, backward = significance.paired(before, after, settings), significance.paired(after, before, settings)
    assert (forward.improved, forward.regressed) == (backward.regressed, backward.improved)
    assert forward.p_value == backward.p_value
    assert forward.difference == pytest.approx(-backward.difference, abs=1e-12)
    assert (forward.ci_low, forward.ci_high) == pytest.approx((-backward.ci_high, -backward.ci_low), abs=1e-9)
    mirrored = {"regressed": "improved", "improved": "regressed", significance.NO_CHANGE: significance.NO_CHANGE}
    for alpha in (0.05, 0.5, 0.99):
        assert mirrored[significance.verdict(forward.difference, forward.p_value, alpha)] == \
            significance.verdict(backward.difference, backward.p_value, alpha)
    # a negative flip rate never exceeds the earlier accuracy; flips account for the whole difference
    assert forward.negative_flip_rate <= forward.accuracy_before + 1e-12
    assert forward.difference == pytest.approx((forward.improved - forward.regressed) / forward.n, abs=1e-12)
    assert 0 <= forward.p_value <= 1 and forward.ci_low <= forward.ci_high


@hyp_settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_holds_the_observed_accuracy(case):
    correct, n = case
    low, high = significance.wilson_interval(correct, n, 0.95)
    assert 0 <= low <= correct / n <= high <= 1


# 30 examples: statsmodels' multipletests, the oracle here, runs gc.collect() on every call (0.1 s in this process).
@hyp_settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=8))
def test_holm_never_lowers_a_p_value_and_is_statsmodels(p_values):
    from statsmodels.stats.multitest import multipletests

    adjusted = significance.adjust(p_values, "holm")
    assert len(adjusted) == len(p_values) and all(p - 1e-12 <= a <= 1 for p, a in zip(p_values, adjusted))
    assert adjusted == pytest.approx(list(multipletests(p_values, method="holm")[1]), abs=1e-12)
