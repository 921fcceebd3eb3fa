"""`lorawatch evaluate`: adapters trained elsewhere, measured like `lorawatch run`'s checkpoints.

Adapters written by `lorawatch run` give back the run's own matrix, metrics and drift; a real
`transformers.Trainer` output folder (checkpoint-N/) is evaluated in step order; bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tiny import assert_one_line_error, cli, config_file, tiny_config, write_task_files
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir.check import check_run_folder
from lorawatch.rundir import schema, store
from lorawatch.recipe.external_adapters import evaluate_adapters
from lorawatch.recipe.run import run_experiment
from lorawatch.report.tables import load_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> tuple[Path, object]:
    """A finished `lorawatch run` of the tiny model (one seed) and its config."""
    root = tmp_path_factory.mktemp("evaluate")
    write_task_files(root / "data")
    config = tiny_config(tiny_model_dir, root / "data", seeds=(3,))
    return run_experiment(config, root / "run"), config


def test_adapters_of_a_run_give_back_the_run(trained, tmp_path):
    run_dir, config = trained
    adapters = [RunFolder(run_dir).stage(3, k).path / "adapter" for k in (1, 2)]
    out = evaluate_adapters(config, adapters, tmp_path / "evaluated", trained_on=["stance", "sum"], seed=3)

    assert check_run_folder(out) == []
    for table in ("accuracy_matrix.csv", "cl_metrics.csv", "stability.csv", "statistics.json"):
        assert (out / "seed-3" / table).read_bytes() == (run_dir / "seed-3" / table).read_bytes(), table
    for k in (0, 1, 2):
        for name in ("reference_drift.jsonl", "predictions/stance.jsonl", "predictions/sum.jsonl",
                     "predictions/reference.jsonl"):
            assert (RunFolder(out).stage(3, k).path / name).read_bytes() == \
                (RunFolder(run_dir).stage(3, k).path / name).read_bytes(), (k, name)
    original, again = load_run(run_dir).summary()["per_seed"]["3"], load_run(out).summary()["per_seed"]["3"]
    assert again == original
    stage = load_run(out).stage(3, 2)
    assert stage.task == "sum" and stage.training is None and Path(stage.adapter) == adapters[1]
    inputs = store.read_record(out / "inputs.json", schema.Inputs)
    assert [a.trained_on for a in inputs.adapters] == ["stance", "sum"]

    # the same command again resumes a finished folder: nothing is recomputed
    before = {p: p.stat().st_mtime_ns for p in out.glob("seed-*/stage-*/**/*") if p.is_file()}
    evaluate_adapters(config, adapters, out, trained_on=["stance", "sum"], seed=3)
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed-*/stage-*/**/*") if p.is_file()} == before


def _train_with_trainer(model_dir: Path, out: Path, steps: int, save_steps: int) -> None:
    """A few steps of a real transformers.Trainer on a PEFT LoRA model, saving checkpoint-N/ folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    texts = [f"Question: {i} plus {i}? Answer: {2 * i}" for i in range(16)]
    encoded = tokenizer(texts, padding="max_length", max_length=24, truncation=True)
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": ids}
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=2e-2,
                             save_strategy="steps", save_steps=save_steps, report_to=[], use_cpu=True,
                             logging_steps=1, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=rows).train()


