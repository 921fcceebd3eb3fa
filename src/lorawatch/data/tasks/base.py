"""What a task is: a name, a kind, an instruction, and train/test examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["multiple_choice", "numeric"]
TASK_KINDS: tuple[str, ...] = ("multiple_choice", "numeric")

# The paper's instructions, as its published implementation words them; used when a task does not bring its own.
MULTIPLE_CHOICE_INSTRUCTION = 'Please show your choice in the answer field with only the choice letter, e.g., "C"'
NUMERIC_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_INSTRUCTIONS: dict[str, str] = {
    "multiple_choice": MULTIPLE_CHOICE_INSTRUCTION,
    "numeric": NUMERIC_INSTRUCTION,
}


@dataclass(frozen=True)
class Example:
    """One row: `id` is stable across runs (`<task>/<split>/<row index>` unless the file gives one)."""

    id: str
    prompt: str
    answer: str
    # The task a row belongs to; set for reference rows, which mix tasks.
    task: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    kind: TaskKind
    instruction: str
    train: tuple[Example, ...] = field(default=())
    test: tuple[Example, ...] = field(default=())


def task_key(name: str) -> str:
    """A task name as reference rows may spell it: case and punctuation ignored ("NumGLUE-cm" = "numglue_cm")."""
    return "".join(ch for ch in name.lower() if ch.isalnum())
