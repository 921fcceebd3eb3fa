"""GGUF files of a merged Hugging Face folder, made and checked by llama.cpp itself.

The route, and why: llama.cpp's own converter (convert_hf_to_gguf.py with its `conversion/` package) writes one
unquantized GGUF (f32), then llama.cpp's quantizer (`llama_model_quantize`, called through llama-cpp-python's
low-level API) writes each requested type from it, and llama.cpp's runtime (`llama_cpp.Llama`) loads each file to
be checked against the PyTorch checkpoint. Converter, quantizer and runtime then come from the same llama.cpp
commit: the one vendored in the installed llama-cpp-python. A converter of lorawatch's own (writing tensors with
the `gguf` package) would have to follow llama.cpp's tensor layouts and tokenizer metadata for every family by hand;
a converter of another version can write what this runtime reads differently (llama.cpp #7062).

The converter is not in llama-cpp-python's wheel, only in its source distribution, which `make` downloads to build
the wheel: it extracts the converter from the same archive into `<venv>/share/lorawatch/llama.cpp/` (or set
LORAWATCH_LLAMA_CPP_CONVERT to a llama.cpp checkout of the same version). It runs in a subprocess, so its logging
and module state stay out of lorawatch's process.

One addition to the converter: llama.cpp recognises a BPE tokenizer's pre-tokenizer by hashing how it splits a fixed
text, which only works for published tokenizers. A tokenizer whose pre-tokenizer is exactly GPT-2's byte-level
split (tokenizer.json: ByteLevel with its regex, nothing else), but whose hash is unknown, as a tokenizer trained for a
test is, is written as llama.cpp's "gpt-2" pre-tokenizer, which is that split. Any other unknown one is refused as
llama.cpp refuses it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import torch

from lorawatch.data.prompts import EncodedPrompt
from lorawatch.deploy.formats import QUANTS, split_formats, unknown_format
from lorawatch.errors import UserError

# The model types whose conversion and runtime llama.cpp supports and lorawatch's tests cover or the paper uses.
FAMILIES = {"llama": "Llama / SmolLM2", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma-3",
            "gemma3_text": "Gemma-3"}
CONVERTER_ENV = "LORAWATCH_LLAMA_CPP_CONVERT"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"


def parse_quants(text: str) -> list[str]:
    names = list(dict.fromkeys(split_formats(text)))  # a repeat is harmless here
    problem = unknown_format(names)
    if problem:
        raise UserError(f"--quant: {problem}")
    return names


# llama.cpp's Gemma-3 does not read the layer types: every 6th layer is full attention, the others sliding
# (set_swa_pattern(6)), as in every published Gemma-3. Another pattern converts without a word and computes another
# model (seen on a 2-layer model: KL 4.5e-3 to the checkpoint, top-1 agreement 0%); it is refused instead.
GEMMA3_FULL_EVERY = 6


def check_family(config, spec: str) -> None:
    """The model's family is one llama.cpp converts and runs as transformers does: refused in one line if not."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"--format gguf: model {spec} is a {model_type!r} model; lorawatch exports GGUF for "
                        f"{', '.join(sorted(set(FAMILIES.values())))} ({', '.join(FAMILIES)})")
    layers = getattr(config, "layer_types", None)
    if model_type.startswith("gemma3") and layers is not None:
        expected = ["full_attention" if (i + 1) % GEMMA3_FULL_EVERY == 0 else "sliding_attention"
                    for i in range(len(layers))]
        if list(layers) != expected:
            raise UserError(f"--format gguf: model {spec} has Gemma-3 layer types {'/'.join(t[0] for t in layers)} "
                            "(s: sliding, f: full); llama.cpp runs every Gemma-3 as 5 sliding layers then 1 full")


def converter_folder() -> Path:
    """llama.cpp's converter of the installed llama-cpp-python's version (see the module's docstring)."""
    where = os.environ.get(CONVERTER_ENV)
    folder = Path(where) if where else Path(sys.prefix) / "share" / "lorawatch" / "llama.cpp"
    if not (folder / CONVERTER_SCRIPT).is_file() or not (folder / "conversion").is_dir():
        raise UserError(f"--format gguf needs llama.cpp's {CONVERTER_SCRIPT} and conversion/ in {folder} (`make "
                        f"deploy` puts them there from llama-cpp-python's source; or set {CONVERTER_ENV})")
    return folder


_quiet = None  # llama.cpp's log callback, kept alive as long as the process (ctypes would free it otherwise)


def llama_cpp_module():
    global _quiet
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError(f"--format gguf needs llama-cpp-python (`make deploy`, or pip install 'lorawatch[deploy]' "
                        f"with the CMAKE_ARGS of the Makefile): {exc}") from None
    if _quiet is None:  # the quantizer and the model loader log every tensor to stderr; lorawatch says what matters
        _quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
    return llama_cpp


# Run in a subprocess: the converter's main() with the pre-tokenizer fallback described above.
_RUNNER = r"""
import json, sys
from pathlib import Path
folder, hf_dir, out_file = sys.argv[1:4]
sys.path.insert(0, folder)
import conversion.base as base
import convert_hf_to_gguf

original = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((Path(hf_dir) / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
            return "gpt-2"
        raise

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out_file, "--outtype", "f32"]
convert_hf_to_gguf.main()
"""


def convert(hf_dir: Path, out_file: Path) -> None:
    """hf_dir -> one f32 GGUF file, by llama.cpp's converter."""
    folder = converter_folder()
    # The converter puts its own gguf-py (extracted beside it) ahead of the installed gguf unless NO_LOCAL_GGUF is set.
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(folder), str(hf_dir), str(out_file)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not out_file.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"llama.cpp's converter failed on {hf_dir}: {last}")


def quantize(source: Path, target: Path, quant: str) -> None:
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANTS[quant]}")
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"llama.cpp could not quantize {source.name} to {quant}")


def gguf_logits(path: Path, prompts: list[EncodedPrompt]) -> torch.Tensor:
    """[rows, vocab] next-token logits at each prompt's answer position, computed by llama.cpp on the prompt's own
    token ids (the checkpoint's tokenization: what is compared is the model, not the two tokenizers)."""
    llama_cpp = llama_cpp_module()
    longest = max(len(p.input_ids) for p in prompts)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=longest + 8, n_batch=longest + 8, logits_all=True,
                          n_threads=torch.get_num_threads(), verbose=False)
    try:
        rows = []
        for prompt in prompts:
            llm.reset()
            llm.eval(list(prompt.input_ids))
            rows.append(torch.from_numpy(llm.scores[llm.n_tokens - 1].copy()))
        return torch.stack(rows)
    finally:
        llm.close()


def runtime_version() -> str:
    return llama_cpp_module().__version__


def write_gguf(hf_dir: Path, folder: Path, stem: str, quants: list[str]) -> dict[str, Path]:
    """Every requested type of the merged folder: quant -> file. The f32 intermediate is kept only when asked for."""
    folder.mkdir(parents=True, exist_ok=True)
    full = folder / f"{stem}-f32.gguf"
    convert(hf_dir, full)
    files = {}
    for quant in quants:
        if quant == "f32":
            files[quant] = full
            continue
        target = folder / f"{stem}-{quant}.gguf"
        quantize(full, target, quant)
        files[quant] = target
    if "f32" not in quants:
        full.unlink()
    return files

