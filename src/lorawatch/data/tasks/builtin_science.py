"""The built-in `science` task (like ScienceQA): elementary science and fact questions with 2-4 options."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from lorawatch.data.tasks.builtin_rng import Row, _article, _capitalize, _Cycle, _Rng, _unique


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
