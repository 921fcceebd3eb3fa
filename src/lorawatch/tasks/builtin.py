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

import random
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import TypeVar

from lorawatch.errors import ConfigError
from lorawatch.tasks.base import Example, Task

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

# How many draws a row may take before a generator is considered exhausted (a bug, never seen).
_MAX_ATTEMPTS = 200

T = TypeVar("T")
Row = tuple[str, str]  # (prompt, answer)


# --------------------------------------------------------------------------------------------------
# Randomness: everything goes through getrandbits, whose output for an int seed has been identical
# across CPython versions and platforms, so no draw depends on library helpers that may change.


class _Rng:
    def __init__(self, seed: int):
        self._random = random.Random(seed)

    def below(self, n: int) -> int:
        """A uniform int in [0, n)."""
        if n <= 0:
            raise ValueError(f"below({n})")
        bits = n.bit_length()
        while True:
            value = self._random.getrandbits(bits)
            if value < n:
                return value

    def between(self, low: int, high: int) -> int:
        """A uniform int in [low, high]."""
        return low + self.below(high - low + 1)

    def choice(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def shuffle(self, items: list[T]) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        """k distinct items, in random order."""
        pool = list(items)
        if k > len(pool):
            raise ValueError(f"sample of {k} from {len(pool)}")
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    def chance(self, numerator: int, denominator: int) -> bool:
        return self.below(denominator) < numerator


class _Cycle:
    """Yields items in shuffled blocks: every item once per block, so any prefix is balanced."""

    def __init__(self, rng: _Rng, items: Sequence[T]):
        self._rng = rng
        self._items = list(items)
        self._block: list[T] = []

    def next(self) -> T:
        if not self._block:
            self._block = list(self._items)
            self._rng.shuffle(self._block)
        return self._block.pop()


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _unique(seen: set[str], draw: Callable[[], Row | None], what: str) -> Row:
    """Draws until a row whose prompt is new; records it in `seen`."""
    for _ in range(_MAX_ATTEMPTS):
        row = draw()
        if row is not None and row[0] not in seen:
            seen.add(row[0])
            return row
    raise RuntimeError(f"built-in task generator exhausted while drawing {what}")


# --------------------------------------------------------------------------------------------------
# stance: like TRACE FOMC. The stance is carried by the action and the reason, never by the subject,
# the framing verb or the lead-in, which are all stance-free.

_STANCE_PROMPT = (
    "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral. "
    "Choose one from A, B and C.\nText:\n{sentence}\nStance:"
)

_STANCE_SUBJECTS = (
    "The Committee",
    "The Board",
    "Policymakers",
    "Most participants",
    "Several members",
    "The central bank",
    "Federal Reserve officials",
    "The Federal Open Market Committee",
    "Many participants",
    "A majority of members",
    "The monetary policy committee",
    "Board members",
)

_STANCE_FRAMES = (
    "decided to",
    "agreed to",
    "voted to",
    "judged it appropriate to",
    "saw it as appropriate to",
    "expected to",
    "signaled a readiness to",
    "indicated that it would be appropriate to",
)

# letter -> (actions, reasons)
_STANCE_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "A": (  # dovish
        (
            "lower the target range for the federal funds rate",
            "cut the policy rate by 25 basis points",
            "reduce the policy rate by 50 basis points",
            "ease monetary policy further",
            "expand asset purchases",
            "provide additional policy accommodation",
            "lower interest rates again",
            "keep monetary policy accommodative for longer",
            "cut interest rates",
        ),
        (
            "to support employment",
            "to support the economic recovery",
            "in response to a weakening labor market",
            "to counter rising downside risks to growth",
            "because economic activity had slowed markedly",
            "as unemployment continued to rise",
        ),
    ),
    "B": (  # hawkish
        (
            "raise the target range for the federal funds rate",
            "raise the policy rate by 25 basis points",
            "increase the policy rate by 50 basis points",
            "tighten monetary policy further",
            "shrink the balance sheet at a faster pace",
            "remove policy accommodation more quickly",
            "raise interest rates again",
            "firm the stance of monetary policy",
            "continue raising the policy rate",
        ),
        (
            "to contain inflation pressures",
            "to bring inflation back down to 2 percent",
            "to keep inflation expectations well anchored",
            "in response to persistently high inflation",
            "because inflation remained well above target",
            "as price pressures continued to build",
        ),
    ),
    "C": (  # neutral
        (
            "maintain the target range for the federal funds rate",
            "leave the policy rate unchanged",
            "keep the stance of monetary policy unchanged",
            "hold interest rates steady",
            "keep asset purchases at their current pace",
            "make no change to the policy rate",
            "maintain the current level of interest rates",
            "keep the federal funds rate where it is",
            "leave interest rates unchanged",
        ),
        (
            "while monitoring incoming data",
            "while assessing the economic outlook",
            "pending further information on the outlook",
            "until the outlook becomes clearer",
            "as risks to the outlook appeared roughly balanced",
            "while evaluating the effects of earlier policy actions",
        ),
    ),
}

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_STANCE_LEADS = tuple(f"At the {month} meeting, " for month in _MONTHS) + (
    "In the policy statement, ",
    "After reviewing recent economic data, ",
    "Following a lengthy discussion, ",
    "On Wednesday, ",
    "At the conclusion of the meeting, ",
    "In the minutes of the meeting, ",
)


