"""The built-in `arithmetic` task (like NumGLUE-cm): one- or two-step word problems with small integers."""

from __future__ import annotations

from functools import partial

from lorawatch.data.tasks.builtin_rng import Row, _capitalize, _Cycle, _Rng, _unique


# --------------------------------------------------------------------------------------------------
# arithmetic: like TRACE NumGLUE-cm. Small integers, integer non-negative answers.

_ARITHMETIC_PROMPT = "Solve the following math problem.\nQuestion:\n{problem}\nAnswer:"

_NAMES = (
    ("Maya", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Sofia", "she"),
    ("Ethan", "he"), ("Zoe", "she"), ("Lucas", "he"), ("Emma", "she"), ("Omar", "he"),
    ("Priya", "she"), ("Diego", "he"), ("Hana", "she"), ("Kofi", "he"), ("Lena", "she"),
    ("Sam", "he"), ("Nora", "she"), ("Ben", "he"), ("Aisha", "she"), ("Jack", "he"),
)  # fmt: skip
_OBJECTS = (
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "balloons", "cards",
    "shells", "crayons", "buttons", "cupcakes", "toy cars", "oranges", "beads", "postcards",
    "seeds", "flowers", "candies",
)  # fmt: skip
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets"))
_GROUPS = (
    # (plural group, singular member, verb for one, verb for many)
    ("children at a party", "child", "gets", "get"),
    ("students in a class", "student", "brings", "bring"),
    ("players on a team", "player", "has", "have"),
    ("friends on a trip", "friend", "packs", "pack"),
)


def _problem(rng: _Rng, template: int) -> tuple[str, int]:
    (name, pronoun), (other, _), (third, _) = rng.sample(_NAMES, 3)
    she = _capitalize(pronoun)
    things = rng.choice(_OBJECTS)
    box, boxes = rng.choice(_CONTAINERS)
    if template == 0:  # add
        a, b = rng.between(3, 60), rng.between(2, 40)
        return (
            f"{name} has {a} {things}. {she} gets {b} more {things} from {other}. "
            f"How many {things} does {name} have now?"
        ), a + b
    if template == 1:  # subtract
        a = rng.between(10, 90)
        b = rng.between(1, a - 1)
        return (
            f"{name} had {a} {things}. {she} gave {b} of them to {other}. "
            f"How many {things} does {name} have left?"
        ), a - b
    if template == 2:  # multiply
        a, b = rng.between(2, 12), rng.between(2, 12)
        return (
            f"{name} has {a} {boxes}. Each {box} holds {b} {things}. "
            f"How many {things} does {name} have in total?"
        ), a * b
    if template == 3:  # each ... in total
        group, member, verb_one, verb_many = rng.choice(_GROUPS)
        a, b = rng.between(2, 30), rng.between(2, 9)
        return (
            f"There are {a} {group}. Each {member} {verb_one} {b} {things}. "
            f"How many {things} do the {group.split()[0]} {verb_many} in total?"
        ), a * b
    if template == 4:  # add + multiply
        a, b, c = rng.between(2, 40), rng.between(2, 9), rng.between(2, 12)
        return (
            f"{name} has {a} {things}. {she} buys {b} {boxes} with {c} {things} in each {box}. "
            f"How many {things} does {name} have now?"
        ), a + b * c
    if template == 5:  # subtract + add
        a = rng.between(10, 80)
        b, c = rng.between(1, a - 1), rng.between(2, 40)
        return (
            f"{name} had {a} {things}. {she} gave away {b} and then found {c} more. "
            f"How many {things} does {name} have now?"
        ), a - b + c
    if template == 6:  # multiply - subtract
        a, b = rng.between(2, 10), rng.between(3, 12)
        c = rng.between(1, a * b - 1)
        return (
            f"{name} buys {a} {boxes} of {things} with {b} {things} in each {box}. "
            f"{she} gives {c} {things} to {other}. How many {things} does {name} have left?"
        ), a * b - c
    if template == 7:  # share equally
        b, each = rng.between(2, 9), rng.between(2, 12)
        return (
            f"{name} has {b * each} {things} and shares them equally among {b} friends. "
            f"How many {things} does each friend get?"
        ), each
    if template == 8:  # compare
        a = rng.between(5, 90)
        b = rng.between(1, a - 1)
        return (
            f"{name} has {a} {things} and {other} has {b} {things}. "
            f"How many more {things} does {name} have than {other}?"
        ), a - b
    # template 9: three addends
    a, b, c = rng.between(2, 40), rng.between(2, 40), rng.between(2, 40)
    return (
        f"{name} has {a} {things}, {other} has {b} {things}, and {third} has {c} {things}. "
        f"How many {things} do they have altogether?"
    ), a + b + c


_ARITHMETIC_TEMPLATES = 10


def _arithmetic_row(rng: _Rng, template: int) -> Row:
    problem, answer = _problem(rng, template)
    if answer < 0:
        raise RuntimeError(f"built-in arithmetic problem with a negative answer: {problem}")
    return _ARITHMETIC_PROMPT.format(problem=problem), str(answer)


def _arithmetic_region(rng: _Rng, seen: set[str], size: int) -> list[Row]:
    templates = _Cycle(rng, range(_ARITHMETIC_TEMPLATES))
    rows = []
    for _ in range(size):
        template = templates.next()
        rows.append(_unique(seen, partial(_arithmetic_row, rng, template), f"arithmetic/{template}"))
    return rows
