"""What a run spent: wall seconds per phase, generation token counts, peak memory -> RUN/costs.json.

The benchmark (bench/) reads this file; users see where the time of a run went.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from lorawatch.rundir.schema import GenerationCounts


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Costs:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.generation: dict[str, GenerationCounts] = defaultdict(GenerationCounts)
        self.notes: dict[str, object] = {}
        self._started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def to_dict(self) -> dict:
        return {
            "wall_seconds": round(time.perf_counter() - self._started, 3),
            "phase_seconds": {name: round(value, 3) for name, value in self.seconds.items()},
            "generation": {name: counters.to_dict() for name, counters in self.generation.items()},
            "peak_rss_bytes": peak_rss_bytes(),
            **self.notes,
        }
