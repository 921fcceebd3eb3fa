"""Progress on the terminal: where the run is (seed, stage, phase), how far, elapsed and time left.

Work is counted in rows (training examples, evaluated examples, reference rows), so the estimate of the
time left follows the measured pace of the run itself.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    def __init__(self, total_rows: int, console: Console):
        self.console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rows"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            console=console, transient=False, refresh_per_second=4,
        )
        self._task = self._progress.add_task("starting", total=total_rows)
        self._started = time.perf_counter()

    def __enter__(self) -> "RunProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def phase(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def advance(self, rows: int) -> None:
        self._progress.advance(self._task, rows)

    def log(self, message: str) -> None:
        elapsed = time.perf_counter() - self._started
        self._progress.console.print(f"[dim]{elapsed:7.1f}s[/dim] {message}")
