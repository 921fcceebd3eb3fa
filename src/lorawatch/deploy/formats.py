"""The GGUF types lorawatch can make with llama.cpp, by the names `--quant`, `--formats` and the config's
`deploy.formats` take. Kept apart from gguf.py (which needs torch and llama.cpp) so that the config can check a
name without importing either."""

from __future__ import annotations

# names -> llama.cpp's file type (llama_ftype) names
QUANTS = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K",
          "q5_k_m": "MOSTLY_Q5_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
          "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1",
          "q3_k_m": "MOSTLY_Q3_K_M", "q2_k": "MOSTLY_Q2_K"}
# What the deployed-form evaluation measures when nothing is asked: the same precision at half the bytes, the
# 8-bit type, and the 4-bit type llama.cpp's users ship most.
DEFAULT_FORMATS = ("f16", "q8_0", "q4_k_m")


def unknown_format(names: list[str]) -> str | None:
    """Why `names` is not a list of GGUF types (a sentence), or None when it is one."""
    if not names:
        return "no type given"
    unknown = [n for n in names if n not in QUANTS]
    if unknown:
        return f"unknown type {unknown[0]!r}; known: {', '.join(QUANTS)}"
    if len(set(names)) < len(names):
        return f"{next(n for n in names if names.count(n) > 1)!r} is named twice"
    return None


def split_formats(text: str) -> list[str]:
    """'f16, Q8_0' -> ['f16', 'q8_0'] (unchecked)."""
    return [q.strip().lower() for q in text.split(",") if q.strip()]
