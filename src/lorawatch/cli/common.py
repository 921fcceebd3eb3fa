"""What the commands share: one-line errors, interruptions (Ctrl-C, SIGTERM), option parsing, and a finished
run's tables printed."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from lorawatch.errors import UserError

def fail(message: str) -> None:
    # One line on stderr, never wrapped: scripts and users grep it.
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    raise typer.Exit(2)


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {text!r}") from None


def parse_set_options(options: list[str]) -> dict:
    """`--set FIELD=VALUE` options as config changes. VALUE is read as JSON (96, 1e-4, true, [33, 42], "text"),
    anything else as text (original, smollm2-135m-instruct)."""
    changes = {}
    for option in options:
        field, sep, text = option.partition("=")
        if not sep or not field.strip():
            raise UserError(f"--set {option!r}: expected FIELD=VALUE, e.g. train.learning_rate=1e-4")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        changes[field.strip()] = value
    return changes


class Terminated(Exception):
    """SIGTERM, as Ray, SLURM and Kubernetes send on preemption: handled like Ctrl-C."""


def on_sigterm(signum, frame) -> None:
    raise Terminated()


@contextmanager
def long_command():
    """A command that computes into a run folder: a user's mistake is one line (exit 2); Ctrl-C (130) and SIGTERM
    (143, as Ray, SLURM and Kubernetes send on preemption) keep the finished work and say how to resume."""
    try:
        yield
    except UserError as error:
        fail(str(error))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished work is saved; run the same command again to resume\n")
        raise typer.Exit(130)
    except Terminated:
        sys.stderr.write("terminated (SIGTERM): finished work is saved; run the same command again to resume\n")
        raise typer.Exit(143)


def print_run_results(run_dir: Path, as_html: bool) -> None:
    """A finished run's tables on stdout; with --html, its page written and its path printed last."""
    from lorawatch.report.tables import load_run, print_results

    print_results(load_run(run_dir), Console())
    if as_html:
        from lorawatch.report.html import write_run_html

        print(write_run_html(run_dir, run_dir / "report.html"))
