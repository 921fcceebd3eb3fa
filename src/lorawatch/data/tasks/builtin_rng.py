"""Deterministic draws for the built-in tasks: everything goes through `random.Random.getrandbits`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar



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
