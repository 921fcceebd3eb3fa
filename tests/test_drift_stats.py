"""Drift statistics per reference row (engine/drift_stats.py) and their llama.cpp-style summaries
(analysis/drift_summary.py), against by-hand values on constructed distributions: identical rows, ties,
near-zero and zero probabilities."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import entropy

from lorawatch.analysis.drift_summary import PERCENTILES, summarize_delta_p, summarize_rate, summarize_values
from lorawatch.engine.drift_stats import compare_distributions, top_k_ids


def logprobs(*rows: list[float]) -> torch.Tensor:
    """Rows of probabilities -> float32 log-probabilities (a 0 becomes -inf, as a masked logit would)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def kl_by_hand(p: list[float], q: list[float]) -> float:
    if any(pi > 0 and qi == 0 for pi, qi in zip(p, q)):
        return math.inf
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_identical_rows_do_not_drift():
    rows = [[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.01, 0.01, 0.9, 0.02, 0.03, 0.03]]
    stats = compare_distributions(logprobs(*rows), logprobs(*rows), [2, 2])
    assert stats["kl_reverse"] == [0.0, 0.0] and stats["kl_forward"] == [0.0, 0.0]
    assert stats["same_top1"] == [1, 1] and stats["top5_overlap"] == [1.0, 1.0]
    assert stats["dp_gold"] == [0.0, 0.0]


def test_both_directions_against_by_hand_and_scipy():
    p = [0.7, 0.2, 0.05, 0.05]
    q = [0.25, 0.25, 0.25, 0.25]
    stats = compare_distributions(logprobs(p), logprobs(q), [1])
    assert stats["kl_reverse"][0] == pytest.approx(kl_by_hand(p, q), rel=1e-6)
    assert stats["kl_forward"][0] == pytest.approx(kl_by_hand(q, p), rel=1e-6)
    assert stats["kl_reverse"][0] == pytest.approx(entropy(p, q), rel=1e-6)
    assert stats["kl_forward"][0] == pytest.approx(entropy(q, p), rel=1e-6)
    assert stats["kl_reverse"][0] != pytest.approx(stats["kl_forward"][0], rel=1e-2)  # KL is not symmetric
    assert stats["dp_gold"][0] == pytest.approx(0.2 - 0.25, abs=1e-7)


def test_ties_break_towards_the_lower_token_id():
    # Four tokens share the top probability in the checkpoint, six in the base: both pick token 0.
    ours = [0.25, 0.25, 0.25, 0.25, 0.0, 0.0]
    base = [1 / 6] * 6
    stats = compare_distributions(logprobs(ours), logprobs(base), [None])
    assert top_k_ids(logprobs(ours), 5).tolist() == [[0, 1, 2, 3, 4]]  # the zero-probability tie: 4 before 5
    assert stats["same_top1"] == [1] and stats["top5_overlap"] == [1.0]
    assert stats["kl_reverse"][0] == pytest.approx(math.log(1.5), rel=1e-6)  # zero-probability tokens add 0
    assert stats["kl_forward"][0] == math.inf  # the base gives mass where the checkpoint gives none
    assert stats["dp_gold"] == [None]
    # A tie moved: the checkpoint's top token is now token 3, with tokens 0-2 tied below it.
    moved = [0.2, 0.2, 0.2, 0.4, 0.0, 0.0]
    stats = compare_distributions(logprobs(moved), logprobs(ours), [3])
    assert stats["same_top1"] == [0]
    assert stats["top5_overlap"] == [1.0]  # {3, 0, 1, 2, 4} against {0, 1, 2, 3, 4}
    assert stats["dp_gold"][0] == pytest.approx(0.4 - 0.25, abs=1e-7)


def test_near_zero_probabilities_stay_finite_and_exact():
    eps = 1e-30
    p = [1 - eps, eps, 0.0]
    q = [0.5, 0.25, 0.25]
    stats = compare_distributions(logprobs(p), logprobs(q), [0])
    assert stats["kl_reverse"][0] == pytest.approx(kl_by_hand(p, q), rel=1e-6)
    assert stats["kl_forward"][0] == math.inf  # q has mass on token 2, p none
    assert stats["top5_overlap"] == [1.0] and stats["same_top1"] == [1]
    assert all(math.isfinite(v) for v in stats["kl_reverse"])


