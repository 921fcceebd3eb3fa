"""The adapter-active check: a stage whose reference distributions are the base model's (every row's KL to base
within the tolerance, every top-1 token the base's) is flagged in the log, stage.json, the terminal tables,
report.md and the gate, whether its adapter was trained (`run`), loaded (`evaluate`) or trained by a Trainer
(the callback). Real tiny models and real adapters: one trained by lorawatch, the same one with its weights
zeroed, and one PEFT loads onto modules that do not exist in the model (as nothing)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from tiny import assert_one_line_error, cli, config_file
from lorawatch.engine.drift import adapter_check_of, answer_logprobs
from lorawatch.data.prompts import encode_prompt
from lorawatch.data.tasks.loading import load_examples
from lorawatch.integrations.callback import DriftMonitorCallback
from lorawatch.report.tables import load_run
from lorawatch.rundir.layout import RunFolder

SEED = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def trained(tiny_trained_run):
    """A finished `lorawatch run` of the tiny model (one seed, two stages) and its root (data/ in it)."""
    run_dir, root, _ = tiny_trained_run
    return run_dir, root


def _adapter(run_dir: Path, stage: int = 1) -> Path:
    return RunFolder(run_dir).stage(SEED, stage).path / "adapter"


def _zeroed(good: Path, folder: Path) -> Path:
    shutil.copytree(good, folder)
    weights = folder / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(weights).items()}, weights)
    return folder


def test_trained_stages_are_active(trained):
    run_dir, _ = trained
    for k in (1, 2):
        check = load_run(run_dir).stage(SEED, k).adapter_check
        assert check is not None and check.active, (k, check)
        assert check.max_kl > 100 * check.tolerance and check.rows == 4
    assert load_run(run_dir).stage(SEED, 0).adapter_check is None  # the base model has no adapter
    gated = cli("gate", run_dir)
    assert gated.returncode in (0, 2) and "no effect" not in gated.stdout + gated.stderr


def test_zero_weights_are_flagged_in_the_log_the_record_the_tables_and_the_gate(trained, tmp_path, tiny_model_dir):
    run_dir, root = trained
    zero = _zeroed(_adapter(run_dir), tmp_path / "zero")
    out = tmp_path / "evaluated"
    result = cli("evaluate", zero, _adapter(run_dir, 2), "--trained-on", "stance,sum", "--seed", SEED,
                 "--config", config_file(tmp_path, tiny_model_dir), "--out", out)
    assert result.returncode == 0, result.stderr
    assert "adapter check" in result.stderr and "has no effect" in result.stderr

    check = load_run(out).stage(SEED, 1).adapter_check
    assert check is not None and not check.active and check.top1_changed == 0 and check.max_kl <= check.tolerance
    assert load_run(out).stage(SEED, 2).adapter_check.active

    shown = cli("show", out)
    assert "Adapter check" in shown.stdout and "has no effect" in shown.stdout

    gated = cli("gate", out, "--stage", "1")
    assert gated.returncode == 2
    assert "stage 1 (stance)" in gated.stdout and "the adapter has no effect" in gated.stdout

    report = cli("report", out, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert "Adapters with no effect" in (tmp_path / "report" / "report.md").read_text()


def test_an_adapter_on_modules_the_model_lacks(trained, tmp_path, tiny_model_dir):
    """`lorawatch evaluate` refuses it in one line; loaded with PEFT directly (which only warns), the model is the base
    model, and the check says so."""
    run_dir, root = trained
    good = _adapter(run_dir)
    wrong = tmp_path / "wrong"
    shutil.copytree(good, wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["attn.c_attn"]}))
    result = cli("evaluate", wrong, "--config", config_file(tmp_path, tiny_model_dir), "--out", tmp_path / "out")
    assert_one_line_error(result, "wrong", "target modules do not fit")

    # Keys named for another model's modules: PEFT builds the adapter, loads none of its weights and only warns.
    renamed = tmp_path / "renamed"
    shutil.copytree(good, renamed)
    weights = renamed / "adapter_model.safetensors"
    save_file({k.replace(".layers.", ".blocks."): v for k, v in load_file(weights).items()}, weights)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_examples(root / "data" / "reference.json", task="reference", split="reference", keep_task_field=True)
    prompts = [encode_prompt(tokenizer, e.id, e.prompt, 512) for e in rows]

    def logprobs(model):
        return answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, device="cpu")[1]

    base = logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), renamed)
    assert not adapter_check_of(logprobs(loaded), base).active
    really = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), good)
    assert adapter_check_of(logprobs(really), base).active


def _trainer(model_dir: Path, root: Path, name: str, learning_rate: float):
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    texts = [f"Question: {i} plus {i}? Answer: {2 * i}" for i in range(8)]
    encoded = tokenizer(texts, padding="max_length", max_length=20, truncation=True)
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": ids}
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    args = TrainingArguments(output_dir=str(root / name), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=learning_rate, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)
    callback = DriftMonitorCallback(tokenizer, root / "data" / "reference.json", every=3)
    callback.attach(trainer := Trainer(model=model, args=args, train_dataset=rows))
    return trainer, callback


def test_the_trainer_callback_checks_the_adapter_it_ends_with(trained, tiny_model_dir, caplog):
    _, root = trained
    trainer, callback = _trainer(tiny_model_dir, root, "untrained", learning_rate=0.0)  # B stays zero
    with caplog.at_level("WARNING", logger="lorawatch.integrations.callback"):
        trainer.train()
    assert callback.adapter_check is not None and not callback.adapter_check.active
    assert any("adapter check" in r.message and "no effect" in r.message for r in caplog.records)

    trainer, callback = _trainer(tiny_model_dir, root, "trained", learning_rate=2e-2)
    trainer.train()
    assert callback.adapter_check.active
