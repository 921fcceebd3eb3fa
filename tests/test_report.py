"""`lorawatch report`: run folders built here file by file (as `tables.seed_tables` reads them), grouped,
tabulated and plotted; the published means of the paper go in and its OP, BWT and FWT must come out."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import outcomes, reference_kl, write_run
from tiny import cli
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import store
from lorawatch.config import build_config
from lorawatch.errors import UserError
from lorawatch.report.study_report import (
    correlations,
    fit_failure_threshold,
    kl_accuracy_points,
    load_study,
    model_display_name,
    write_report,
)
from lorawatch.report.tables import write_seed_tables, write_summary

# The paper's published original-order results, kept with the tests so that the checks against the paper run
# in CI too (the paper's per-step results for its original task order: accuracies, drift, OP/BWT/FWT).
PAPER_CSV = Path(__file__).resolve().parent / "data" / "paper_results_original_order.csv"
PAPER_TASKS = ("fomc", "scienceqa", "numgluecm")  # training order of the published runs
SPECS = {"qwen": "Qwen/Qwen3.5-0.8B", "gemma": "google/gemma-3-1b-it", "llama": "meta-llama/Llama-3.2-1B-Instruct"}
TOLERANCE = 0.002
# Per-seed offsets added to every trained checkpoint's accuracies and KL: they average to zero, so the
# seed means are the published means and the std over seeds is the offset's.
OFFSETS = {33: 0.01, 42: 0.0, 123: -0.01}
PREDICTION_ROWS = 1000


# --- building run folders ---------------------------------------------------------------------------


def make_run(folder: Path, spec: str, tasks: list[str], order, stages_by_seed: dict[int, list[dict]]) -> Path:
    """A finished run folder. `stages_by_seed[seed][k]` = {"acc": {task: accuracy}, "kl", "entropy", "margin"}
    for k = 0 (base) .. T, in training order; `tasks` in the config's listing order."""
    config = build_config({
        "name": folder.name,
        "model": {"spec": spec},
        # data files that do not exist: reading a run back must not need them
        "tasks": [{"name": t, "kind": "numeric" if t.startswith("num") else "multiple_choice",
                   "train": f"/nonexistent/{t}/train.json", "test": f"/nonexistent/{t}/test.json"} for t in tasks],
        "reference": {"path": "/nonexistent/reference.json"},
        "order": order,
        "seeds": list(stages_by_seed),
    })
    trained = [t.name for t in config.ordered_tasks()]
    store.write_json(folder / "config.json", config.model_dump(mode="json"))
    for seed, stages in stages_by_seed.items():
        assert len(stages) == len(trained) + 1
        base = None
        for k, stage in enumerate(stages):
            d = RunFolder(folder).stage(seed, k).path
            stats = {}
            for name in ("kl", "entropy", "margin"):
                stats[f"{name}_mean"] = stage[name]
                stats[f"{name}_p10"] = stage[name] * 0.5
                stats[f"{name}_p95"] = stage[name] * 1.5
            base = base or stats
            store.write_json(d / "reference_stats.json", {**stats, **{f"{k2}_delta": v - base[k2]
                                                                       for k2, v in stats.items()}})
            store.write_json(d / "scores.json", {**stage["acc"], "reference": 0.5})
            store.write_jsonl(d / "predictions" / "reference.jsonl", [
                {"id": f"ref-{i}", "task": tasks[0], "raw_output": "A", "prediction": "A", "gold": "A", "correct": True,
                 "output_ids": None} for i in range(len(reference_kl(stage["kl"])))])
            store.write_jsonl(d / "reference_drift.jsonl", [  # per reference row, averaging to the stage's KL
                {"id": f"ref-{i}", "task": tasks[0], "kl": kl, "entropy": stage["entropy"], "margin": stage["margin"],
                 "top1_token": 0} for i, kl in enumerate(reference_kl(stage["kl"]))])
            for task, accuracy in stage["acc"].items():  # 1000 rows: a published 3-decimal accuracy exactly
                right = round(accuracy * PREDICTION_ROWS)
                store.write_jsonl(d / "predictions" / f"{task}.jsonl", [
                    {"id": str(i), "task": task, "raw_output": "", "prediction": "", "gold": "", "correct": i < right,
                     "output_ids": None} for i in range(PREDICTION_ROWS)])
            store.write_json(d / "stage.json", {"stage": k, "checkpoint": "base" if k == 0 else trained[k - 1],
                                                "task": None if k == 0 else trained[k - 1]})
        write_seed_tables(folder, seed, config.statistics)
    write_summary(folder)
    return folder


