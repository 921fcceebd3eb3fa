"""`lorawatch export`: a stage of a real tiny run merged into its base model and written as a Hugging Face folder
(and GGUF files through llama.cpp, where llama-cpp-python is installed), each read back and checked against the
checkpoint; what cannot be exported is one line, before any work."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import assert_one_line_error, cli
from lorawatch.deploy.export import EXPORT_RECORD
from lorawatch.engine.drift import answer_logprobs
from lorawatch.data.inputs import encode, load_data
from lorawatch.rundir.layout import RunFolder

SEED = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def trained(tiny_trained_run):
    run_dir, _, config = tiny_trained_run
    return run_dir, config


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def _reference_logprobs(model, config, tokenizer):
    prompts = encode(load_data(config), tokenizer, config.train.max_length).reference
    return answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, device="cpu")[1]


def test_hf_export_is_the_checkpoint(trained, tmp_path, tiny_model_dir):
    run_dir, config = trained
    out = tmp_path / "exported"
    result = cli("export", run_dir, "--seed", SEED, "--stage", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "hf: top-1 agreement 100.0%" in result.stderr
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", EXPORT_RECORD} <= \
        {p.name for p in out.iterdir()}
    assert not (tmp_path / ".exported.partial").exists()

    # independently of the export's own check: the folder gives the checkpoint's distributions
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    checkpoint = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           RunFolder(run_dir).stage(SEED, 2).adapter)
    exported = AutoModelForCausalLM.from_pretrained(out)
    ours, theirs = (_reference_logprobs(m, config, tokenizer) for m in (checkpoint, exported))
    assert torch.allclose(ours, theirs, atol=1e-4)

    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["checks"][0]["form"] == "hf" and record["checks"][0]["top1_agreement"] == 1.0
    assert record["checks"][0]["kl_max"] < 1e-6
    meta = _front_matter((out / "README.md").read_text())
    assert meta["lorawatch"]["stage"] == 2 and meta["lorawatch"]["verdict"] in ("regressed", "no regression detected")
    results = meta["model-index"][0]["results"]
    accuracy = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in results if r["dataset"]["type"] in
                ("stance", "sum")}
    scores = RunFolder(run_dir).stage(SEED, 2).scores.load().accuracy()
    assert accuracy == {t: round(scores[t], 4) for t in ("stance", "sum")}
    drift = next(r for r in results if r["dataset"]["name"] == "reference set")["metrics"]
    kl = next(m["value"] for m in drift if m["type"] == "kl_mean")
    assert kl == round(RunFolder(run_dir).stage(SEED, 2).reference_stats.load().kl_mean, 6)
    assert any(r["dataset"]["name"] == "all tasks" for r in results)  # the CL metrics


def test_stage_0_exports_the_base_model(trained, tmp_path, tiny_model_dir):
    run_dir, _ = trained
    out = tmp_path / "base"
    result = cli("export", run_dir, "--seed", SEED, "--stage", 0, "--out", out)
    assert result.returncode == 0, result.stderr
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(base[k], exported[k]) for k in base)


def test_what_cannot_be_exported_is_refused_in_one_line(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "never"

    def export(*args, seed=SEED, stage=1):
        return cli("export", run_dir, "--seed", seed, "--stage", stage, "--out", out, *args)

    assert_one_line_error(export(seed=99), "--seed 99", "seeds 3")
    assert_one_line_error(export(stage=7), "--stage 7", "finished: 0, 1, 2")
    assert_one_line_error(export("--format", "onnx"), "--format", "'onnx'")
    assert_one_line_error(export("--quant", "q8_0"), "--quant", "--format gguf")
    assert_one_line_error(cli("export", tmp_path, "--seed", 1, "--stage", 1, "--out", out), "not a lorawatch run")
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    assert_one_line_error(cli("export", run_dir, "--seed", SEED, "--stage", 1, "--out", full), "exists")
    assert not out.exists()
