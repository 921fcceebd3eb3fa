"""GGUF files: reading the header, and dequantising the weights into a Hugging Face folder (transformers does the
dequantisation; this module feeds it the file and saves the result as safetensors)."""

from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path

import torch

from lorawatch.errors import ModelSpecError

log = logging.getLogger("lorawatch.models")


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