def _stance_row(rng: _Rng, letter: str) -> Row:
    actions, reasons = _STANCE_PHRASES[letter]
    subject = rng.choice(_STANCE_SUBJECTS)
    clause = f"{rng.choice(_STANCE_FRAMES)} {rng.choice(actions)} {rng.choice(reasons)}"
    if rng.chance(2, 3):
        sentence = f"{rng.choice(_STANCE_LEADS)}{subject[:1].lower()}{subject[1:]} {clause}."
    else:
        sentence = f"{subject} {clause}."
    return _STANCE_PROMPT.format(sentence=sentence), letter


def _stance_region(rng: _Rng, seen: set[str], size: int) -> list[Row]:
    # The label mix of TRACE's FOMC split (about 28% dovish, 23% hawkish, 49% neutral), so that the task
    # rewards what real stance data rewards, the class prior included.
    letters = _Cycle(rng, ("A", "A", "A", "B", "B", "C", "C", "C", "C", "C"))
    rows = []
    for _ in range(size):
        letter = letters.next()
        rows.append(_unique(seen, partial(_stance_row, rng, letter), f"stance/{letter}"))
    return rows


# --------------------------------------------------------------------------------------------------
# science: like TRACE ScienceQA. Each family draws a question, its correct option and distractors
# that are certainly wrong, from small fact tables. The gold position is fixed before the draw.

_SCIENCE_PROMPT = (
    "Choose an answer for the following question and give your reasons.\n\n"
    "Question:\n{question}\n\nChoices:\n{choices}\n\nAnswer:"
)
_LETTERS = "ABCD"

# A family draws (question, gold option, distractors, rationale) for k options, or None when it
# cannot ask a k-option question; _SCIENCE_FAMILIES pairs it with the most options it supports.
_Draw = Callable[[_Rng, int], "tuple[str, str, list[str], str] | None"]

