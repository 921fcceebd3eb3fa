"""Load task examples from TRACE-style JSON (a list of {prompt, answer}) or JSONL files.

Every problem is reported as a DataError naming the file and the row (1-based), so a user can fix it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

from lorawatch.errors import DataError, file_problem
from lorawatch.data.tasks import builtin as builtin_tasks
from lorawatch.data.tasks.base import DEFAULT_INSTRUCTIONS, Example, Task, task_key
from lorawatch.data.tasks.scoring import LETTERS, format_number, gold_answer


def _read_rows(path: Path) -> list[object]:
    problem = file_problem(path, ".json or .jsonl file")
    if problem:
        raise DataError(path, problem)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text (bad byte at offset {exc.start})") from None
    if not text.strip():
        raise DataError(path, "file is empty; expected a JSON list of {prompt, answer} rows")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line, object_pairs_hook=_Row.from_pairs))
            except json.JSONDecodeError as exc:
                raise DataError(path, f"not valid JSON ({exc.msg})", row=number) from None
        return rows
    try:
        data = json.loads(text, object_pairs_hook=_Row.from_pairs)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of {{prompt, answer}} rows, found a {_json_type(data)}")
    return data


class _Row(dict):
    """A JSON object read from a data file, remembering a key given twice in it (the first such key)."""

    repeated: str | None = None

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> "_Row":
        row = cls(pairs)
        if len(row) < len(pairs):
            seen: set[str] = set()
            row.repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        return row


def _json_type(value: object) -> str:
    return "dict" if isinstance(value, dict) else type(value).__name__


def load_examples(path: str | Path, *, task: str, split: str, kind: str | None = None,
                  keep_task_field: bool = False) -> tuple[Example, ...]:
    """Read and validate one split. `kind`, when given, also checks each gold answer is scorable."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DataError(path, "contains no rows; expected a list of {prompt, answer} rows")
    examples = []
    word_golds: list[int] = []
    seen_ids: set[str] = set()
    for index, row in enumerate(rows):
        number = index + 1
        if not isinstance(row, dict):
            raise DataError(path, f"expected an object with 'prompt' and 'answer', found {_json_type(row)}", row=number)
        for key in ("prompt", "answer"):
            if key not in row:
                raise DataError(path, f"missing '{key}'", row=number)
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(path, "'prompt' must be a non-empty string", row=number)
        if isinstance(row, _Row) and row.repeated:
            raise DataError(path, f"key {row.repeated!r} is given twice in this row (JSON keeps the last silently)",
                            row=number)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(path, f"'answer' must be a string or a number, found {_json_type(answer)}", row=number)
        if isinstance(answer, float) and not math.isfinite(answer):
            raise DataError(path, f"'answer' is {answer!r} (JSON's NaN or Infinity), not a number to score against",
                            row=number)
        answer = str(answer)
        if not answer.strip():
            raise DataError(path, "'answer' is empty", row=number)
        if kind is not None and _check_gold(path, number, kind, answer, prompt):
            word_golds.append(number)
        example_id = str(row.get("id", f"{task}/{split}/{index}"))
        if example_id in seen_ids:
            raise DataError(path, f"duplicate id {example_id!r}", row=number)
        seen_ids.add(example_id)
        row_task = None
        if keep_task_field:
            row_task = row.get("task") or row.get("task_name") or row.get("task_id")
            row_task = str(row_task) if row_task is not None else None
        examples.append(Example(id=example_id, prompt=prompt, answer=answer, task=row_task))
    if word_golds:
        # Real data has a few of these (NumGLUE-cm: "Friday"): kept, with one line per file rather than per row.
        shown = ", ".join(map(str, word_golds[:5])) + (", ..." if len(word_golds) > 5 else "")
        warnings.warn(f"{path}: {len(word_golds)} numeric answer(s) are words, not numbers (rows {shown}); "
                      "a prediction without any number is compared with them as text", stacklevel=2)
    return tuple(examples)


_OPTION = re.compile(r"(?<![A-Za-z])([A-E])[.)]\s")


def prompt_options(prompt: str) -> str:
    """The option letters a prompt lists ("A. dovish, B. hawkish, C. neutral" -> "ABC"), or "" if unclear."""
    found = sorted(set(_OPTION.findall(prompt)))
    letters = "".join(found)
    # Only a run of letters from A counts as an option list; a stray "A." in a sentence does not.
    return letters if len(letters) >= 2 and LETTERS.startswith(letters) else ""


def _check_gold(path: Path, number: int, kind: str, answer: str, prompt: str = "") -> bool:
    """Refuse a gold answer that can never be scored; True for a numeric gold that is a word."""
    gold = gold_answer(kind, answer)
    if kind == "multiple_choice":
        if len(gold) != 1 or gold not in LETTERS:
            raise DataError(path, f"multiple-choice answer must start with an option letter A-E, found {answer[:30]!r}",
                            row=number)
        options = prompt_options(prompt)
        if options and gold not in options:
            raise DataError(path, f"answer {gold!r} is not one of the options {', '.join(options)} in the prompt",
                            row=number)
    return kind == "numeric" and format_number(gold) is None




def load_task(name: str, kind: str, instruction: str | None, *, builtin: str | None, train: str | None,
              test: str | None, max_train_rows: int | None, max_test_rows: int | None) -> Task:
    """A task's examples from its files (first rows up to the limits) or from the built-in generator."""
    if builtin is not None:
        generated = builtin_tasks.builtin_task(builtin, max_train_rows, max_test_rows)
        text = instruction if instruction is not None else builtin_tasks.BUILTIN_INSTRUCTIONS[builtin]
        return Task(name=name, kind=kind, instruction=text,
                    train=tuple(Example(f"{name}/train/{i}", e.prompt, e.answer) for i, e in enumerate(generated.train)),
                    test=tuple(Example(f"{name}/test/{i}", e.prompt, e.answer) for i, e in enumerate(generated.test)))
    train_rows = load_examples(train, task=name, split="train", kind=kind)[:max_train_rows]
    test_rows = load_examples(test, task=name, split="test", kind=kind)[:max_test_rows]
    text = instruction if instruction is not None else DEFAULT_INSTRUCTIONS[kind]
    return Task(name=name, kind=kind, instruction=text, train=train_rows, test=test_rows)


def load_reference(tasks: list[Task], *, path: str | None, builtin_per_task: int | None,
                   builtin_names: dict[str, str], max_rows: int | None) -> tuple[Example, ...]:
    """Reference rows, each tagged with the name of the configured task whose kind and instruction it uses.

    `builtin_names` maps a built-in generator name to the configured task that uses it.
    """
    if builtin_per_task is not None:
        rows = builtin_tasks.builtin_reference(builtin_per_task, tasks=tuple(builtin_names))
        rows = tuple(Example(e.id, e.prompt, e.answer, task=builtin_names[e.task]) for e in rows)
        return rows[:max_rows]
    by_key = {task_key(t.name): t for t in tasks}
    loaded = load_examples(path, task="reference", split="reference", keep_task_field=True)[:max_rows]
    rows = []
    for number, example in enumerate(loaded, start=1):
        task = by_key.get(task_key(example.task or ""))
        if task is None:
            names = ", ".join(t.name for t in tasks)
            found = f"task {example.task!r}" if example.task else "no 'task' (or 'task_name') field"
            raise DataError(path, f"{found}; each reference row must name one of the tasks: {names}", row=number)
        _check_gold(Path(path), number, task.kind, example.answer, example.prompt)
        rows.append(Example(example.id, example.prompt, example.answer, task=task.name))
    return tuple(rows)