def test_a_trainer_output_folder_is_evaluated_in_step_order(tiny_model_dir, tmp_path):
    _train_with_trainer(tiny_model_dir, tmp_path / "trainer", steps=12, save_steps=4)
    checkpoints = sorted(p.name for p in (tmp_path / "trainer").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    path = config_file(tmp_path, tiny_model_dir)

    result = cli("evaluate", tmp_path / "trainer", "--config", path, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "not known (--trained-on)" in result.stderr
    run = tmp_path / "run"
    results = load_run(run)
    (seed,) = results.seeds  # one seed: the config's first, a label for adapters trained elsewhere
    matrix = results.accuracy_matrix(seed=seed)
    assert matrix["checkpoint"].tolist() == ["base", "trainer/checkpoint-4", "trainer/checkpoint-8",
                                             "trainer/checkpoint-12"]
    summary = results.summary()["per_seed"][str(seed)]
    assert summary["bwt"] is None and summary["fwt"] is None and summary["final_kl_to_base"] > 0
    kl = [store.read_record(RunFolder(run).stage(seed, k).path / "reference_stats.json", schema.ReferenceStats).kl_mean
          for k in range(4)]
    assert kl[0] == 0 and all(v > 0 for v in kl[1:])
    assert cli("check", run).returncode == 0
    # docs/statistics.md's CI gate: the newest checkpoint against the one before it, on the same rows
    gated = cli("gate", run, "--stage", "3", "--against", "2", "--json")
    assert gated.returncode in (0, 2), gated.stderr
    verdict = json.loads(gated.stdout)
    comparison = verdict["checks"][0]["comparison"]
    assert (comparison["checkpoint"], comparison["against_checkpoint"]) == ("trainer/checkpoint-12",
                                                                            "trainer/checkpoint-8")
    assert gated.returncode == (2 if verdict["reasons"] else 0) and [t["task"] for t in comparison["tasks"]] == \
        ["stance", "sum"]
    # the paper's tables need the training order: one line, not a wrong table
    assert_one_line_error(cli("report", run, "--out", tmp_path / "report"), "--trained-on")
    assert_one_line_error(cli("run", path, "--out", run), "lorawatch evaluate")


def _foreign_adapter(folder: Path, hidden: int, rank: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    return folder


def test_bad_adapters_are_one_line_errors(trained, tmp_path, tiny_model_dir):
    run_dir, _ = trained
    path = config_file(tmp_path, tiny_model_dir)
    good = RunFolder(run_dir).stage(3, 1).path / "adapter"
    out = tmp_path / "out"

    def evaluate(*args):
        return cli("evaluate", *args, "--config", path, "--out", out)

    assert_one_line_error(evaluate(_foreign_adapter(tmp_path / "wide", hidden=48)), "wide", "width", "another base")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(good / "adapter_config.json", half)
    assert_one_line_error(evaluate(half), "half", "no adapter_model.safetensors")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(evaluate(tmp_path / "empty"), "empty", "empty folder", "checkpoint-N")
    assert_one_line_error(evaluate(tmp_path / "missing"), "missing", "not found")
    other_rank = _foreign_adapter(tmp_path / "rank2", hidden=32, rank=2)
    assert_one_line_error(evaluate(good, other_rank), "rank2", "rank 2", "differs")
    two = [good, RunFolder(run_dir).stage(3, 2).path / "adapter"]
    assert_one_line_error(evaluate(*two, "--trained-on", "stance,nope"), "--trained-on", "'nope'", "stance, sum")
    assert_one_line_error(evaluate(*two, "--trained-on", "stance"), "--trained-on", "1 task(s) for 2 adapter(s)")
    assert_one_line_error(evaluate(good, good), "given twice")
    assert not out.exists()  # every refusal came before a run folder was made
    config = json.loads(Path(path).read_text())
    assert config["tasks"][0]["name"] == "stance"


def test_adapters_that_would_load_as_nothing_are_refused_before_anything_runs(trained, tmp_path, tiny_model_dir):
    """PEFT only warns about adapter keys that do not fit; the stage would then be the base model's. Every such
    adapter is refused before the base stage, naming the first tensor that does not fit."""
    from safetensors.torch import load_file, save_file

    run_dir, _ = trained
    path = config_file(tmp_path, tiny_model_dir)
    good = RunFolder(run_dir).stage(3, 1).path / "adapter"
    out = tmp_path / "out"

    def variant(name: str, tensors=None, config_changes=None) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if tensors is not None:
            save_file(tensors(load_file(good / "adapter_model.safetensors")), folder / "adapter_model.safetensors")
        if config_changes:
            config = json.loads((good / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
        return folder

    def evaluate(*args):
        return cli("evaluate", *args, "--config", path, "--out", out)

    renamed = variant("renamed", lambda t: {k.replace("base_model.model.", "model.", 1): v for k, v in t.items()})
    first = sorted(load_file(good / "adapter_model.safetensors"))[0]
    assert_one_line_error(evaluate(renamed), "renamed", f"tensor '{first.replace('base_model.model.', 'model.', 1)}'",
                          "no place", "load the adapter as nothing")
    dropped = variant("dropped", lambda t: {k: v for k, v in t.items() if k != first})
    assert_one_line_error(evaluate(dropped), "dropped", f"lacks tensor '{first}'")
    rank = json.loads((good / "adapter_config.json").read_text())["r"]
    contradicted = variant("contradicted", config_changes={"r": rank * 2})
    assert_one_line_error(evaluate(contradicted), "contradicted", f"r = {rank * 2}", "contradicts the weights")

    trainer = tmp_path / "trainer"
    trainer.mkdir()
    shutil.copytree(good, trainer / "checkpoint-1")
    (trainer / "checkpoint-2").symlink_to(tmp_path / "nowhere")
    assert_one_line_error(evaluate(trainer), "checkpoint-2", "a link that leads nowhere or in a circle")
    (trainer / "checkpoint-2").unlink()
    (trainer / "checkpoint-2").symlink_to(trainer / "checkpoint-2")
    assert_one_line_error(evaluate(trainer), "checkpoint-2", "a link that leads nowhere or in a circle")
    (tmp_path / "loop-link").symlink_to(tmp_path / "loop-link")
    assert_one_line_error(evaluate(tmp_path / "loop-link"), "loop-link", "a link that leads nowhere or in a circle")
    assert not out.exists()
