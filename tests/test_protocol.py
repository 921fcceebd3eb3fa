"""The whole protocol on the tiny random model: run folder contents and the consistency of its numbers."""

import json
import math

import pandas as pd
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import tiny_config, write_task_files
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import schema, store
from lorawatch.config import PLAIN_SWITCHES
from lorawatch.analysis.metrics import compute_cl_metrics, read_matrix_csv
from lorawatch.data.prompts import encode_train_example
from lorawatch.recipe.protocol import encode, load_data
from lorawatch.recipe.run import run_experiment
from lorawatch.engine.drift import answer_logprobs, per_example_drift
from lorawatch.report.tables import load_run
from lorawatch.recipe.training import TrainParams, train_stage


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    write_task_files(root / "data")
    config = tiny_config(tiny_model_dir, root / "data")
    return run_experiment(config, root / "run"), config, root


def test_run_folder_contents(tiny_run):
    run_dir, config, _ = tiny_run
    assert json.loads((run_dir / "config.json").read_text())["seeds"] == [1, 2]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["versions"]["torch"]
    for seed in (1, 2):
        for stage in range(3):
            folder = RunFolder(run_dir).stage(seed, stage).path
            for name in ("stage.json", "scores.json", "reference_drift.jsonl", "reference_stats.json",
                         "predictions/stance.jsonl", "predictions/sum.jsonl", "predictions/reference.jsonl"):
                assert (folder / name).is_file(), folder / name
            rows = store.read_jsonl(folder / "predictions" / "stance.jsonl")
            assert len(rows) == 4 and set(rows[0]) == {"id", "task", "raw_output", "prediction", "gold", "correct",
                                                          "output_ids"}
            assert (folder / "adapter" / "adapter_model.safetensors").is_file() == (stage > 0)
            assert (folder / "adapter" / "adapter_config.json").is_file() == (stage > 0)
        for name in ("accuracy_matrix.csv", "cl_metrics.json", "cl_metrics.csv", "stability.csv", "statistics.json"):
            assert (RunFolder(run_dir).seed(seed).path / name).is_file()
    for name in ("accuracy_matrix_mean.csv", "accuracy_matrix_std.csv", "cl_metrics_mean.csv", "stability_std.csv",
                 "summary.json"):
        assert (RunFolder(run_dir).summary_folder / name).is_file()
    assert not list(run_dir.rglob("*.tmp"))


def test_numbers_are_consistent(tiny_run):
    run_dir, config, _ = tiny_run
    results = load_run(run_dir)
    for seed in (1, 2):
        tasks, matrix = read_matrix_csv(RunFolder(run_dir).seed(seed).path / "accuracy_matrix.csv")
        assert tasks == ["stance", "sum"]
        for stage in range(3):
            folder = RunFolder(run_dir).stage(seed, stage).path
            scores = store.read_json(folder / "scores.json")
            for i, task in enumerate(tasks):
                predictions = store.read_jsonl(folder / "predictions" / f"{task}.jsonl")
                assert scores[task] == sum(p["correct"] for p in predictions) / len(predictions) == matrix[stage, i]
        expected = compute_cl_metrics(matrix, tasks).to_dict()
        recorded = store.read_record(RunFolder(run_dir).seed(seed).path / "cl_metrics.json", schema.ClMetricsRecord)
        assert recorded.body() == expected and recorded.schema_version == schema.SCHEMA_VERSION
        # the statistics record agrees with the matrix and the CL metrics it gives intervals to
        statistics = store.read_record(RunFolder(run_dir).seed(seed).path / "statistics.json", schema.StatisticsRecord)
        labels = ["base", *tasks]
        for cell in statistics.accuracy:
            assert cell.accuracy == matrix[labels.index(cell.checkpoint), tasks.index(cell.task)]
            assert cell.low <= cell.accuracy <= cell.high and cell.n == 4
        for interval in statistics.metrics:
            row = next(r for r in expected["per_checkpoint"] if r["checkpoint"] == interval.checkpoint)
            assert interval.value == pytest.approx(row[interval.metric], abs=1e-12)
        assert {(c.stage, c.against) for c in statistics.comparisons} == {(1, "previous"), (1, "base"),
                                                                          (2, "previous"), (2, "base")}
        for comparison in statistics.comparisons:
            for t in comparison.tasks:
                i = tasks.index(t.task)
                assert t.accuracy_before == matrix[comparison.against_stage, i]
                assert t.accuracy_after == matrix[comparison.stage, i]
        stability = results.stability(seed)
        assert stability["kl_mean"].iloc[0] == 0.0
        assert (stability["kl_mean"].iloc[1:] > 0).all()
        assert stability["entropy_mean_delta"].iloc[0] == 0.0
    # the base stage does not depend on the seed
    assert (RunFolder(run_dir).stage(1, 0).path / "predictions" / "sum.jsonl").read_text() == \
        (RunFolder(run_dir).stage(2, 0).path / "predictions" / "sum.jsonl").read_text()
    mean = results.accuracy_matrix()
    per_seed = [results.accuracy_matrix(s) for s in (1, 2)]
    pd.testing.assert_frame_equal(mean[["stance", "sum"]], (per_seed[0][["stance", "sum"]] +
                                                           per_seed[1][["stance", "sum"]]) / 2, check_dtype=False)
    summary = results.summary()
    assert summary["mean_std"]["final_kl_to_base"]["mean"] > 0


