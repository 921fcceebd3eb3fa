"""Built-in tasks (the `demo` preset), generated offline and deterministically.

Three small tasks, one of each kind the paper uses (TRACE's FOMC, ScienceQA and NumGLUE-cm), with
prompts in the same formats:

* ``stance`` (multiple choice, like FOMC): is a central-bank style sentence dovish, hawkish or neutral?
* ``science`` (multiple choice, like ScienceQA): elementary science/fact questions with 2-4 options;
  the answer is the letter, a newline and a one-sentence rationale.
* ``arithmetic`` (numeric, like NumGLUE-cm): one- or two-step word problems with small integers.

Each task has a fixed pool: a deterministic sequence of rows, unique by prompt text, generated from a
fixed seed with only the standard library (``random.Random.getrandbits``, on which every draw here is
built, gives the same bits on every platform and Python version). The pool is cut into fixed
regions -- test rows first, then reference rows, then train rows -- and a split of n rows is the
first n rows of its region. Asking for more train rows therefore never changes the test rows or the
reference, and no two splits ever share a prompt. Labels are balanced within each region by drawing
them in shuffled blocks, so every prefix of a region is balanced too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from lorawatch.errors import ConfigError
from lorawatch.data.tasks.base import Example, Task
from lorawatch.data.tasks.builtin_arithmetic import _arithmetic_region
from lorawatch.data.tasks.builtin_rng import Row, _Rng
from lorawatch.data.tasks.builtin_science import _science_region
from lorawatch.data.tasks.builtin_stance import _stance_region

__all__ = [
    "BUILTIN_TASKS",
    "BUILTIN_INSTRUCTIONS",
    "builtin_task",
    "builtin_reference",
    "max_rows",
]

BUILTIN_TASKS: tuple[str, ...] = ("stance", "science", "arithmetic")

_LETTER_INSTRUCTION = 'Answer with only the letter of the correct choice, e.g., "C".'
BUILTIN_INSTRUCTIONS: dict[str, str] = {
    "stance": _LETTER_INSTRUCTION,
    "science": _LETTER_INSTRUCTION,
    "arithmetic": "Answer with only the final number.",
}

BUILTIN_KINDS: dict[str, str] = {
    "stance": "multiple_choice",
    "science": "multiple_choice",
    "arithmetic": "numeric",
}

# Fixed seeds, one per task. Changing one changes every row of that task.
_SEEDS: dict[str, int] = {"stance": 20_250_101, "science": 20_250_202, "arithmetic": 20_250_303}

# The pool's regions, in generation order: (split, rows). Multiples of 12 keep the label blocks aligned.
_TEST_ROWS = 504
_REFERENCE_ROWS = 504
_TRAIN_ROWS = 2496
_REGIONS: tuple[tuple[str, int], ...] = (
    ("test", _TEST_ROWS),
    ("reference", _REFERENCE_ROWS),
    ("train", _TRAIN_ROWS),
)
_POOL_ROWS = _TEST_ROWS + _REFERENCE_ROWS + _TRAIN_ROWS


# --------------------------------------------------------------------------------------------------
# Pools and the public API.

_REGION_GENERATORS: dict[str, Callable[[_Rng, set[str], int], list[Row]]] = {
    "stance": _stance_region,
    "science": _science_region,
    "arithmetic": _arithmetic_region,
}


@lru_cache(maxsize=None)
def _pool(name: str) -> dict[str, tuple[Row, ...]]:
    """The task's whole pool, by region. Regions are generated in a fixed order from one seed."""
    rng = _Rng(_SEEDS[name])
    seen: set[str] = set()
    return {
        region: tuple(_REGION_GENERATORS[name](rng, seen, size)) for region, size in _REGIONS
    }


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BUILTIN_TASKS:
        raise ConfigError(f"unknown built-in task {name!r}; choose one of {', '.join(BUILTIN_TASKS)}")
    return name


def _check_size(name: str, field: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"built-in task {name!r}: {field} must be an integer, got {value!r}")
    if not 0 <= value <= limit:
        raise ConfigError(f"built-in task {name!r}: {field} must be between 0 and {limit}, got {value}")
    return value


def max_rows(name: str) -> int:
    """How many distinct rows the generator produces for a task: test + reference + train pools."""
    _check_name(name)
    return _POOL_ROWS


def builtin_task(name: str, n_train: int, n_test: int) -> Task:
    """The built-in task `name` with its first `n_train` train rows and first `n_test` test rows.

    At most 2496 train and 504 test rows. Test rows do not depend on `n_train`, nor train rows on
    `n_test`, and neither ever shares a prompt with the other or with `builtin_reference`.
    """
    _check_name(name)
    _check_size(name, "n_train", n_train, _TRAIN_ROWS)
    _check_size(name, "n_test", n_test, _TEST_ROWS)
    pool = _pool(name)

    def examples(split: str, n: int) -> tuple[Example, ...]:
        return tuple(
            Example(id=f"{name}/{split}/{i}", prompt=prompt, answer=answer)
            for i, (prompt, answer) in enumerate(pool[split][:n])
        )

    return Task(
        name=name,
        kind=BUILTIN_KINDS[name],  # type: ignore[arg-type]
        instruction=BUILTIN_INSTRUCTIONS[name],
        train=examples("train", n_train),
        test=examples("test", n_test),
    )


def builtin_reference(n_per_task: int, tasks: Sequence[str] = BUILTIN_TASKS) -> tuple[Example, ...]:
    """A mixed reference set: `n_per_task` rows of each named task, interleaved task by task.

    Each row has `task` set and an id ``reference/<task>/<i>``. The rows come from each task's
    reference region, so they never share a prompt with any train or test row of any size.
    At most 504 rows per task.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    names = [_check_name(name) for name in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"built-in reference: tasks must not repeat, got {', '.join(names)}")
    for name in names:
        _check_size(name, "reference rows per task", n_per_task, _REFERENCE_ROWS)
    rows = {name: _pool(name)["reference"] for name in names}
    return tuple(
        Example(id=f"reference/{name}/{i}", prompt=rows[name][i][0], answer=rows[name][i][1], task=name)
        for i in range(n_per_task)
        for name in names
    )
