"""`lorawatch export --format gguf`: GGUF files made by llama.cpp's converter and quantizer, loaded by llama.cpp's
runtime and compared with the PyTorch checkpoint on the reference set. Needs llama-cpp-python and llama.cpp's
converter (`make deploy` installs both); without them these tests skip and say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import assert_one_line_error, build_tiny_model, cli, needs_llama_cpp
from lorawatch.deploy import gguf
from lorawatch.deploy.agreement import agreement
from lorawatch.deploy.export import EXPORT_RECORD
from lorawatch.errors import UserError

needs_llama_cpp()

SEED = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def trained(tiny_trained_run):
    run_dir, root, _ = tiny_trained_run
    return run_dir, root


def test_gguf_export_of_a_trained_stage(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "gguf-export"
    result = cli("export", run_dir, "--seed", SEED, "--stage", 2, "--out", out, "--format", "gguf",
                 "--quant", "f16,q8_0,q4_k_m")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / EXPORT_RECORD).read_text())
    checks = {c["form"]: c for c in record["checks"]}
    assert set(checks) == {"hf", "f16", "q8_0", "q4_k_m"}
    assert checks["hf"]["passes"] and checks["f16"]["passes"]  # the hard bars
    assert checks["f16"]["top1_agreement"] >= 0.99
    for quant in ("f16", "q8_0", "q4_k_m"):
        assert (out / "gguf" / f"seed{SEED}-stage2-{quant}.gguf").is_file()
    assert not (out / "gguf" / f"seed{SEED}-stage2-f32.gguf").exists()  # the intermediate is not kept
    assert "f16: top-1 agreement" in (out / "README.md").read_text()
    print(json.dumps(record["checks"], indent=1))  # the numbers, for the log

    # bench/deploy_speed.py times exactly such a folder: each GGUF file under llama.cpp against the Hugging Face
    # folder under transformers (a smoke run: two prompts, three tokens)
    speed = tmp_path / "speed.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bench = subprocess.run([sys.executable, str(REPO / "bench" / "deploy_speed.py"), str(out), "--rows", "2",
                            "--new-tokens", "3", "--threads", "1", "--out", str(speed)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert bench.returncode == 0, bench.stderr
    timed = json.loads(speed.read_text())["results"]
    assert timed[0]["form"].startswith("PyTorch") and timed[0]["decode_speedup"][0] == 1.0
    assert [r["form"] for r in timed[1:]] == ["llama.cpp f16", "llama.cpp q8_0", "llama.cpp q4_k_m"]  # by size
    assert all(len(r["decode_s"]) == 2 and r["decode_tokens_per_s"][0] > 0 for r in timed)
    assert "| llama.cpp q4_k_m |" in bench.stdout


def test_gguf_refusals_are_one_line(trained, tmp_path):
    run_dir, _ = trained
    assert_one_line_error(cli("export", run_dir, "--seed", SEED, "--stage", 1, "--out", tmp_path / "x", "--format",
                              "gguf", "--quant", "q9_9"), "--quant", "'q9_9'")


def _gemma3_as_published(folder):
    """The tiny Gemma-3 with the published models' layout: 5 sliding-window layers then 1 full (what llama.cpp's
    Gemma-3 assumes), and the query scale of its head width."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers, config.layer_types = 6, ["sliding_attention"] * 5 + ["full_attention"]
    config.query_pre_attn_scalar = config.head_dim
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_other_families_convert_and_agree(family, tmp_path):
    """The paper's other families, tiny and random: converted, run by llama.cpp at f16 and q8_0 and compared with
    transformers on a few prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorawatch.data.prompts import encode_prompt
    from lorawatch.deploy.merge import reference_logits

    folder = build_tiny_model(tmp_path / family, family=family)
    if family == "gemma3":
        _gemma3_as_published(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    gguf.check_family(model.config, family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [encode_prompt(tokenizer, str(i), f"Question: {i} plus {i}? A. dovish, B. hawkish", 64)
               for i in range(6)]
    files = gguf.write_gguf(folder, tmp_path / "gguf", family, ["f16", "q8_0"])
    checkpoint = reference_logits(model, prompts, tokenizer)
    for quant, path in files.items():
        check = agreement(quant, checkpoint, gguf.gguf_logits(path, prompts))
        print(check.line())
        assert check.passes, check.line()


def test_a_gemma3_layer_pattern_llama_cpp_would_ignore_is_refused(tmp_path):
    from transformers import AutoConfig

    folder = build_tiny_model(tmp_path / "gemma3", family="gemma3")  # sliding, full: not llama.cpp's 5 + 1
    with pytest.raises(UserError, match="llama.cpp runs every Gemma-3 as 5 sliding layers then 1 full"):
        gguf.check_family(AutoConfig.from_pretrained(folder), "tiny-gemma3")


@pytest.mark.integration
def test_packaged_smollm2_converts_and_agrees(tmp_path):
    """The packaged SmolLM2-135M-Instruct (its Q4_1 GGUF read into PyTorch, as lorawatch runs it) written as a
    Hugging Face folder, converted by llama.cpp and run at f16: its real tokenizer and architecture end to end."""
    from lorawatch.data.prompts import encode_prompt
    from lorawatch.deploy import merge
    from lorawatch.models.loading import load_model

    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    gguf.check_family(loaded.model.config, "smollm2-135m-instruct")
    merge.save(loaded.model, loaded.tokenizer, tmp_path / "hf")
    prompts = [encode_prompt(loaded.tokenizer, str(i), f"What is {i} plus {i}? Answer with only the final number.",
                             128) for i in range(8)]
    files = gguf.write_gguf(tmp_path / "hf", tmp_path / "gguf", "smollm2", ["f16"])
    check = agreement("f16", merge.reference_logits(loaded.model, prompts, loaded.tokenizer),
                      gguf.gguf_logits(files["f16"], prompts))
    print(check.line())
    assert check.passes, check.line()