def test_saved_adapter_reproduces_the_recorded_drift(tiny_run, tiny_model_dir):
    run_dir, config, _ = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    data = load_data(config)
    encoded = encode(data, tokenizer, 512)
    ids, base_lp = answer_logprobs(base, encoded.reference, pad_id=tokenizer.pad_token_id, token_budget=100000, device="cpu")
    model = PeftModel.from_pretrained(base, RunFolder(run_dir).stage(2, 2).path / "adapter").eval()
    _, stage_lp = answer_logprobs(model, encoded.reference, pad_id=tokenizer.pad_token_id, token_budget=100000, device="cpu")
    recomputed = per_example_drift(ids, [None] * len(ids), stage_lp, base_lp)
    recorded = store.read_jsonl(RunFolder(run_dir).stage(2, 2).path / "reference_drift.jsonl")
    for mine, theirs in zip(recomputed, recorded):
        assert mine.id == theirs["id"] and math.isclose(mine.kl, theirs["kl"], rel_tol=1e-4, abs_tol=1e-6)


def test_same_seed_gives_identical_results(tiny_run, tiny_model_dir):
    run_dir, _, root = tiny_run
    again = run_experiment(tiny_config(tiny_model_dir, root / "data", seeds=(1,)), root / "again")
    for stage in range(3):
        for name in ("predictions/stance.jsonl", "predictions/sum.jsonl", "scores.json", "reference_drift.jsonl"):
            assert (RunFolder(again).stage(1, stage).path / name).read_text() == \
                (RunFolder(run_dir).stage(1, stage).path / name).read_text()