_ANIMALS: dict[str, tuple[str, ...]] = {
    "mammal": (
        "dog", "cat", "horse", "cow", "whale", "dolphin", "bat", "elephant", "lion", "tiger",
        "rabbit", "mouse", "bear", "giraffe", "kangaroo", "sheep", "goat", "pig", "zebra", "deer",
        "fox", "wolf", "squirrel", "camel",
    ),
    "bird": (
        "eagle", "robin", "penguin", "ostrich", "owl", "parrot", "sparrow", "duck", "chicken",
        "pigeon", "crow", "flamingo", "hawk", "swan", "hummingbird", "peacock",
    ),
    "fish": (
        "salmon", "trout", "goldfish", "shark", "tuna", "cod", "catfish", "clownfish", "carp",
        "herring", "guppy", "seahorse",
    ),
    "reptile": (
        "snake", "lizard", "turtle", "crocodile", "alligator", "iguana", "gecko", "tortoise",
        "chameleon", "rattlesnake",
    ),
    "amphibian": ("frog", "toad", "salamander", "newt", "axolotl", "bullfrog"),
    "insect": (
        "ant", "bee", "butterfly", "beetle", "grasshopper", "ladybug", "mosquito", "housefly",
        "dragonfly", "moth", "cricket", "termite",
    ),
}  # fmt: skip
_ANIMAL_FACTS = {
    "mammal": "mammals feed their young milk",
    "bird": "birds have feathers, two wings and a beak",
    "fish": "fish live in water, have fins and breathe with gills",
    "reptile": "reptiles have dry, scaly skin",
    "amphibian": "amphibians have moist skin, and most begin their lives in water",
    "insect": "insects have six legs and three body parts",
}
_ANIMAL_QUESTIONS = ("Which of these animals is {cls}?", "Select the {noun}.", "Which animal is {cls}?")


def _draw_animal(rng: _Rng, k: int):
    cls = rng.choice(tuple(_ANIMALS))
    gold = rng.choice(_ANIMALS[cls])
    others = [animal for other, animals in _ANIMALS.items() if other != cls for animal in animals]
    question = rng.choice(_ANIMAL_QUESTIONS).format(cls=_article(cls), noun=cls)
    rationale = f"{_capitalize(_article(gold))} is {_article(cls)}: {_ANIMAL_FACTS[cls]}."
    return question, gold, rng.sample(others, k - 1), rationale


_MATTER: dict[str, tuple[str, ...]] = {
    "solid": (
        "a rock", "an ice cube", "a wooden chair", "a coin", "a pencil", "a brick", "a book",
        "a glass marble", "a baseball bat", "a seashell", "a crayon", "a hammer",
    ),
    "liquid": (
        "milk", "orange juice", "vinegar", "cooking oil", "rainwater", "lemonade", "apple juice",
        "water in a bathtub", "hot tea", "seawater",
    ),
    "gas": (
        "steam", "the air inside a balloon", "helium in a party balloon", "oxygen",
        "carbon dioxide", "water vapor", "the air in a bicycle tire", "neon in a sign",
    ),
}  # fmt: skip
_MATTER_FACTS = {
    "solid": "a solid has its own shape and volume",
    "liquid": "a liquid has a fixed volume but takes the shape of its container",
    "gas": "a gas spreads out to fill all the space in its container",
}
_MATTER_QUESTIONS = ("Which of these is {state}?", "Select the {noun}.")


def _draw_matter(rng: _Rng, k: int):
    state = rng.choice(tuple(_MATTER))
    gold = rng.choice(_MATTER[state])
    others = [item for other, items in _MATTER.items() if other != state for item in items]
    question = rng.choice(_MATTER_QUESTIONS).format(state=_article(state), noun=state)
    rationale = f"{_capitalize(gold)} is {_article(state)}: {_MATTER_FACTS[state]}."
    return question, gold, rng.sample(others, k - 1), rationale


_MAGNETIC = (
    ("an iron nail", "iron"),
    ("an iron bolt", "iron"),
    ("an iron horseshoe", "iron"),
    ("an iron chain", "iron"),
    ("a cast-iron frying pan", "iron"),
    ("a steel paper clip", "steel"),
)
_NOT_MAGNETIC = (
    "a wooden block", "a rubber band", "a plastic cup", "a glass marble", "a cotton sock",
    "a paper cup", "a copper wire", "an aluminum can", "a gold ring", "a leather belt",
    "a wax crayon", "a ceramic mug", "a wool scarf", "a glass bottle", "a sheet of aluminum foil",
)  # fmt: skip
_MAGNET_QUESTIONS = (
    "Which object is attracted to a magnet?",
    "Which of these objects would stick to a magnet?",
)