def test_top_overlap_counts_shared_tokens():
    # Ten tokens; the checkpoint's top five are 0-4, the base's 3-7: two shared.
    ours = [0.15, 0.15, 0.15, 0.15, 0.15, 0.05, 0.05, 0.05, 0.05, 0.05]
    base = [0.05, 0.05, 0.05, 0.15, 0.15, 0.15, 0.15, 0.15, 0.05, 0.05]
    stats = compare_distributions(logprobs(ours), logprobs(base))
    assert stats["top5_overlap"] == [pytest.approx(2 / 5)]
    assert stats["same_top1"] == [0]  # token 0 against token 3


def test_shape_and_gold_errors_are_clear():
    with pytest.raises(ValueError, match="one shape"):
        compare_distributions(logprobs([0.5, 0.5]), logprobs([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="2 gold ids for 1 rows"):
        compare_distributions(logprobs([0.5, 0.5]), logprobs([0.5, 0.5]), [0, 1])


def test_value_summary_against_by_hand():
    out = summarize_values([3.0, None, 0.0, 4.0, 1.0, 2.0])
    assert out["n"] == 5 and out["mean"] == 2.0
    assert out["se"] == pytest.approx(math.sqrt(2.5 / 5))  # sample variance 2.5 over n
    assert (out["min"], out["median"], out["max"]) == (0.0, 2.0, 4.0)
    assert out["p10"] == pytest.approx(0.4) and out["p99_9"] == pytest.approx(3.996)
    assert [name for name, _ in PERCENTILES] == [k for k in out if k not in ("n", "mean", "se")]


def test_rate_summary_is_llama_cpp_formula():
    out = summarize_rate([1, 1, 0, 1])
    assert out["rate"] == 0.75
    assert out["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert math.isnan(summarize_rate([True])["se"])  # one row has no spread to estimate


def test_delta_p_rms_and_its_error():
    out = summarize_delta_p([3.0, -4.0])
    assert out["mean"] == -0.5 and out["rms"] == pytest.approx(math.sqrt(12.5))
    # squares 9 and 16: their mean's standard error is 3.5; the RMS carries half of it over the RMS
    assert out["rms_se"] == pytest.approx(3.5 / (2 * math.sqrt(12.5)))
    # against a simulation of the same estimator's spread
    rng = np.random.default_rng(0)
    draws = rng.normal(0.1, 0.3, size=(4000, 50))
    spread = np.sqrt((draws ** 2).mean(axis=1)).std()
    assert summarize_delta_p(draws[0].tolist())["rms_se"] == pytest.approx(spread, rel=0.25)
    with pytest.raises(ValueError, match="no values"):
        summarize_delta_p([None, None])


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from lorawatch.recipe.run import run_experiment
    from tiny import tiny_config, write_task_files

    root = tmp_path_factory.mktemp("drift-run")
    write_task_files(root / "data")
    config = tiny_config(tiny_model_dir, root / "data", seeds=(1,))
    return config, run_experiment(config, root / "run")


def test_a_run_records_every_drift_statistic_and_the_trained_tasks_drift(tiny_run, tiny_model_dir):
    """A real (tiny) run: the reference rows carry drift_stats' statistics, the base model's rows are its identity
    against itself, and each trained stage holds the drift on its own task's test prompts, which equals a by-hand
    comparison of the checkpoint's and the base's distributions there (the adapter switched off)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorawatch.data.inputs import encode, load_data
    from lorawatch.engine.drift import answer_logprobs
    from lorawatch.rundir.layout import RunFolder

    config, folder = tiny_run
    run = RunFolder(folder)
    base_rows = run.stage(1, 0).drift.read()
    assert all(r.kl_forward == 0 and r.same_top1 and r.top5_overlap == 1 and r.dp_gold == 0 for r in base_rows)
    assert not run.stage(1, 0).task_drift.exists()
    data = load_data(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = encode(data, tokenizer, config.train.max_length)
    for stage, task in ((1, "stance"), (2, "sum")):
        rows = run.stage(1, stage).task_drift.read()
        assert [r.id for r in rows] == [e.id for e in data.tasks[stage - 1].test] and {r.task for r in rows} == {task}
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          run.stage(1, stage).adapter)
        options = dict(pad_id=tokenizer.pad_token_id, device="cpu")
        ours = answer_logprobs(model, encoded.test[task], **options)[1]
        with model.disable_adapter():
            base = answer_logprobs(model, encoded.test[task], **options)[1]
        expected = compare_distributions(ours, base, [p.answer_ids[0] for p in encoded.test[task]])
        for i, row in enumerate(rows):
            assert row.kl == pytest.approx(float((ours[i].exp() * (ours[i] - base[i])).sum()), abs=1e-5)
            assert row.kl_forward == pytest.approx(expected["kl_forward"][i], abs=1e-5)
            assert row.dp_gold == pytest.approx(expected["dp_gold"][i], abs=1e-6)
        assert sum(r.kl for r in rows) > 0  # the stage moved the model on its own task


def test_the_report_summarises_each_checkpoints_drift_signals(tiny_run, tmp_path):
    """report.md's drift-signals section and drift_signals.csv: the rows' statistics summarised per checkpoint and
    set (checked against scipy's sem and the rows themselves); the base model against itself is 0 KL, 100% same
    top-1."""
    from scipy.stats import sem

    from lorawatch.report.study_report import write_report
    from lorawatch.rundir.layout import RunFolder

    _, folder = tiny_run
    write_report([folder], tmp_path / "report")
    frame = pd.read_csv(tmp_path / "report" / "drift_signals.csv")
    sets = ["reference", "task", "answer span", "gold span"]
    assert list(zip(frame["checkpoint"], frame["set"])) == [("base", "reference"), *(
        (checkpoint, name) for checkpoint in ("stance", "sum") for name in sets)]
    base = frame.iloc[0]
    assert base["kl_mean"] == 0 and base["same_top1_rate"] == 1 and base["dp_gold_mean"] == 0
    rows = RunFolder(folder).stage(1, 2).task_drift.read()
    task = frame.iloc[6]
    assert task["n"] == len(rows) == 4
    assert task["kl_forward_mean"] == pytest.approx(np.mean([r.kl_forward for r in rows]), rel=1e-9)
    assert task["kl_forward_se"] == pytest.approx(sem([r.kl_forward for r in rows]), rel=1e-9)
    assert task["same_top1_rate"] == pytest.approx(np.mean([r.same_top1 for r in rows]))
    spans = RunFolder(folder).stage(1, 2).span_drift.read()
    gold = frame.iloc[8]
    golds = [r for r in spans if r.span == "gold"]
    assert gold["set"] == "gold span" and gold["n"] == len(golds)
    assert gold["kl_mean"] == pytest.approx(np.mean([r.kl for r in golds]), rel=1e-9)
    assert gold["same_top1_se"] == pytest.approx(sem([r.same_top1 for r in golds]), rel=1e-9)
    assert gold["dp_gold_mean"] == pytest.approx(np.mean([r.dp_token for r in golds]), rel=1e-9)
    md = (tmp_path / "report" / "report.md").read_text()
    section = md[md.index("## Drift signals"):]
    assert f"| sum | task | 4 | {task['kl_mean']:.4f} ± {task['kl_se']:.4f} |" in section
    assert "not measured" not in section


def test_the_run_page_shows_the_drift_signals(tiny_run, tmp_path):
    from lorawatch.report.drift_signals import cells, seed_signals
    from lorawatch.report.html import write_run_html
    from lorawatch.rundir.layout import RunFolder

    _, folder = tiny_run
    page = write_run_html(folder, tmp_path / "page.html").read_text()
    assert 'id="signals"' in page and "Drift signals: each checkpoint against the base model" in page
    sum_task = next(r for r in seed_signals(RunFolder(folder), 1) if (r["checkpoint"], r["set"]) == ("sum", "task"))
    assert all(cell.replace("‖", "") in page for cell in cells(sum_task))
