"""The whole protocol on the packaged SmolLM2-135M-Instruct, with a handful of examples."""

import pytest
import torch
from peft import PeftModel

from tiny import TRACE_DIR, needs_trace
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import store
from lorawatch.config import build_config
from lorawatch.analysis.metrics import read_matrix_csv
from lorawatch.models.loading import load_model
from lorawatch.recipe.run import run_experiment
from lorawatch.report.tables import load_run

pytestmark = pytest.mark.integration

SMALL = {"model": {"spec": "smollm2-135m-instruct", "device": "cpu", "dtype": "float32"},
         "train": {"learning_rate": 5e-4, "batch_size": 2, "grad_accum": 1},
         "eval": {"max_new_tokens": 6},
         "seeds": [33]}


def check_consistency(run_dir, tasks):
    seed = 33
    names, matrix = read_matrix_csv(RunFolder(run_dir).seed(seed).path / "accuracy_matrix.csv")
    assert names == tasks and matrix.shape == (len(tasks) + 1, len(tasks))
    for stage in range(len(tasks) + 1):
        folder = RunFolder(run_dir).stage(seed, stage).path
        for i, task in enumerate(tasks):
            rows = store.read_jsonl(folder / "predictions" / f"{task}.jsonl")
            assert matrix[stage, i] == sum(r["correct"] for r in rows) / len(rows)
            assert all(r["raw_output"] is not None and r["gold"] for r in rows)
    stability = load_run(run_dir).stability(seed)
    assert stability["kl_mean"].iloc[0] == 0.0 and (stability["kl_mean"].iloc[1:] > 0).all()
    assert stability["entropy_mean"].notna().all() and (stability["margin_mean"] >= 0).all()
    for stage in range(1, len(tasks) + 1):
        log = store.read_json(RunFolder(run_dir).stage(seed, stage).path / "stage.json")["training"]
        assert log["optimizer_steps"] > 0 and all(0 < loss < 20 for loss in log["step_losses"])


def test_builtin_tasks_on_smollm2(tmp_path):
    config = build_config({
        "name": "smol-builtin", **SMALL,
        "tasks": [{"name": "stance", "kind": "multiple_choice", "builtin": "stance", "max_train_rows": 6,
                   "max_test_rows": 4},
                  {"name": "arithmetic", "kind": "numeric", "builtin": "arithmetic", "max_train_rows": 6,
                   "max_test_rows": 4}],
        "reference": {"builtin_per_task": 2},
    })
    run_dir = run_experiment(config, tmp_path / "run")
    check_consistency(run_dir, ["stance", "arithmetic"])
    env = store.read_json(run_dir / "environment.json")
    assert env["model"]["source"] == "alias" and env["dtype"] == "float32" and env["model"]["has_chat_template"]

    # the saved adapter is a real PEFT adapter that changes the model's outputs
    base = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    ids = base.tokenizer("The Committee decided to raise rates.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base.model(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base.model, RunFolder(run_dir).stage(33, 2).path / "adapter").eval()
        after = adapted(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_trace_data_on_smollm2(tmp_path):
    needs_trace()
    config = build_config({
        "name": "smol-trace", **SMALL,
        "tasks": [{"name": "FOMC", "kind": "multiple_choice", "train": str(TRACE_DIR / "FOMC" / "train.json"),
                   "test": str(TRACE_DIR / "FOMC" / "test.json"), "max_train_rows": 4, "max_test_rows": 3},
                  {"name": "ScienceQA", "kind": "multiple_choice",
                   "train": str(TRACE_DIR / "ScienceQA" / "train.json"),
                   "test": str(TRACE_DIR / "ScienceQA" / "test.json"), "max_train_rows": 4, "max_test_rows": 3}],
        # the first rows of the paper's reference set are FOMC rows (task_name "fomc")
        "reference": {"path": str(TRACE_DIR / "reference.json"), "max_rows": 3},
    })
    run_dir = run_experiment(config, tmp_path / "run")
    check_consistency(run_dir, ["FOMC", "ScienceQA"])
    # ScienceQA gold answers carry a rationale; only the letter is the gold label
    rows = store.read_jsonl(RunFolder(run_dir).stage(33, 0).path / "predictions" / "ScienceQA.jsonl")
    assert all(len(r["gold"]) == 1 for r in rows)


def test_smollm2_as_deployed_under_llama_cpp(tmp_path):
    """The packaged SmolLM2 through the whole deployed-form path: a one-stage run with a deploy section merges each
    checkpoint, converts it to GGUF with llama.cpp's converter, quantizes it, and runs it through llama.cpp on the
    same rows. f16 is the checkpoint (the export's bar: top-1 agreement ≥ 99%); q8_0 is a smaller file that stays
    close to it; the base model's own quantization drift is measured beside the trained checkpoint's."""
    from tiny import needs_llama_cpp

    needs_llama_cpp()
    config = build_config({
        "name": "smol-deploy", **SMALL,
        "tasks": [{"name": "stance", "kind": "multiple_choice", "builtin": "stance", "max_train_rows": 6,
                   "max_test_rows": 6}],
        "reference": {"builtin_per_task": 4},
        "deploy": {"formats": ["f16", "q8_0"]},
    })
    run_dir = run_experiment(config, tmp_path / "run")
    for stage in (0, 1):
        folder = RunFolder(run_dir).stage(33, stage)
        assert folder.deployed_formats() == ["f16", "q8_0"]
        f16, q8 = (folder.deployed(fmt).record.read() for fmt in ("f16", "q8_0"))
        assert f16.reference.same_top1 >= 0.99 and f16.reference.kl_reverse_max < 1e-3
        assert q8.file_bytes < 0.6 * f16.file_bytes
        assert q8.reference.kl_reverse_mean < 0.05 and q8.reference.same_top1 >= 0.75
        assert f16.identical["stance"] >= 0.5  # greedy outputs, six tokens: f16 round-off may flip a late token
        assert set(f16.accuracy) == {"stance", "reference"} and f16.generated_tokens > 0
    assert RunFolder(run_dir).stage(33, 1).record.read().adapter_check.active