def _draw_magnet(rng: _Rng, k: int):
    gold, material = rng.choice(_MAGNETIC)
    rationale = f"{_capitalize(gold)} is made of {material}, and {material} is attracted to magnets."
    return rng.choice(_MAGNET_QUESTIONS), gold, rng.sample(_NOT_MAGNETIC, k - 1), rationale


_PLANETS_BY_DISTANCE = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
# Mean radii: Jupiter 69,911 km, Saturn 58,232, Uranus 25,362, Neptune 24,622, Earth 6,371,
# Venus 6,052, Mars 3,390, Mercury 2,440.
_PLANETS_BY_SIZE = ("Jupiter", "Saturn", "Uranus", "Neptune", "Earth", "Venus", "Mars", "Mercury")
_NOT_PLANETS = ("the Sun", "the Moon", "Polaris", "Sirius", "Halley's Comet", "Titan", "Europa")


def _draw_planet(rng: _Rng, k: int):
    kind = rng.below(5)
    if kind == 4:
        gold = rng.choice(_PLANETS_BY_DISTANCE)
        question = rng.choice(("Which of these is a planet?", "Select the planet."))
        rationale = f"{gold} is one of the eight planets that orbit the Sun."
        return question, gold, rng.sample(_NOT_PLANETS, k - 1), rationale
    planets = rng.sample(_PLANETS_BY_DISTANCE, k)
    if kind < 2:
        order, listing = _PLANETS_BY_DISTANCE, "the order of the planets from the Sun is " + ", ".join(
            _PLANETS_BY_DISTANCE
        )
        superlative = ("closest to", "farthest from")[kind]
        question = f"Which of these planets is {superlative} the Sun?"
    else:
        order, listing = _PLANETS_BY_SIZE, "from largest to smallest the planets are " + ", ".join(
            _PLANETS_BY_SIZE
        )
        superlative = ("the largest", "the smallest")[kind - 2]
        question = f"Which of these planets is {superlative}?"
    ranked = sorted(planets, key=order.index)
    gold = ranked[0] if kind in (0, 2) else ranked[-1]
    if kind < 2:
        rationale = f"Of these planets, {gold} is {superlative} the Sun, since {listing}."
    else:
        rationale = f"Of these planets, {gold} is {superlative}, since {listing}."
    return question, gold, [p for p in planets if p != gold], rationale


# (word, opposite, group): distractors never come from the cue's group, so no distractor is a
# near-opposite of the cue (no "short" when asking for the opposite of "big").
_OPPOSITES = (
    ("hot", "cold", "temperature"),
    ("big", "small", "size"),
    ("tall", "short", "size"),
    ("thick", "thin", "size"),
    ("wide", "narrow", "size"),
    ("deep", "shallow", "size"),
    ("heavy", "light", "size"),
    ("fast", "slow", "speed"),
    ("up", "down", "place"),
    ("inside", "outside", "place"),
    ("north", "south", "place"),
    ("east", "west", "place"),
    ("happy", "sad", "feeling"),
    ("open", "closed", "state"),
    ("wet", "dry", "state"),
    ("full", "empty", "state"),
    ("clean", "dirty", "state"),
    ("asleep", "awake", "state"),
    ("loud", "quiet", "sound"),
    ("early", "late", "time"),
    ("day", "night", "time"),
    ("first", "last", "time"),
    ("start", "finish", "time"),
    ("always", "never", "time"),
    ("young", "old", "time"),
    ("rich", "poor", "quality"),
    ("strong", "weak", "quality"),
    ("smooth", "rough", "quality"),
    ("safe", "dangerous", "quality"),
    ("true", "false", "quality"),
    ("push", "pull", "action"),
    ("win", "lose", "action"),
    ("buy", "sell", "action"),
    ("remember", "forget", "action"),
    ("arrive", "depart", "action"),
    ("friend", "enemy", "people"),
)
_OPPOSITE_QUESTIONS = (
    'Which word is the opposite of "{cue}"?',
    'Select the word that means the opposite of "{cue}".',
)


