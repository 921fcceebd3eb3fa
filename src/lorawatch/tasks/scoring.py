"""Answer normalisation and exact-match scoring.

The rules follow the paper's published evaluation (shared/paper/protocol.md): strip reasoning blocks, chat
end markers and markdown emphasis; multiple choice prefers an explicit marker, then a leading option letter,
then the last standalone letter; numeric takes the last number after a final-answer marker, else the last
number in the text. The same functions turn gold answers into training targets, so that what the model is
taught and what it is graded on cannot drift apart.
"""

from __future__ import annotations

import re

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_END_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>")
_EMPHASIS = re.compile(r"(\*\*|__|\*|`)")

LETTERS = "ABCDE"
_MC_MARKER = re.compile(
    r"(?:final\s+answer|the\s+answer\s+is|answer|option|choice)\s*(?:is)?\s*[:：]?\s*\(?([A-E])\b\)?",
    re.IGNORECASE,
)
_MC_LEADING = re.compile(r"^\s*\(?([A-E])(?:[\s.):,]|$)")
_MC_STANDALONE = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUM_MARKER = re.compile(r"(final\s+answer|the\s+answer\s+is|answer\s*[:：]|####)", re.IGNORECASE)


def clean_output(text: str) -> str:
    """Remove what is never part of an answer: reasoning blocks, end-of-turn markers, emphasis."""
    text = _THINK.sub(" ", text)
    for marker in _END_MARKERS:
        text = text.replace(marker, " ")
    return _EMPHASIS.sub("", text).strip()


def normalize_choice(text: str) -> str:
    """The option letter a text commits to, or "" when it names none."""
    text = clean_output(text)
    # The model's own explicit statement beats anything else it wrote (e.g. options it discussed).
    markers = _MC_MARKER.findall(text)
    if markers:
        return markers[-1].upper()
    leading = _MC_LEADING.match(text)
    if leading:
        return leading.group(1)
    standalone = _MC_STANDALONE.findall(text)
    return standalone[-1] if standalone else ""


def format_number(token: str) -> str | None:
    """Canonical text of a number ("1,234" -> "1234", "186.0" -> "186", "0.50" -> "0.5"), None if not one."""
    token = token.replace(",", "").strip()
    try:
        value = float(token)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    if value.is_integer():
        return str(int(value))
    return repr(value)


def normalize_number(text: str) -> str:
    """The final numeric answer in a text, canonically formatted, or "" when there is none."""
    text = clean_output(text)
    boxed = _BOXED.findall(text)
    if boxed:
        numbers = _NUMBER.findall(boxed[-1])
        if numbers:
            return format_number(numbers[-1]) or ""
    markers = list(_NUM_MARKER.finditer(text))
    if markers:
        numbers = _NUMBER.findall(text[markers[-1].end():])
        if numbers:
            return format_number(numbers[-1]) or ""
    numbers = _NUMBER.findall(text)
    return (format_number(numbers[-1]) or "") if numbers else ""


def normalize_prediction(kind: str, text: str) -> str:
    return normalize_choice(text) if kind == "multiple_choice" else normalize_number(text)


def gold_answer(kind: str, answer: str) -> str:
    """The gold label a prediction is compared with.

    Multiple choice: the leading letter of the first line (ScienceQA appends a rationale after a newline).
    Numeric: the canonical number, or the stripped text when the gold is not a number (the real NumGLUE-cm
    test set has a few such rows; they are kept, and only a matching text can score).
    """
    first_line = answer.strip().split("\n", 1)[0].strip()
    if kind == "multiple_choice":
        match = _MC_LEADING.match(first_line)
        return match.group(1) if match else first_line
    return format_number(first_line) or first_line


def is_correct(kind: str, prediction: str, gold: str) -> bool:
    return prediction != "" and prediction.casefold() == gold.casefold()


def training_target(kind: str, answer: str) -> str:
    """What the model is trained to say: the option letter alone, or the final number alone."""
    return gold_answer(kind, answer)