def test_training_lowers_the_loss_on_answer_tokens(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    examples = [encode_train_example(tokenizer, f"Question: {i}?", "ABC"[i % 3], 512) for i in range(8)]
    params = TrainParams(learning_rate=1e-2, batch_size=2, grad_accum=2, epochs=6, max_grad_norm=1.0,
                         weight_decay=0.0, lr_scheduler="constant")
    before = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
    log = train_stage(model, examples, params, seed=0, pad_id=tokenizer.pad_token_id, device="cpu")
    assert log.optimizer_steps == 12 and log.micro_batches == 24
    # a random 400-token model starts near ln(400) ~ 6 nats per answer token; the end-of-turn tokens are
    # learnable outright, the letter (i mod 3) is not, so the loss falls by far but not to zero
    assert 4.5 < log.step_losses[0] < 8.0
    assert 0.3 < log.step_losses[-1] < 0.35 * log.step_losses[0]
    after = [p for p in model.parameters() if not p.requires_grad]
    assert len(after) == len(before) > 0 and all(torch.equal(a, b) for a, b in zip(before, after))  # only the adapter moved


def test_costs_are_recorded(tiny_run):
    run_dir, _, _ = tiny_run
    costs = store.read_json(run_dir / "costs.json")
    assert {"model_load", "training", "evaluation", "tables"} <= set(costs["phase_seconds"])
    evaluation = costs["generation"]["evaluation"]
    # 2 seeds x 2 stages x (2 tasks x 4 + 4 reference) rows, and the base stage unless an earlier test's run cached it
    base_reused = store.read_json(RunFolder(run_dir).stage(1, 0).path / "stage.json")["reused_from_cache"]
    assert evaluation["rows"] == 12 * 4 + (0 if base_reused else 12) and evaluation["generated_tokens"] > 0
    # every generated token is accounted for: a decoding step, an accepted draft or lookup token
    assert evaluation["decode_steps"] + evaluation["accepted_draft_tokens"] + evaluation["accepted_lookup_tokens"] \
        == evaluation["generated_tokens"]
    assert costs["peak_rss_bytes"] > 10_000_000 and costs["base_stage_key"]


def test_base_stage_is_reused_across_orders_and_runs(tiny_run, tiny_model_dir):
    run_dir, _, root = tiny_run
    reversed_run = run_experiment(tiny_config(tiny_model_dir, root / "data", seeds=(3,), order="reversed"),
                                  root / "reversed")
    first, again = RunFolder(run_dir).stage(1, 0).path, RunFolder(reversed_run).stage(3, 0).path
    assert store.read_json(again / "stage.json")["reused_from_cache"] is True
    assert store.read_json(again / "stage.json")["base_stage_key"] == store.read_json(first / "stage.json")["base_stage_key"]
    for name in ("predictions/stance.jsonl", "predictions/sum.jsonl", "reference_drift.jsonl"):
        assert (again / name).read_text() == (first / name).read_text()
    assert list(store.read_record(again / "scores.json", schema.Scores).accuracy()) == ["sum", "stance", "reference"]
    tasks, _ = read_matrix_csv(RunFolder(reversed_run).seed(3).path / "accuracy_matrix.csv")
    assert tasks == ["sum", "stance"]


def test_fast_path_is_faithful_to_the_plain_one(tiny_run, tiny_model_dir):
    """Every fast-path part and token-budget batches against none of them."""
    run_dir, _, root = tiny_run
    plain = run_experiment(tiny_config(tiny_model_dir, root / "data", token_budget=64,
                                       **{part: False for part in PLAIN_SWITCHES}), root / "plain")
    fast = run_experiment(tiny_config(tiny_model_dir, root / "data", token_budget=100000), root / "fast")
    same = total = 0
    for seed in (1, 2):
        for stage in range(3):
            for task in ("stance", "sum", "reference"):
                a = store.read_jsonl(RunFolder(plain).stage(seed, stage).path / "predictions" / f"{task}.jsonl")
                b = store.read_jsonl(RunFolder(fast).stage(seed, stage).path / "predictions" / f"{task}.jsonl")
                same += sum(x["output_ids"] == y["output_ids"] for x, y in zip(a, b))
                total += len(a)
        _, m_plain = read_matrix_csv(RunFolder(plain).seed(seed).path / "accuracy_matrix.csv")
        _, m_fast = read_matrix_csv(RunFolder(fast).seed(seed).path / "accuracy_matrix.csv")
        assert abs(m_plain - m_fast).max() <= 1 / 4 + 1e-9  # at most one example of 4 per cell
    assert same / total >= 0.98
    fast_costs = store.read_json(fast / "costs.json")["generation"]["evaluation"]
    assert fast_costs["accepted_draft_tokens"] > 0


def test_gap_dropout_has_dropouts_law():
    from lorawatch.recipe.training import GapDropout

    torch.manual_seed(0)
    dropout = GapDropout(0.05).train()
    x = torch.randn(64, 128, 96, requires_grad=True)
    y = dropout(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.05) < 0.003  # 786k draws: 0.003 is > 10 standard deviations
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.95)
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped)
    # independent across positions: no excess of runs (neighbours both dropped happen at rate p^2)
    pairs = (dropped[..., 1:] & dropped[..., :-1]).float().mean().item()
    assert abs(pairs - 0.05 ** 2) < 0.001
    assert torch.equal(dropout.eval()(x), x)
    torch.manual_seed(1)
    a = GapDropout(0.05).train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, GapDropout(0.05).train()(x))  # seeded like torch's dropout


