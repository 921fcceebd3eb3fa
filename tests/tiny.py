"""The tiny model and the tiny two-task run that the tests share: a randomly initialised model with its own
tokenizer, built here (no downloads: the tokenizer is a byte-level BPE trained on a few sentences, the model a
2-layer Llama or another family), the run's task files and config, the command line run on them, and checks on
what a run writes. Fixtures that build these live in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SRC = Path(__file__).resolve().parents[1] / "src"
TRACE_DIR = SHARED / "data" / "trace-llm-cl-500"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral.",
    "Choose an answer for the following question and give your reasons. Question: Which is a mammal?",
    "Solve the following math problem. Question: Ann has 3 apples and buys 4 more. How many apples?",
    "Answer with only the letter of the correct choice, e.g., \"C\". Answer with only the final number.",
    "The Committee decided to raise the target range to contain inflation pressures. Stance: Text:",
    "0 1 2 3 4 5 6 7 8 9 10 12 24 42 100 A B C D E user assistant system ### Instruction: Response:",
]


# The architectures of the paper's presets, tiny and random: Llama (SmolLM2, Llama-3.2), Qwen3.5 (hybrid: gated
# linear-attention layers with a recurrent state beside full attention), Gemma-3 (sliding-window layers with a
# window shorter than the prompts, beside full attention) and Qwen3 (Qwen2/3 family).
FAMILIES = ("llama", "qwen3_5", "gemma3", "qwen3")


def _family_config(family: str, vocab_size: int, eos: int, pad: int):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3_5TextConfig, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=eos, pad_token_id=pad,
                  bos_token_id=None, tie_word_embeddings=True,
                  # wide enough init that a rank-8 adapter can move the logits by whole nats
                  initializer_range=0.25)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=2, **common)
    if family == "qwen3":
        return Qwen3Config(num_hidden_layers=2, head_dim=8, **common)
    if family == "gemma3":
        # Gemma scales its embeddings by sqrt(hidden_size): at the wide init every prompt gives the same token
        return Gemma3TextConfig(num_hidden_layers=2, head_dim=8, sliding_window=6,
                                layer_types=["sliding_attention", "full_attention"],
                                **{**common, "initializer_range": 0.02})
    if family == "qwen3_5":
        return Qwen3_5TextConfig(num_hidden_layers=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
                                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                 linear_value_head_dim=8, linear_conv_kernel_dim=4, **common)
    raise ValueError(family)


def build_tiny_model(folder: Path, *, chat_template: bool = True, seed: int = 0, family: str = "llama") -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if chat_template else
                                        "<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = _family_config(family, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def needs_llama_cpp() -> None:
    """Skip the calling test module, saying why, unless llama-cpp-python and llama.cpp's converter are installed."""
    from lorawatch.deploy import gguf
    from lorawatch.errors import UserError

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make deploy` builds it)")
    try:
        gguf.converter_folder()
    except UserError as missing:
        pytest.skip(str(missing), allow_module_level=True)


def needs_trace() -> None:
    if not TRACE_DIR.is_dir():
        pytest.skip(f"{TRACE_DIR} not present: these tests need a local copy of the TRACE data there")


# Task files, configs and the command line, shared by the protocol, CLI, resume and monitor tests.

def write_task_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    mc = [{"prompt": f"Text {i}: stance? A. dovish, B. hawkish, C. neutral.", "answer": "ABC"[i % 3]}
          for i in range(14)]
    num = [{"prompt": f"Question: {i} plus {i}?", "answer": str(2 * i)} for i in range(14)]
    (folder / "mc_train.json").write_text(json.dumps(mc[:8]))
    (folder / "mc_test.json").write_text(json.dumps(mc[8:12]))
    (folder / "num_train.jsonl").write_text("\n".join(json.dumps(r) for r in num[:8]))
    (folder / "num_test.json").write_text(json.dumps(num[8:12]))
    reference = [dict(mc[12], task="stance"), dict(mc[13], task="stance"), dict(num[12], task_name="sum"),
                 dict(num[13], task_name="sum")]
    (folder / "reference.json").write_text(json.dumps(reference))


def tiny_config(model_dir, data_dir, seeds=(1, 2), order="original", **eval_settings):
    from lorawatch.config import build_config

    return build_config({
        "name": "tiny",
        "model": {"spec": str(model_dir), "device": "cpu", "dtype": "float32"},
        "tasks": [
            {"name": "stance", "kind": "multiple_choice", "train": str(data_dir / "mc_train.json"),
             "test": str(data_dir / "mc_test.json")},
            {"name": "sum", "kind": "numeric", "train": str(data_dir / "num_train.jsonl"),
             "test": str(data_dir / "num_test.json")},
        ],
        "reference": {"path": str(data_dir / "reference.json")},
        "train": {"learning_rate": 5e-3, "batch_size": 2, "grad_accum": 2},
        "eval": {"max_new_tokens": 4, "token_budget": 64, **eval_settings},
        "seeds": list(seeds),
        "order": order,
    })


def lorawatch(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`lorawatch ARGS` in a fresh interpreter: for what is about the process itself (death by a signal, a crash
    and its resume, a lock another process holds, what the interpreter starts with, Ray workers)."""
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorawatch", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


@dataclass(frozen=True)
class CliResult:
    """What a command gave: the fields of a subprocess.CompletedProcess that the tests read."""

    returncode: int
    stdout: str
    stderr: str


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    import warnings

    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def cli(*args, cwd=None, env=None) -> CliResult:
    """`lorawatch ARGS` in this interpreter, through the same entry point (`lorawatch.cli:main`), its stdout and
    stderr captured apart and its exit code as a process would give it (1 and the traceback for a bug). Some
    5 s faster than `lorawatch` (no fresh interpreter importing torch). Warnings are filtered and shown as in a
    fresh interpreter; what the entry point changes for the process (warning format and filters, the SIGTERM
    handler, torch's threads and random state, the working folder and environment) is put back after."""
    import random
    import signal
    import traceback
    import warnings

    import numpy as np
    import torch
    from click.testing import CliRunner

    from lorawatch.cli import main

    saved = (os.getcwd(), dict(os.environ), signal.getsignal(signal.SIGTERM), warnings.formatwarning,
             torch.get_num_threads(), torch.get_rng_state(), random.getstate(), np.random.get_state(), sys.argv)
    returncode = 0
    with CliRunner().isolation() as (stdout, stderr, _), warnings.catch_warnings():
        # warnings as a fresh interpreter shows them (pytest records them, and shows deprecations always)
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = _show_warning
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["lorawatch", *map(str, args)]
        try:
            main()
        except SystemExit as end:
            if isinstance(end.code, str):
                sys.stderr.write(end.code + "\n")
            returncode = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
        except Exception:  # a bug: as the interpreter would print it
            sys.stderr.write(traceback.format_exc())
            returncode = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.chdir(saved[0])
            os.environ.clear()
            os.environ.update(saved[1])
            signal.signal(signal.SIGTERM, saved[2])
            warnings.formatwarning = saved[3]
            torch.set_num_threads(saved[4])
            torch.set_rng_state(saved[5])
            random.setstate(saved[6])
            np.random.set_state(saved[7])
            sys.argv = saved[8]
        return CliResult(returncode, stdout.getvalue().decode(), stderr.getvalue().decode())


def config_file(tmp_path, model_dir, **changes):
    write_task_files(tmp_path / "data")
    config = {
        "name": "tiny",
        "model": {"spec": str(model_dir), "device": "cpu", "dtype": "float32"},
        "tasks": [{"name": "stance", "kind": "multiple_choice", "train": "data/mc_train.json",
                   "test": "data/mc_test.json"},
                  {"name": "sum", "kind": "numeric", "train": "data/num_train.jsonl", "test": "data/num_test.json"}],
        "reference": {"path": "data/reference.json"},
        "train": {"learning_rate": 5e-3, "batch_size": 2, "grad_accum": 2},
        "eval": {"max_new_tokens": 4},
    }
    for key, value in changes.items():
        config[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


RESULT_FILES = ["accuracy_matrix.csv", "cl_metrics.json", "stability.csv", "statistics.json"]
STAGE_FILES = ["scores.json", "reference_stats.json", "reference_drift.jsonl", "predictions/stance.jsonl",
               "predictions/sum.jsonl", "predictions/reference.jsonl", "adapter/adapter_model.safetensors"]


def assert_same_results(run, reference, seed=1):
    """Two run folders of the tiny two-task config hold the same results (adapters compared by value)."""
    import filecmp

    from lorawatch.rundir.layout import RunFolder

    for name in RESULT_FILES:
        assert filecmp.cmp(RunFolder(run).seed(seed).path / name, RunFolder(reference).seed(seed).path / name,
                           shallow=False), name
    for stage in range(3):
        for name in STAGE_FILES:
            if stage == 0 and name.startswith("adapter"):
                continue
            mine = RunFolder(run).stage(seed, stage).path / name
            theirs = RunFolder(reference).stage(seed, stage).path / name
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                a, b = load_file(mine), load_file(theirs)
                assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), mine
            else:
                assert mine.read_text() == theirs.read_text(), mine
    assert not list(run.rglob("*.tmp"))
