"""Answer normalisation and exact-match scoring.

The rules follow the paper's published evaluation code (the authors' implementation): strip reasoning blocks, chat
end markers and markdown emphasis; multiple choice prefers an explicit marker (tried kind by kind in the
published priority order), then a leading option letter (either case), then the last standalone letter;
numeric takes the last number after a final-answer marker, else the last number in the text, else the last
line upper-cased (so that a word gold can match). The same functions turn gold answers into training targets, so that what the model is
taught and what it is graded on cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from pydantic import StrictBool, StrictInt, StrictStr

# Bumped whenever a rule below changes what a text scores: cached base-stage results record it.
SCORING_RULES_VERSION = 2

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_END_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>")
_EMPHASIS = re.compile(r"(\*\*|__|\*|`)")

LETTERS = "ABCDE"
# Explicit answer markers in the published priority order: the first kind that matches anywhere in the text
# decides (its first occurrence), so "final answer: C" beats an earlier "answer: B" and an "option D" discussed
# after "the answer is A" does not override it. Letters are read case-insensitively.
_MC_MARKERS = tuple(re.compile(pattern + r"\s*\(?([A-E])\b", re.IGNORECASE) for pattern in (
    r"final\s+answer\s*[:：\-]",
    r"answer\s*[:：\-]",
    r"the\s+answer\s+is",
    r"option",
    r"choice",
))
_MC_LEADING = re.compile(r"^\s*\(?([A-E])(?:[\s.):,]|$)", re.IGNORECASE)
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
    for marker in _MC_MARKERS:
        found = marker.search(text)
        if found:
            return found.group(1).upper()
    leading = _MC_LEADING.match(text)
    if leading:
        return leading.group(1).upper()
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
    """The final numeric answer in a text, canonically formatted.

    With no number at all, the text's last line upper-cased, as the published code does: a word gold such as
    NumGLUE-cm's "Friday" can then match an answer that is that word alone. "" for an empty text."""
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
    if numbers:
        return format_number(numbers[-1]) or ""
    lines = text.splitlines()
    return lines[-1].strip().upper() if lines else ""


def normalize_prediction(kind: str, text: str) -> str:
    return normalize_choice(text) if kind == "multiple_choice" else normalize_number(text)


def gold_answer(kind: str, answer: str) -> str:
    """The gold label a prediction is compared with.

    Multiple choice: the leading letter of the first line (ScienceQA appends a rationale after a newline).
    Numeric: the canonical number, or the stripped text when the gold is not a number (the real NumGLUE-cm
    test set has a few such rows; they are kept, and a prediction with no number is compared with them as text).
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


# --- a prediction, scored -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    # Strict types: a row read back with `"correct": "yes"` or a numeric id is damage, not a coerced value.
    id: StrictStr
    task: StrictStr
    raw_output: StrictStr
    prediction: StrictStr
    gold: StrictStr
    correct: StrictBool
    output_ids: list[StrictInt] | None = None  # the generated tokens; also the next checkpoint's draft

    def to_dict(self) -> dict:
        return {"id": self.id, "task": self.task, "raw_output": self.raw_output, "prediction": self.prediction,
                "gold": self.gold, "correct": self.correct, "output_ids": self.output_ids}


def score(example_id: str, task: str, kind: str, answer: str, raw_output: str,
          output_ids: Sequence[int] | None = None) -> Prediction:
    prediction = normalize_prediction(kind, raw_output)
    gold = gold_answer(kind, answer)
    return Prediction(example_id, task, raw_output, prediction, gold, is_correct(kind, prediction, gold),
                      None if output_ids is None else list(output_ids))


def accuracy(predictions: Sequence[Prediction]) -> float:
    return sum(p.correct for p in predictions) / len(predictions) if predictions else float("nan")