def _draw_opposite(rng: _Rng, k: int):
    first, second, group = rng.choice(_OPPOSITES)
    cue, gold = (first, second) if rng.chance(1, 2) else (second, first)
    others = [word for a, b, g in _OPPOSITES if g != group for word in (a, b)]
    question = rng.choice(_OPPOSITE_QUESTIONS).format(cue=cue)
    rationale = f'"{_capitalize(gold)}" means the opposite of "{cue}".'
    return question, gold, rng.sample(others, k - 1), rationale


_PEOPLE = (
    "Maria", "Leo", "Anna", "Sam", "Priya", "Tom", "Keiko", "Omar", "Lucy", "Diego",
    "Grace", "Ivan", "Nadia", "Ben", "Ella", "Kwame",
)  # fmt: skip
_DEEDS = (
    "walked to the park", "baked a cake", "read a book", "painted the fence", "fed the cat",
    "planted tomatoes", "washed the dishes", "rode a bike", "wrote a letter", "played the piano",
    "cleaned the kitchen", "watched a movie", "built a sandcastle", "caught the bus",
    "visited the library", "made breakfast",
)  # fmt: skip
_WHENS = (
    "after lunch", "on Saturday", "in the morning", "before dinner", "last week", "yesterday",
    "on a rainy day", "after school",
)  # fmt: skip


def _draw_sentence(rng: _Rng, k: int):
    if k != 2:
        return None
    first, second = rng.sample(_PEOPLE, 2)
    deed1, deed2 = rng.sample(_DEEDS, 2)
    conjunction = rng.choice(("and", "but"))
    compound = f"{first} {deed1}, {conjunction} {second} {deed2}."
    simple = f"{rng.choice(_PEOPLE)} {rng.choice(_DEEDS)} {rng.choice(_WHENS)}."
    if rng.chance(1, 2):
        question = "Which is a compound sentence?"
        rationale = (
            f'"{compound}" is a compound sentence: it joins two independent clauses '
            f'with a comma and "{conjunction}".'
        )
        return question, compound, [simple], rationale
    question = "Which is a simple sentence?"
    rationale = f'"{simple}" is a simple sentence: it has only one independent clause.'
    return question, simple, [compound], rationale


_LIVING = (
    "an oak tree", "a mushroom", "a sunflower", "a rabbit", "a goldfish", "a patch of moss",
    "a honeybee", "a cactus", "a pine tree", "a frog", "a blade of grass", "an earthworm",
)  # fmt: skip
_NOT_LIVING = (
    "a rock", "a cloud", "a bicycle", "a plastic toy", "a pair of scissors", "a glass of water",
    "a sandcastle", "a pencil", "a television", "a shoe", "a spoon", "a brick",
)  # fmt: skip


def _draw_living(rng: _Rng, k: int):
    gold = rng.choice(_LIVING)
    question = rng.choice(("Which of these is a living thing?", "Select the living thing."))
    rationale = f"{_capitalize(gold)} is a living thing: it grows, needs food and water, and reproduces."
    return question, gold, rng.sample(_NOT_LIVING, k - 1), rationale


