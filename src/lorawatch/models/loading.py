"""Resolve a model spec to a model and tokenizer, fully offline when it has to be.

A spec is one of:

* a packaged alias (``PACKAGED_MODELS``): a GGUF file shipped inside a pip package;
* a local folder holding a saved Hugging Face model (config.json, weights, tokenizer files);
* a path to a ``.gguf`` file;
* a Hugging Face hub id ``org/name`` (loaded from the local HF cache, or the hub if it can be reached).

GGUF files (packaged or not) are dequantised and converted ONCE into a normal Hugging Face folder
(``save_pretrained``, safetensors) under the model cache, keyed by the file's name and SHA-256, and
loaded from there afterwards. A cache entry only counts once its completion marker exists; entries are
built in a temporary sibling folder and renamed into place, so an interrupted conversion is never
trusted later.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from lorawatch.errors import ConfigError, ModelSpecError

from lorawatch.models.cache import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    PackagedModel,
    _alias_entry,
    _gguf_entry,
    default_cache_dir,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "LoadedModel",
    "ModelInfo",
    "PackagedModel",
    "default_cache_dir",
    "dtype_name",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
]


# --------------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class ModelInfo:
    spec: str  # what the user asked for
    source: str  # "alias" | "folder" | "gguf" | "hub"
    path: str  # the folder actually loaded (cache folder for GGUF), or the hub id
    device: str  # resolved, e.g. "cpu"
    dtype: str  # resolved, e.g. "bfloat16"
    num_parameters: int
    vocab_size: int  # rows of the input embedding matrix
    has_chat_template: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel  # on device, in dtype, eval mode
    tokenizer: transformers.PreTrainedTokenizerBase
    info: ModelInfo


# --------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' if available, else 'mps' if available, else 'cpu'. Explicit devices are checked."""
    name = str(device).strip().lower()
    cuda_ok = torch.cuda.is_available()
    mps_ok = _mps_available()
    if name == "auto":
        return "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
    if name == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not cuda_ok:
            raise ConfigError(
                f"model.device: {device!r} was requested but CUDA is not available here "
                f"(torch {torch.__version__}); use 'auto' or 'cpu'"
            )
        if match.group(1) is not None:
            index, count = int(match.group(1)), torch.cuda.device_count()
            if index >= count:
                raise ConfigError(
                    f"model.device: {device!r} does not exist; {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})"
                )
        return name
    if name == "mps":
        if not mps_ok:
            raise ConfigError("model.device: 'mps' was requested but MPS is not available here; use 'auto' or 'cpu'")
        return "mps"
    raise ConfigError(f"model.device: invalid device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_auto_dtype() -> torch.dtype:
    # fp32 on every CPU. Without native bf16 (the project's 2-core Xeon, torch 2.13, SmolLM2-135M) bf16 is 2-3x
    # slower: batch 16 x 115 tokens forward 2.4 s fp32 vs 8.3 s bf16. With it (2-core AMD EPYC, AVX512_BF16),
    # `bench/run.py W0 --dtypes float32,bfloat16` in one invocation: training 26.1 s bf16 vs 33.5 s fp32, but the
    # whole run 186.7 s vs 173.9 s, since evaluation is slower (the adapter cannot be merged into bf16 weights, and
    # 1.7x the decode steps: fewer drafts held). bf16 on a CPU
    # is there for those who ask for it (model.dtype: bfloat16).
    return torch.float32


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Resolve a dtype name for a resolved device ('cpu', 'cuda', 'cuda:N', 'mps')."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    name = str(dtype).strip().lower()
    if name == "auto":
        dev = str(device).lower()
        if dev.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if dev == "mps":
            return torch.float32
        return cpu_auto_dtype()
    if name in _DTYPES:
        return _DTYPES[name]
    raise ConfigError(
        f"model.dtype: invalid dtype {dtype!r}; accepted: auto, float32 (fp32), bfloat16 (bf16), float16 (fp16)"
    )


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Spec resolution

_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def _aliases() -> str:
    return ", ".join(PACKAGED_MODELS)


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~", "\\"))
        or spec.lower().endswith(".gguf")
        or spec.count("/") > 1
        or "\\" in spec
        or (len(spec) > 1 and spec[1] == ":")  # C:\...
    )