def test_two_runs_started_together_compute_the_base_stage_once(tmp_path, tiny_model_dir):
    """The second run waits on the base-stage cache's lock while the first computes (held open at a pause point),
    then reuses what the first cached, instead of computing it a second time beside it."""
    import fcntl
    import os
    import subprocess
    import sys
    import time

    from tiny import SRC, config_file

    path = config_file(tmp_path, tiny_model_dir)
    env = {**os.environ, "PYTHONPATH": str(SRC), "LORAWATCH_BASE_STAGE_CACHE": str(tmp_path / "cache")}

    def start(name: str, stderr=subprocess.PIPE, **extra) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lorawatch", "run", str(path), "--out", str(tmp_path / name),
                                 "--seeds", "1"], env={**env, **extra}, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)

    # The first run holds the lock at a pause point until the test has seen the second one wait on it: a fixed
    # pause raced the second run's start-up on a loaded machine (it came late, found the cache, and never waited).
    resume = tmp_path / "resume"
    first = start("a", LORAWATCH_PAUSE_AT="base:eval:stance", LORAWATCH_PAUSE_SECONDS="300",
                  LORAWATCH_RESUME_FILE=str(resume))
    deadline = time.monotonic() + 120
    while True:  # until the first run holds the lock, i.e. is computing the base stage
        held = False
        for lock in (tmp_path / "cache").glob("*.lock"):
            with open(lock) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held = True
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
        if held:
            break
        time.sleep(0.1)
    second_log = tmp_path / "second.err"
    with open(second_log, "w") as log:
        second = start("b", stderr=log)
        deadline = time.monotonic() + 240
        while "waiting to reuse it" not in second_log.read_text():
            assert second.poll() is None and time.monotonic() < deadline, second_log.read_text()
            time.sleep(0.1)
        resume.touch()
        outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    reused = [store.read_record(RunFolder(tmp_path / name).stage(1, 0).path / "stage.json", schema.StageRecord)
              .reused_from_cache for name in ("a", "b")]
    assert reused == [False, True]
    for name in ("predictions/stance.jsonl", "predictions/sum.jsonl", "reference_drift.jsonl"):
        assert (RunFolder(tmp_path / "a").stage(1, 0).path / name).read_bytes() == \
            (RunFolder(tmp_path / "b").stage(1, 0).path / name).read_bytes()


def test_tasks_whose_files_share_row_ids(tiny_model_dir, tmp_path):
    """A checkpoint's tasks are generated in one call, keyed by row id; when two tasks' files give the same ids
    (nothing forbids it across files), each task is generated on its own, with the same predictions."""
    write_task_files(tmp_path / "data")
    for name in ("mc_test.json", "num_test.json"):
        rows = json.loads((tmp_path / "data" / name).read_text())
        (tmp_path / "data" / name).write_text(json.dumps([dict(r, id=f"q{i}") for i, r in enumerate(rows)]))
    config = tiny_config(tiny_model_dir, tmp_path / "data", seeds=(1,))
    run_dir = run_experiment(config, tmp_path / "same-ids")
    write_task_files(tmp_path / "plain-data")
    plain_dir = run_experiment(tiny_config(tiny_model_dir, tmp_path / "plain-data", seeds=(1,)), tmp_path / "own-ids")
    for stage in range(3):
        for task in ("stance", "sum"):
            same = store.read_jsonl(RunFolder(run_dir).stage(1, stage).path / "predictions" / f"{task}.jsonl")
            own = store.read_jsonl(RunFolder(plain_dir).stage(1, stage).path / "predictions" / f"{task}.jsonl")
            assert [r["id"] for r in same] == [f"q{i}" for i in range(4)]
            assert [r["output_ids"] for r in same] == [r["output_ids"] for r in own]
            assert [r["gold"] for r in same] == [r["gold"] for r in own]
