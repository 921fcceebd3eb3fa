"""The built-in tasks (the `demo` preset): deterministic, disjoint, balanced and correctly labelled."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lorawatch.errors import ConfigError
from lorawatch.data.tasks import builtin
from lorawatch.data.tasks.base import Example, Task
from lorawatch.data.tasks.builtin import BUILTIN_INSTRUCTIONS, BUILTIN_TASKS, builtin_reference, builtin_task, max_rows

# The largest split sizes the generator supports (private, but the tests pin them down).
MAX_TRAIN = builtin._TRAIN_ROWS
MAX_TEST = builtin._TEST_ROWS
MAX_REFERENCE = builtin._REFERENCE_ROWS

# sha256 of the first 50 test, train and reference rows of each task, computed once (identical on
# CPython 3.10-3.13 and under any PYTHONHASHSEED). A change here means the generator changed: every
# published demo number changes with it, so only update these on purpose.
GOLDEN = {
    "stance": "70a0a8188efcb10666e8047eaabc5e06e132ee7ebd7fc3b98e75639674b550d7",
    "science": "7ad59bc152f693c34a148262dc0ae22f3bd7774bde79872d50f9a500b138ca21",
    "arithmetic": "2f73ec5bf6f0039b8f1dfbca2fee5fc03062ce15ec8942e9404a75e181d5bc16",
}

STANCE_PREFIX = (
    "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral. "
    "Choose one from A, B and C.\nText:\n"
)
SCIENCE_PREFIX = "Choose an answer for the following question and give your reasons.\n\nQuestion:\n"
ARITHMETIC_PREFIX = "Solve the following math problem.\nQuestion:\n"


def _digest(rows) -> str:
    text = "\x1e".join(f"{row.prompt}\x1f{row.answer}" for row in rows)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _golden_rows(name: str) -> tuple[Example, ...]:
    task = builtin_task(name, 50, 50)
    return task.test + task.train + builtin_reference(50, (name,))


@pytest.fixture(scope="module")
def full() -> dict[str, Task]:
    return {name: builtin_task(name, MAX_TRAIN, MAX_TEST) for name in BUILTIN_TASKS}


@pytest.fixture(scope="module")
def reference() -> tuple[Example, ...]:
    return builtin_reference(MAX_REFERENCE)


def _science_parts(prompt: str) -> tuple[str, dict[str, str]]:
    """(question, {letter: option text}) of a science prompt."""
    match = re.fullmatch(
        re.escape(SCIENCE_PREFIX) + r"(?P<q>.+)\n\nChoices:\n(?P<c>(?:[A-D]\. .+\n?)+)\n\nAnswer:",
        prompt,
        flags=re.DOTALL,
    )
    assert match, prompt
    options = {}
    for line in match["c"].split("\n"):
        letter, text = line.split(". ", 1)
        options[letter] = text
    assert list(options) == list("ABCD"[: len(options)]), prompt
    return match["q"], options


# ----------------------------------------------------------------------------------------- the API


def test_api_shape():
    assert BUILTIN_TASKS == ("stance", "science", "arithmetic")
    assert set(BUILTIN_INSTRUCTIONS) == set(BUILTIN_TASKS)
    assert all(isinstance(text, str) and text for text in BUILTIN_INSTRUCTIONS.values())
    kinds = {name: builtin_task(name, 1, 1).kind for name in BUILTIN_TASKS}
    assert kinds == {"stance": "multiple_choice", "science": "multiple_choice", "arithmetic": "numeric"}
    for name in BUILTIN_TASKS:
        task = builtin_task(name, 3, 2)
        assert isinstance(task, Task)
        assert task.name == name
        assert task.instruction == BUILTIN_INSTRUCTIONS[name]
        assert [e.id for e in task.train] == [f"{name}/train/{i}" for i in range(3)]
        assert [e.id for e in task.test] == [f"{name}/test/{i}" for i in range(2)]


def test_max_rows_and_limits():
    for name in BUILTIN_TASKS:
        assert max_rows(name) >= 2000
        assert max_rows(name) == MAX_TRAIN + MAX_TEST + MAX_REFERENCE
    assert MAX_TRAIN >= 1000 and MAX_TEST >= 200 and MAX_REFERENCE >= 200


def test_full_sizes(full, reference):
    for name, task in full.items():
        assert len(task.train) == MAX_TRAIN
        assert len(task.test) == MAX_TEST
    assert len(reference) == MAX_REFERENCE * len(BUILTIN_TASKS)


def test_zero_rows():
    for name in BUILTIN_TASKS:
        task = builtin_task(name, 0, 0)
        assert task.train == () and task.test == ()
    assert builtin_reference(0) == ()


# ----------------------------------------------------------------------------------- determinism


def test_two_calls_are_equal():
    for name in BUILTIN_TASKS:
        assert builtin_task(name, 40, 30) == builtin_task(name, 40, 30)
    assert builtin_reference(20) == builtin_reference(20)


def test_golden_digests():
    assert {name: _digest(_golden_rows(name)) for name in BUILTIN_TASKS} == GOLDEN


def test_same_rows_in_a_fresh_process_with_another_hash_seed():
    # Nothing may depend on set or dict-of-str ordering, which PYTHONHASHSEED changes.
    code = (
        "import hashlib\n"
        "from lorawatch.data.tasks.builtin import BUILTIN_TASKS, builtin_task, builtin_reference\n"
        "for name in BUILTIN_TASKS:\n"
        "    t = builtin_task(name, 50, 50)\n"
        "    rows = t.test + t.train + builtin_reference(50, (name,))\n"
        "    text = '\\x1e'.join(f'{r.prompt}\\x1f{r.answer}' for r in rows)\n"
        "    print(name, hashlib.sha256(text.encode('utf-8')).hexdigest())\n"
    )
    src = str(Path(builtin.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=src)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert dict(line.split() for line in out.stdout.splitlines()) == GOLDEN


# ------------------------------------------------------------------------ disjointness, stability


def test_rows_are_unique_and_splits_disjoint(full, reference):
    for name, task in full.items():
        train = [e.prompt for e in task.train]
        test = [e.prompt for e in task.test]
        ref = [e.prompt for e in reference if e.task == name]
        assert len(set(train)) == len(train)
        assert len(set(test)) == len(test)
        assert len(set(ref)) == len(ref) == MAX_REFERENCE
        assert not set(train) & set(test)
        assert not set(train) & set(ref)
        assert not set(test) & set(ref)
    all_prompts = [e.prompt for task in full.values() for e in task.train + task.test]
    all_prompts += [e.prompt for e in reference]
    assert len(set(all_prompts)) == len(all_prompts) == sum(max_rows(n) for n in BUILTIN_TASKS)


def test_slices_are_stable(full):
    for name in BUILTIN_TASKS:
        small = builtin_task(name, 10, 40)
        bigger = builtin_task(name, 300, 40)
        assert small.test == bigger.test == full[name].test[:40]
        assert small.train == bigger.train[:10]
        assert bigger.train == full[name].train[:300]
        # More test rows do not change the train rows either.
        assert builtin_task(name, 10, 5).train == small.train
    first_20 = tuple(e for e in builtin_reference(50) if int(e.id.rsplit("/", 1)[1]) < 20)
    assert builtin_reference(20) == first_20


def test_reference_rows():
    rows = builtin_reference(4)
    assert [e.task for e in rows] == list(BUILTIN_TASKS) * 4
    assert [e.id for e in rows] == [f"reference/{name}/{i}" for i in range(4) for name in BUILTIN_TASKS]
    only = builtin_reference(4, ("science", "stance"))
    assert {e.task for e in only} == {"science", "stance"}
    assert [e for e in only if e.task == "science"] == [e for e in rows if e.task == "science"]
    assert builtin_reference(3, "arithmetic") == builtin_reference(3, ("arithmetic",))
    for row in rows:
        assert row.prompt and row.answer


# ------------------------------------------------------------------------------- label balance


@pytest.mark.parametrize("n", [30, 31, 44, 100, 503])
def test_stance_classes_follow_fomc_in_every_split(full, reference, n):
    splits = {
        "train": full["stance"].train[:n],
        "test": full["stance"].test[:n],
        "reference": [e for e in reference if e.task == "stance"][:n],
    }
    for split, rows in splits.items():
        counts = Counter(e.answer for e in rows)
        assert set(counts) == {"A", "B", "C"}, split
        # TRACE FOMC: 28% A (dovish), 23% B (hawkish), 49% C (neutral)
        expected = {"A": 0.3, "B": 0.2, "C": 0.5}
        for letter, count in counts.items():
            assert abs(count / len(rows) - expected[letter]) <= 0.07, (split, letter, counts)


@pytest.mark.parametrize("n", [12, 40, 200])
def test_science_gold_letters_all_present(full, reference, n):
    splits = {
        "train": full["science"].train[:n],
        "test": full["science"].test[:n],
        "reference": [e for e in reference if e.task == "science"][:n],
    }
    for split, rows in splits.items():
        assert {e.answer[0] for e in rows} == set("ABCD"), split


def test_science_gold_is_uniform_given_the_number_of_options(full):
    by_k: dict[int, Counter] = {}
    for e in full["science"].train:
        _, options = _science_parts(e.prompt)
        by_k.setdefault(len(options), Counter())[e.answer[0]] += 1
    assert set(by_k) == {2, 3, 4}
    for k, counts in by_k.items():
        assert set(counts) == set("ABCD"[:k])
        assert max(counts.values()) - min(counts.values()) <= 2, (k, counts)


# ---------------------------------------------------------------------------------- answer formats


def test_stance_format(full, reference):
    rows = full["stance"].train + full["stance"].test + tuple(e for e in reference if e.task == "stance")
    for e in rows:
        assert e.answer in ("A", "B", "C")
        assert e.prompt.startswith(STANCE_PREFIX) and e.prompt.endswith("\nStance:")
        sentence = e.prompt[len(STANCE_PREFIX) : -len("\nStance:")]
        assert "\n" not in sentence and sentence.endswith(".") and sentence[0].isupper()


def test_stance_label_follows_the_predicate(full):
    # Independent cue words: each stance's actions are recognisable on their own.
    cues = {
        "A": ("lower", "cut", "ease monetary", "expand asset purchases", "additional policy accommodation",
              "accommodative", "reduce the policy rate"),
        "B": ("raise", "raising", "increase the policy rate", "tighten", "shrink",
              "remove policy accommodation", "firm the stance"),
        "C": ("maintain", "unchanged", "steady", "current pace", "no change", "where it is"),
    }  # fmt: skip
    for e in full["stance"].train[:600]:
        sentence = e.prompt[len(STANCE_PREFIX) :]
        matched = {letter for letter, words in cues.items() if any(w in sentence for w in words)}
        assert matched == {e.answer}, (sentence, e.answer, matched)


def test_science_format(full, reference):
    rows = full["science"].train + full["science"].test + tuple(e for e in reference if e.task == "science")
    for e in rows:
        _, options = _science_parts(e.prompt)
        assert 2 <= len(options) <= 4
        assert len(set(options.values())) == len(options)
        letter, rationale = e.answer.split("\n")
        assert letter in options
        assert rationale and rationale.endswith(".") and "\n" not in rationale


# Independent re-derivation of some facts (written separately from the generator's tables).
PLANETS_FROM_SUN = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
PLANET_RADIUS_KM = {"Mercury": 2440, "Venus": 6052, "Earth": 6371, "Mars": 3390, "Jupiter": 69911,
                    "Saturn": 58232, "Uranus": 25362, "Neptune": 24622}  # fmt: skip
ANIMAL_CLASS = {
    "whale": "mammal", "bat": "mammal", "dolphin": "mammal", "kangaroo": "mammal", "dog": "mammal",
    "penguin": "bird", "ostrich": "bird", "owl": "bird", "duck": "bird",
    "shark": "fish", "seahorse": "fish", "salmon": "fish", "goldfish": "fish",
    "turtle": "reptile", "snake": "reptile", "crocodile": "reptile", "gecko": "reptile",
    "frog": "amphibian", "salamander": "amphibian", "toad": "amphibian", "newt": "amphibian",
    "ant": "insect", "bee": "insect", "butterfly": "insect", "ladybug": "insect",
}  # fmt: skip
STATE = {"an ice cube": "solid", "a rock": "solid", "a coin": "solid", "milk": "liquid",
         "vinegar": "liquid", "orange juice": "liquid", "steam": "gas", "oxygen": "gas",
         "water vapor": "gas", "carbon dioxide": "gas"}  # fmt: skip
OPPOSITE = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad",
            "wet": "dry", "full": "empty", "day": "night", "push": "pull", "buy": "sell"}  # fmt: skip
OPPOSITE.update({b: a for a, b in list(OPPOSITE.items())})
ANIMAL_OR_STATE_QUESTION = r"Which (?:of these animals|animal|of these) is an? (\w+)\?|Select the (\w+)\."
OPPOSITE_QUESTION = (
    r'Which word is the opposite of "(\w+)"\?'
    r'|Select the word that means the opposite of "(\w+)"\.'
)
MAGNET_QUESTIONS = (
    "Which object is attracted to a magnet?",
    "Which of these objects would stick to a magnet?",
)


def test_science_facts_are_correct(full):
    checked = Counter()
    for e in full["science"].train + full["science"].test:
        question, options = _science_parts(e.prompt)
        gold = options[e.answer[0]]
        others = [text for letter, text in options.items() if letter != e.answer[0]]
        if m := re.fullmatch(r"Which of these planets is (closest to|farthest from) the Sun\?", question):
            ranked = sorted(options.values(), key=PLANETS_FROM_SUN.index)
            assert gold == (ranked[0] if m[1] == "closest to" else ranked[-1]), e.prompt
            checked["planet distance"] += 1
        elif m := re.fullmatch(r"Which of these planets is the (largest|smallest)\?", question):
            ranked = sorted(options.values(), key=PLANET_RADIUS_KM.__getitem__)
            assert gold == (ranked[-1] if m[1] == "largest" else ranked[0]), e.prompt
            checked["planet size"] += 1
        elif question in ("Which of these is a planet?", "Select the planet."):
            assert gold in PLANETS_FROM_SUN and not set(others) & set(PLANETS_FROM_SUN), e.prompt
            checked["planet"] += 1
        elif m := re.fullmatch(ANIMAL_OR_STATE_QUESTION, question):
            cls = m[1] or m[2]
            if cls in ("mammal", "bird", "fish", "reptile", "amphibian", "insect"):
                if gold in ANIMAL_CLASS:
                    assert ANIMAL_CLASS[gold] == cls, e.prompt
                    checked["animal gold"] += 1
                for other in others:
                    if other in ANIMAL_CLASS:
                        assert ANIMAL_CLASS[other] != cls, e.prompt
                        checked["animal distractor"] += 1
            elif cls in ("solid", "liquid", "gas"):
                if gold in STATE:
                    assert STATE[gold] == cls, e.prompt
                    checked["state gold"] += 1
                for other in others:
                    assert STATE.get(other) != cls, e.prompt
        elif m := re.fullmatch(OPPOSITE_QUESTION, question):
            cue = m[1] or m[2]
            if cue in OPPOSITE:
                assert gold == OPPOSITE[cue], e.prompt
                checked["opposite"] += 1
            assert cue not in options.values()
        elif question in MAGNET_QUESTIONS:
            assert "iron" in gold or "steel" in gold, e.prompt
            assert not any("iron" in o or "steel" in o for o in others), e.prompt
            checked["magnet"] += 1
        elif question == "Which is a compound sentence?":
            assert ", and " in gold or ", but " in gold
            assert not any("," in o for o in others)
            checked["sentence"] += 1
        elif question == "Which is a simple sentence?":
            assert "," not in gold and all("," in o for o in others)
            checked["sentence"] += 1
        elif question.startswith("How long is a pencil?"):
            assert gold == "18 centimeters"
            checked["estimate"] += 1
    for kind in ("planet distance", "planet size", "planet", "animal gold", "animal distractor",
                 "state gold", "opposite", "magnet", "sentence", "estimate"):  # fmt: skip
        assert checked[kind] >= 5, (kind, checked)


def test_arithmetic_format(full, reference):
    rows = full["arithmetic"].train + full["arithmetic"].test
    rows += tuple(e for e in reference if e.task == "arithmetic")
    for e in rows:
        assert re.fullmatch(r"0|[1-9][0-9]*", e.answer), e.answer
        assert e.prompt.startswith(ARITHMETIC_PREFIX) and e.prompt.endswith("\nAnswer:")
        problem = e.prompt[len(ARITHMETIC_PREFIX) : -len("\nAnswer:")]
        assert "\n" not in problem and problem.endswith("?")
        assert re.search(r"\d", problem)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: builtin_task("nope", 1, 1), ["nope", "stance"]),
        (lambda: builtin_task("stance", -1, 1), ["stance", "n_train", str(MAX_TRAIN)]),
        (lambda: builtin_task("science", MAX_TRAIN + 1, 1), ["science", "n_train", str(MAX_TRAIN)]),
        (lambda: builtin_task("arithmetic", 1, MAX_TEST + 1), ["arithmetic", "n_test", str(MAX_TEST)]),
        (lambda: builtin_task("stance", 1, -5), ["stance", "n_test"]),
        (lambda: builtin_task("stance", 2.0, 1), ["stance", "n_train"]),
        (lambda: builtin_task("stance", True, 1), ["stance", "n_train"]),
        (lambda: builtin_reference(MAX_REFERENCE + 1), ["stance", str(MAX_REFERENCE)]),
        (lambda: builtin_reference(-1), ["stance"]),
        (lambda: builtin_reference(1, ("stance", "bogus")), ["bogus"]),
        (lambda: builtin_reference(1, ("stance", "stance")), ["stance", "repeat"]),
        (lambda: max_rows("bogus"), ["bogus"]),
    ],
)
def test_errors(call, words):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_maximum_sizes_are_accepted():
    for name in BUILTIN_TASKS:
        task = builtin_task(name, MAX_TRAIN, MAX_TEST)
        assert len(task.train) == MAX_TRAIN and len(task.test) == MAX_TEST
    assert len(builtin_reference(MAX_REFERENCE, ("science",))) == MAX_REFERENCE