def shifted(stages: list[dict], offset: float) -> list[dict]:
    """Every trained checkpoint moved by `offset` (the base row is shared by all seeds, as in real runs)."""
    return [s if k == 0 else {"acc": {t: v + offset for t, v in s["acc"].items()}, "kl": s["kl"] + offset,
                              "entropy": s["entropy"], "margin": s["margin"]}
            for k, s in enumerate(stages)]


def toy_stages(tasks: list[str], shift: float = 0.0) -> list[dict]:
    T = len(tasks)
    return [{"acc": {t: round(0.3 + 0.1 * ((k + i) % 3) + shift, 4) for i, t in enumerate(tasks)},
             "kl": 0.0 if k == 0 else 0.2 * k + shift, "entropy": 2.0 - 0.1 * k, "margin": 1.5 + 0.05 * k}
            for k in range(T + 1)]


# --- the published results as run folders ----------------------------------------------------------


def _number(value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("—", ""):
        return None
    return float(value)


@pytest.fixture(scope="module")
def paper() -> pd.DataFrame:
    return pd.read_csv(PAPER_CSV)


def published_stages(paper: pd.DataFrame, model: str) -> list[dict]:
    rows = paper[paper["model"] == model].sort_values("step")
    return [{"acc": {t: float(r[t]) for t in PAPER_TASKS}, "kl": float(r["kl_to_base_mean"]),
             "entropy": float(r["entropy_mean"]), "margin": float(r["margin_mean"])} for _, r in rows.iterrows()]


def reversed_stages(paper: pd.DataFrame, model: str) -> list[dict]:
    """Made-up reversed-order results: every trained checkpoint 0.05 less accurate and 1.2× the KL."""
    return [s if k == 0 else {"acc": {t: v - 0.05 for t, v in s["acc"].items()}, "kl": s["kl"] * 1.2,
                              "entropy": s["entropy"], "margin": s["margin"]}
            for k, s in enumerate(published_stages(paper, model))]


@pytest.fixture(scope="module")
def paper_report(paper, tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-runs")
    runs = []
    for model in SPECS:
        stages = published_stages(paper, model)
        per_seed = {seed: shifted(stages, offset) for seed, offset in OFFSETS.items()}
        if model == "qwen":  # one group from two run folders: seeds are merged
            runs.append(make_run(root / "qwen-a", SPECS[model], list(PAPER_TASKS), "original", {33: per_seed[33]}))
            runs.append(make_run(root / "qwen-b", SPECS[model], list(PAPER_TASKS), "original",
                                 {42: per_seed[42], 123: per_seed[123]}))
        else:
            runs.append(make_run(root / model, SPECS[model], list(PAPER_TASKS), "original", per_seed))
        runs.append(make_run(root / f"{model}-reversed", SPECS[model], list(PAPER_TASKS), "reversed",
                             {33: reversed_stages(paper, model)}))
    report = write_report(runs, root / "report")
    return report


def test_table4_reproduces_the_published_op_bwt_fwt(paper, paper_report):
    table4 = pd.read_csv(paper_report.out / "table4.csv")
    table3 = pd.read_csv(paper_report.out / "table3.csv")
    table5 = pd.read_csv(paper_report.out / "table5.csv")
    compared = 0
    for model, spec in SPECS.items():
        name = model_display_name(spec)
        for _, pub in paper[(paper["model"] == model) & (paper["step"] >= 1)].iterrows():
            step = int(pub["step"])
            pick = lambda t: t[(t["model"] == name) & (t["order"] == "original") & (t["step"] == step)]  # noqa: E731
            ours, ours3, ours5 = pick(table4), pick(table3), pick(table5)
            assert len(ours) == 1, (model, step)
            assert ours["checkpoint"].iloc[0] == PAPER_TASKS[step - 1]
            assert ours["n_seeds"].iloc[0] == 3
            for column in ("op", "bwt", "fwt"):
                expected, got = _number(pub[column]), _number(ours[column].iloc[0])
                if expected is None:
                    assert got is None, (model, step, column, got)
                else:
                    assert got == pytest.approx(expected, abs=TOLERANCE), (model, step, column)
                compared += 1
            assert ours3["after_learning"].iloc[0] == pytest.approx(float(pub["curr_accuracy"]), abs=TOLERANCE)
            assert ours3["vs_base"].iloc[0] == pytest.approx(float(pub["delta_curr_vs_base"]), abs=TOLERANCE)
            assert ours3["avg_accuracy"].iloc[0] == pytest.approx(float(pub["avg_over_all_tasks"]), abs=TOLERANCE)
            assert ours5["kl_to_base"].iloc[0] == pytest.approx(float(pub["kl_to_base_mean"]), abs=1e-9)
            # the shift is the same for R[k,i] and R[i,i] (BWT) and absent from the base row (OP, FWT)
            assert ours["op_std"].iloc[0] == pytest.approx(0.01)
            bwt_std = ours["bwt_std"].iloc[0]
            assert math.isnan(bwt_std) if step == 1 else bwt_std == pytest.approx(0.0, abs=1e-12)
    assert compared == 27
    # the Markdown and LaTeX cells show mean ± std, "—" where undefined
    md = re.sub(" +", " ", (paper_report.out / "table4.md").read_text())  # tabulate pads cells to align columns
    assert "| Qwen3.5-0.8B | original | 1 | After fomc | 0.533 ± 0.010 | — | 0.07" in md
    assert "| Qwen3.5-0.8B | reversed | 1 | After numgluecm | 0.329 | — |" in md  # one seed: the mean only
    tex = (paper_report.out / "table4.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "---" in tex


def test_reversed_order_in_table6_and_figure2(paper, paper_report):
    table6 = pd.read_csv(paper_report.out / "table6.csv")
    figure2 = pd.read_csv(paper_report.out / "figure2.csv")
    for model, spec in SPECS.items():
        name = model_display_name(spec)
        final = published_stages(paper, model)[-1]
        rev = table6[(table6["model"] == name) & (table6["order"] == "reversed")]
        orig = table6[(table6["model"] == name) & (table6["order"] == "original")]
        assert rev["tasks"].iloc[0] == "numgluecm > scienceqa > fomc"
        assert rev["final_avg_accuracy"].iloc[0] == pytest.approx(np.mean(list(final["acc"].values())) - 0.05)
        assert rev["final_kl_to_base"].iloc[0] == pytest.approx(final["kl"] * 1.2)
        assert orig["final_kl_to_base"].iloc[0] == pytest.approx(final["kl"])
        for order in ("original", "reversed"):
            curve = figure2[(figure2["model"] == name) & (figure2["order"] == order)]
            assert curve["step"].tolist() == [0, 1, 2, 3]
            assert curve["kl_to_base"].iloc[0] == 0.0
    md = (paper_report.out / "table6.md").read_text()
    assert "Final Average Accuracy: Original" in md and "Final KL to Base (Drift): Reversed" in md
    tex = (paper_report.out / "table6.tex").read_text()
    assert r"\multicolumn{2}{c}{Final Average Accuracy}" in tex


def test_correlation_and_failure_zone_in_the_paper_study(paper, paper_report):
    corr = json.loads((paper_report.out / "correlation.json").read_text())
    # Independently: the 18 trained checkpoints (3 models × 2 orders × 3 steps) from the inputs themselves
    kl, acc, failed = [], [], []
    for model in SPECS:
        for stages in (published_stages(paper, model), reversed_stages(paper, model)):
            base = np.mean(list(stages[0]["acc"].values()))
            for s in stages[1:]:
                kl.append(s["kl"])
                acc.append(np.mean(list(s["acc"].values())))
                failed.append(acc[-1] < base)
    assert corr["n"] == 18
    assert corr["pearson"]["r"] == pytest.approx(np.corrcoef(kl, acc)[0, 1], abs=1e-9)
    assert corr["pearson"]["r"] < 0 and 0 <= corr["pearson"]["p"] < 0.05
    from scipy.stats import spearmanr

    assert corr["spearman"]["r"] == pytest.approx(spearmanr(kl, acc)[0], abs=1e-9)
    # Failed (average accuracy below the base model's): Gemma after its 3rd step (original, KL 1.623) and after
    # its 2nd and 3rd (reversed, KL 1.2 × 1.229 = 1.4748 and 1.2 × 1.623). The largest healthy KL is reversed
    # Gemma's 1st step, 1.2 × 1.108 = 1.3296: the midpoint 1.4022 separates the two perfectly.
    zone = corr["failure_zone"]
    assert sum(failed) == zone["n_failed"] == 3
    assert zone["threshold"] == pytest.approx((1.2 * 1.108 + 1.2 * 1.229) / 2)
    assert zone["balanced_accuracy"] == 1.0
    assert "balanced accuracy" in zone["method"]
    assert "Failure zone: KL to base > 1.402" in (paper_report.out / "report.md").read_text()
    # per model beside the pooled one: 6 checkpoints each (2 orders × 3 steps), computed independently
    assert set(corr["per_model"]) == {model_display_name(spec) for spec in SPECS.values()}
    for model, spec in SPECS.items():
        entries = corr["per_model"][model_display_name(spec)]
        own_kl, own_acc = [], []
        for stages in (published_stages(paper, model), reversed_stages(paper, model)):
            own_kl += [s["kl"] for s in stages[1:]]
            own_acc += [np.mean(list(s["acc"].values())) for s in stages[1:]]
        assert entries["n"] == 6
        assert entries["pearson"]["r"] == pytest.approx(np.corrcoef(own_kl, own_acc)[0, 1], abs=1e-9)
    assert "not independent" in corr["independence"]
    assert "not independent" in (paper_report.out / "report.md").read_text()


def test_figure3_has_the_final_point_of_every_run_and_seed(paper, paper_report):
    finals = pd.read_csv(paper_report.out / "figure3.csv")
    # 3 models x (3 seeds in the original order, qwen's from two run folders, + 1 seed reversed)
    assert len(finals) == 12 and set(finals["seed"]) == set(OFFSETS)
    assert sorted(finals[finals["order"] == "reversed"]["seed"]) == [33, 33, 33]
    for _, row in finals.iterrows():
        matrix = pd.read_csv(RunFolder(Path(row["run_dir"])).seed(int(row["seed"])).path / "accuracy_matrix.csv")
        assert row["final_avg_accuracy"] == pytest.approx(matrix[list(PAPER_TASKS)].iloc[-1].mean(), abs=1e-9)
        stats = json.loads((RunFolder(Path(row["run_dir"])).stage(int(row["seed"]), 3).path / "reference_stats.json")
                           .read_text())
        assert row["final_kl_to_base"] == pytest.approx(stats["kl_mean"], abs=1e-9)
    assert "## Figure 3" in (paper_report.out / "report.md").read_text()


def test_figures_exist_and_are_not_trivial(paper_report):
    stems = ["figure1", "figure2", "figure3"] + [f"model-{m}-{kind}" for m in ("qwen3-5-0-8b", "gemma-3-1b-it",
                                                                   "llama-3-2-1b-instruct")
                                      for kind in ("matrix", "steps")]
    for stem in stems:
        png, svg = paper_report.out / f"{stem}.png", paper_report.out / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000, stem
        assert "<svg" in svg.read_text()[:2000] and svg.stat().st_size > 10_000, stem
    index = (paper_report.out / "report.md").read_text()
    for stem in stems:
        assert f"({stem}.png)" in index
    for n in (3, 4, 5, 6):
        assert f"Table {n}:" in index


# --- the failure-zone fit on hand-made examples ----------------------------------------------------


def test_failure_threshold_on_a_constructed_example():
    # sorted: 0.05 H, 0.1 H, 0.2 F, 0.3 H, 0.4 F, 0.5 F; thresholds 0.075, 0.15, 0.25, 0.35, 0.45 give balanced
    # accuracy 2/3, 5/6, 2/3, 5/6, 2/3: a tie, which the smallest threshold wins
    zone = fit_failure_threshold([0.3, 0.1, 0.5, 0.2, 0.4, 0.05], [False, False, True, True, True, False])
    assert zone["threshold"] == pytest.approx(0.15)
    assert zone["balanced_accuracy"] == pytest.approx(5 / 6)
    assert (zone["n_failed"], zone["n_healthy"], zone["min_per_label"]) == (3, 3, 3)
    # repeated KL values are one candidate: 0.15, 0.25, 0.35, 0.45 give 2/3, 1/3, 1/2, 2/3
    repeated = fit_failure_threshold([0.1, 0.2, 0.2, 0.3, 0.4, 0.5], [False, True, True, False, False, True])
    assert repeated["threshold"] == pytest.approx(0.15) and repeated["balanced_accuracy"] == pytest.approx(2 / 3)
    # not fitted below the minimum of each label, nor without both labels
    few = fit_failure_threshold([0.3, 0.1, 0.5, 0.2, 0.4], [False, False, True, True, True])
    assert few["threshold"] is None and "3 failed and 2 healthy" in few["reason"] and "at least 3" in few["reason"]
    none = fit_failure_threshold([0.1, 0.2], [False, False])
    assert none["threshold"] is None and "0 failed" in none["reason"]


def test_correlation_ranks_ties_that_differ_only_by_float_noise():
    from scipy.stats import spearmanr

    kl = [0.1, 0.2, 0.3, 0.4]
    noisy = [0.3, 0.275, 0.27499999999999997, 0.25]  # the 2nd and 3rd are equal accuracies (seed means)
    points = pd.DataFrame({"model": ["m"] * 4, "kl_to_base": kl, "avg_accuracy": noisy})
    corr = correlations(points)
    assert corr["spearman"]["r"] == pytest.approx(spearmanr(kl, [0.3, 0.275, 0.275, 0.25])[0], abs=1e-12)
    assert corr["spearman"]["r"] != pytest.approx(spearmanr(kl, noisy)[0], abs=1e-6)
    assert corr["per_model"]["m"]["n"] == 4 and "not independent" in corr["independence"]


# --- bad input and the command line ------------------------------------------------------------------


def test_bad_input_names_the_folder(tmp_path):
    good = make_run(tmp_path / "good", "org/model-a", ["a", "b"], "original", {1: toy_stages(["a", "b"])})
    other_tasks = make_run(tmp_path / "other", "org/model-b", ["a", "c"], "original", {1: toy_stages(["a", "c"])})
    with pytest.raises(UserError, match="other: its tasks"):
        load_study([good, other_tasks])
    same_seed = make_run(tmp_path / "again", "org/model-a", ["a", "b"], "original", {1: toy_stages(["a", "b"], 0.01)})
    with pytest.raises(UserError, match="again: seed 1 .* also in"):
        load_study([good, same_seed])
    unfinished = make_run(tmp_path / "unfinished", "org/model-c", ["a", "b"], "original", {1: toy_stages(["a", "b"])})
    (unfinished / "summary" / "summary.json").unlink()
    with pytest.raises(UserError, match="unfinished: the run has not finished"):
        load_study([good, unfinished])
    partial = make_run(tmp_path / "partial", "org/model-d", ["a", "b"], "original", {1: toy_stages(["a", "b"])})
    (RunFolder(partial).stage(1, 2).path / "stage.json").unlink()
    with pytest.raises(UserError, match="partial: the run has not finished .*stage-2/stage.json"):
        load_study([partial])


def test_cli_end_to_end(tmp_path):
    tasks = ["stance", "science", "numbers"]
    a = make_run(tmp_path / "small", "models/smollm2-135m-instruct", tasks, "original",
                 {33: toy_stages(tasks), 42: toy_stages(tasks, 0.02)})
    b = make_run(tmp_path / "small-rev", "models/smollm2-135m-instruct", tasks, "reversed",
                 {33: toy_stages(tasks, 0.01)})
    out = tmp_path / "out"
    result = cli("report", a, b, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "report.md")
    table6 = pd.read_csv(out / "table6.csv")
    assert table6["model"].tolist() == ["smollm2-135m-instruct"] * 2
    assert table6["order"].tolist() == ["original", "reversed"]
    for name in ("table3", "table4", "table5", "table6"):
        for suffix in ("md", "csv", "tex"):
            assert (out / f"{name}.{suffix}").stat().st_size > 0
    assert (out / "figure1.png").stat().st_size > 10_000

    bad = tmp_path / "not-a-run"
    bad.mkdir()
    result = cli("report", a, bad, "--out", tmp_path / "out2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not-a-run" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_below_base_ignores_float_noise(tmp_path):
    # Two seeds whose mean average accuracy equals the base's but for float noise: not a failed checkpoint.
    tasks = ["a", "b"]

    def stages(acc_a: float, acc_b: float) -> list[dict]:
        return [{"acc": {"a": 0.3, "b": 0.25}, "kl": 0.0, "entropy": 2.0, "margin": 1.5},
                {"acc": {"a": acc_a, "b": acc_b}, "kl": 0.1, "entropy": 2.0, "margin": 1.5},
                {"acc": {"a": 0.1, "b": 0.1}, "kl": 0.2, "entropy": 2.0, "margin": 1.5}]

    run = make_run(tmp_path / "run", "org/m", tasks, "original", {1: stages(0.05, 0.125), 2: stages(0.075, 0.85)})
    points = kl_accuracy_points(load_study([run]))
    step1 = points[points["step"] == 1].iloc[0]
    assert step1["avg_accuracy"] != 0.275 and step1["avg_accuracy"] == pytest.approx(0.275)  # the noise is there
    assert not step1["below_base"]
    assert points[points["step"] == 2].iloc[0]["below_base"]


# --- is it real? verdicts per group and settings against their baseline -----------------------------------------


def test_report_compares_each_setting_with_its_baseline_on_the_same_rows(tmp_path):
    """Three groups of one model and order: a KL anchor that loses 16 of stance's 24 right rows, the plain protocol
    and another learning rate with the plain protocol's predictions. The baseline is the plain group (strategy
    `none`, no monitor), though the anchor is given first."""
    from scipy import stats

    base = {"stance": outcomes(12), "science": outcomes(20)}
    stage1 = {"stance": outcomes(24, flip_up=12, before=12), "science": outcomes(20)}
    final = {"stance": outcomes(24), "science": outcomes(25, flip_up=5, before=20)}
    worse = {"stance": outcomes(8, flip_down=16, before=24), "science": final["science"]}
    anchor = write_run(tmp_path / "anchor", [base, stage1, worse],
                       {1: [0, 0.2, 0.9], 2: [0, 0.2, 0.8], 3: [0, 0.2, 0.7]}, seeds=(1, 2, 3),
                       strategy={"name": "kl_anchor"})
    plain = write_run(tmp_path / "plain", [base, stage1, final], [0.0, 0.2, 0.5], seeds=(1, 2))
    slower = write_run(tmp_path / "slower", [base, stage1, final], [0.0, 0.2, 0.5], seeds=(1, 2),
                       train={"learning_rate": 1e-5})
    report = write_report([anchor, plain, slower], tmp_path / "report")
    names = {g.run_dirs[0].name: g.model for g in report.study.groups}
    assert names["anchor"] == "smollm2-135m-instruct [train.learning_rate=5e-05, strategy=kl_anchor(weight=1.0)]"
    assert [(b.run_dirs[0].name, g.run_dirs[0].name) for b, g, _ in report.paired] == [("plain", "anchor"),
                                                                                      ("plain", "slower")]
    md = (tmp_path / "report" / "report.md").read_text()
    verdicts = md[md.index("## Is it real?"):md.index("## Settings against a baseline")]
    assert f"### {names['anchor']} · original" in verdicts
    assert "| 3 | science | stance | −0.400 [−0.55, −0.25] | ↓16 ↑0 | 6.1e-05 | REGRESSED |" in verdicts
    assert "- seed 3: science regressed on stance against the previous checkpoint: 0.600 → 0.200" in verdicts
    assert "40 rows cannot show a drop smaller than 0.175" in verdicts
    settings = md[md.index("## Settings against a baseline"):]
    assert f"### {names['anchor']} against {names['plain']} · original" in settings
    assert "| 1 | stance | 40 | 0.600 | 0.200 | 0.400 | −0.400 [−0.55, −0.25] | ↓16 ↑0 | 6.1e-05 | REGRESSED |" \
        in settings
    assert f"- seed 3 only in {names['anchor']}: not compared" in settings
    assert "[paired.csv](paired.csv)" in settings

    paired = pd.read_csv(tmp_path / "report" / "paired.csv")
    mine = paired[paired["run"] == names["anchor"]]
    assert set(mine["baseline"]) == {names["plain"]} and set(mine["seed"].dropna()) == {1, 2}
    stance = mine[(mine["seed"] == 1) & (mine["task"] == "stance")].iloc[0]
    assert (stance["n"], stance["regressed"], stance["improved"], stance["verdict"]) == (40, 16, 0, "regressed")
    assert stance["p_value"] == pytest.approx(stats.binomtest(0, 16, 0.5).pvalue)
    assert (stance["baseline_value"], stance["run_value"], stance["difference"]) == pytest.approx((0.6, 0.2, -0.4))
    kl = mine[(mine["seed"] == 2) & (mine["measure"] == "final_kl_to_base")].iloc[0]
    assert (kl["n"], kl["baseline_value"], kl["run_value"]) == (20, pytest.approx(0.5), pytest.approx(0.8))
    assert kl["ci_low"] < 0.3 < kl["ci_high"]
    mean = mine[mine["seed"].isna() & (mine["measure"] == "final_avg_accuracy")].iloc[0]
    assert (mean["difference"], mean["interval"]) == (pytest.approx(-0.2), "t over 2 seeds")
    same = paired[paired["run"] == names["slower"]]
    assert set(same["difference"]) == {0.0} and set(same["verdict"].dropna()) == {"no detectable change"}


def test_drift_signals_of_folders_from_before_the_statistics_show_the_kl_alone(paper_report):
    md = (paper_report.out / "report.md").read_text()
    section = md[md.index("## Drift signals"):]
    assert "| base | reference |" in section and "| — | — | — | — |" in section
    assert "written before lorawatch recorded the drift statistics" in section
    frame = pd.read_csv(paper_report.out / "drift_signals.csv")
    assert frame["kl_forward_mean"].isna().all() and set(frame["set"]) == {"reference"}