def _is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.fullmatch(spec)) and "--" not in spec and ".." not in spec


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; to use a GGUF file, pass its path (e.g. {folder / ggufs[0]})" if ggufs else ""
        raise ModelSpecError(f"model folder {folder} has no config.json, so it is not a saved Hugging Face model{hint}")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ModelSpecError(
            f"model folder {folder} has no weights (expected model.safetensors or pytorch_model.bin, or a sharded index)"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelSpecError(
            f"model folder {folder} has no tokenizer files (expected tokenizer.json, tokenizer.model or "
            f"vocab.json + merges.txt); save them next to the model with tokenizer.save_pretrained({str(folder)!r})"
        )


def resolve_model_path(spec: str, cache_dir: Path | None = None) -> tuple[str, Path | str]:
    """Resolve a spec to (source, folder or hub id); converts GGUF files into the cache if needed.

    source is "alias", "folder" or "gguf" (with a local folder to load), or "hub" (with the hub id).
    """
    spec = str(spec).strip()
    if not spec:
        raise ModelSpecError(f"empty model spec; packaged aliases: {_aliases()}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if spec in PACKAGED_MODELS:
        return "alias", _alias_entry(spec, cache)

    path = Path(spec).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return "folder", path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", _gguf_entry(path, cache)
        raise ModelSpecError(
            f"model spec {spec!r} is a file but not a .gguf file; pass a .gguf file, a model folder, a hub id, "
            f"or a packaged alias ({_aliases()})"
        )
    if _looks_like_path(spec):
        raise ModelSpecError(f"no such file or folder: {path} (model spec {spec!r})")
    if _is_hub_id(spec):
        return "hub", spec
    close = [alias for alias in PACKAGED_MODELS if spec.lower() in alias or alias in spec.lower()]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ModelSpecError(
        f"unknown model spec {spec!r}{hint}: not a packaged alias ({_aliases()}), an existing folder or .gguf "
        f"file, or a Hugging Face hub id of the form org/name"
    )


# --------------------------------------------------------------------------------------------------
# Loading


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint.

    Without it a missing hub costs ~23 s per file (huggingface_hub retries 5 times with backoff
    1+2+4+8+8 s): measured 23 s for the config and 46 s for the tokenizer on this offline machine.
    Behind a proxy the probe says nothing, so it is skipped (assume reachable).
    """
    try:
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):
            return False
        endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    except ImportError:
        endpoint = "https://huggingface.co"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_error(spec: str, reason: str) -> ModelSpecError:
    reason = " ".join(reason.split())
    return ModelSpecError(
        f"model spec {spec!r} is not a packaged alias ({_aliases()}), a local folder or a .gguf file, "
        f"and it could not be loaded as a Hugging Face hub id: {reason}"
    )


def _from_pretrained(where: str, dtype: torch.dtype, trust_remote_code: bool, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    if kwargs.get("local_files_only"):
        # transformers 5.x does not forward local_files_only to its PEFT adapter lookup, which then
        # retries the hub for ~23 s; pass it explicitly.
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    return model, tokenizer


def _load_hub(spec: str, dtype: torch.dtype, trust_remote_code: bool):
    try:  # in the local HF cache already: no network at all
        return _from_pretrained(spec, dtype, trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise _hub_error(spec, "the hub could not be reached and the model is not in the local Hugging Face cache")
    try:
        return _from_pretrained(spec, dtype, trust_remote_code)
    except (OSError, ValueError) as error:
        text = str(error).strip()
        raise _hub_error(spec, text.splitlines()[0] if text else type(error).__name__) from error


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    has_safetensors = any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
    kwargs = {"use_safetensors": True} if has_safetensors else {}
    try:
        return _from_pretrained(str(folder), dtype, trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError, StrictDataclassError) as error:
        # a half-copied weights file, a config field of the wrong type: the folder's problem, named in one line
        text = str(error).strip()
        raise ModelSpecError(
            f"cannot load the model in {folder}: {' '.join(text.split())[:300] if text else type(error).__name__}"
        ) from error


def _prepare_tokenizer(tokenizer, model) -> None:
    if tokenizer.pad_token is None:
        # Pad with EOS when the tokenizer has no pad token. Safe here: every caller masks padding with
        # the attention mask and builds its own labels (-100 outside the target span), so the pad id is
        # never trained on nor attended to; reusing EOS avoids adding a token and resizing embeddings.
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif getattr(tokenizer, "unk_token", None) is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ModelSpecError("the tokenizer has no pad, eos or unk token to pad batches with")
    tokenizer.padding_side = "left"  # decoder-only: generation continues from the right end
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a model and tokenizer from a spec, on `device`, in `dtype`, in eval mode."""
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    source, where = resolve_model_path(spec, cache_dir)
    if source == "hub":
        model, tokenizer = _load_hub(str(where), torch_dtype, trust_remote_code)
    else:
        model, tokenizer = _load_folder(Path(where), torch_dtype, trust_remote_code)
    # Device only: from_pretrained(dtype=...) already cast the weights, while keeping float32 where
    # the model wants it (RoPE inv_freq buffers); model.to(dtype=bf16) would downcast those too.
    model = model.to(resolved_device)
    model.eval()
    _prepare_tokenizer(tokenizer, model)
    info = ModelInfo(
        spec=str(spec),
        source=source,
        path=str(where),
        device=resolved_device,
        dtype=dtype_name(torch_dtype),
        num_parameters=int(model.num_parameters()),
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