# (question, amount, correct unit, wrong units): every wrong unit is off by a factor of 100 or more.
_ESTIMATES = (
    ("How long is a pencil?", "18", "centimeters", ("meters", "kilometers")),
    ("How long is a crayon?", "9", "centimeters", ("meters", "kilometers")),
    ("How long is a toothbrush?", "18", "centimeters", ("meters", "kilometers")),
    ("How long is a paper clip?", "3", "centimeters", ("meters", "kilometers")),
    ("How long is a cell phone?", "14", "centimeters", ("meters", "kilometers")),
    ("How long is a school bus?", "12", "meters", ("centimeters", "kilometers")),
    ("How tall is a door?", "2", "meters", ("centimeters", "kilometers")),
    ("How long is a soccer field?", "100", "meters", ("centimeters", "kilometers")),
    ("How long is a car?", "4", "meters", ("centimeters", "kilometers")),
    ("How long is a garden hose?", "15", "meters", ("centimeters", "kilometers")),
    ("How long is a marathon race?", "42", "kilometers", ("centimeters", "meters")),
    ("How much does an apple weigh?", "150", "grams", ("milligrams", "kilograms")),
    ("How much does a watermelon weigh?", "5", "kilograms", ("milligrams", "grams")),
    ("How much does a car weigh?", "1,500", "kilograms", ("milligrams", "grams")),
    ("How much does a paper clip weigh?", "1", "gram", ("milligram", "kilogram")),
    ("How much does a bicycle weigh?", "12", "kilograms", ("milligrams", "grams")),
    ("How much does a slice of bread weigh?", "30", "grams", ("milligrams", "kilograms")),
)


def _draw_estimate(rng: _Rng, k: int):
    if k > 3:
        return None
    question, amount, unit, wrong = rng.choice(_ESTIMATES)
    gold = f"{amount} {unit}"
    distractors = [f"{amount} {w}" for w in rng.sample(wrong, k - 1)]
    rationale = f"The best estimate is {gold}; the other choices are far too large or too small."
    return f"{question} Select the best estimate.", gold, distractors, rationale


_SCIENCE_FAMILIES: tuple[tuple[int, _Draw], ...] = (
    (4, _draw_animal),
    (4, _draw_matter),
    (4, _draw_magnet),
    (4, _draw_planet),
    (4, _draw_opposite),
    (2, _draw_sentence),
    (4, _draw_living),
    (3, _draw_estimate),
)


def _science_row(rng: _Rng, draw: _Draw, k: int, gold_index: int) -> Row | None:
    drawn = draw(rng, k)
    if drawn is None:
        return None
    question, gold, distractors, rationale = drawn
    options = list(distractors)
    rng.shuffle(options)
    options.insert(gold_index, gold)
    if len(options) != k or len(set(options)) != k:  # a fact table lists a word twice: a bug
        raise RuntimeError(f"built-in science question with bad options: {options}")
    choices = "\n".join(f"{_LETTERS[i]}. {option}" for i, option in enumerate(options))
    prompt = _SCIENCE_PROMPT.format(question=question, choices=choices)
    return prompt, f"{_LETTERS[gold_index]}\n{rationale}"


def _science_draw(rng: _Rng, scheduled: _Draw, families: _Cycle, k: int, gold_index: int) -> Row | None:
    # Mostly the scheduled family; now and then any family that fits, so a family whose questions
    # are used up cannot stall the pool.
    family = scheduled if rng.chance(3, 4) else families.next()
    return _science_row(rng, family, k, gold_index)


def _science_region(rng: _Rng, seen: set[str], size: int) -> list[Row]:
    # The number of options cycles over 2, 3, 4, 4 (four-option questions twice as often, so that
    # "D" is not rare); for each number, the gold position cycles over the available letters and
    # the family cycles over those that support that many options.
    option_counts = _Cycle(rng, (2, 3, 4, 4))
    gold_positions = {k: _Cycle(rng, range(k)) for k in (2, 3, 4)}
    families = {k: _Cycle(rng, [d for most, d in _SCIENCE_FAMILIES if most >= k]) for k in (2, 3, 4)}
    rows = []
    for _ in range(size):
        k = option_counts.next()
        gold_index = gold_positions[k].next()
        draw = partial(_science_draw, rng, families[k].next(), families[k], k, gold_index)
        rows.append(_unique(seen, draw, f"science/{k} options"))
    return rows


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
