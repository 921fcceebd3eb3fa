"""The `lorawatch` command line: run, evaluate, metrics, show, check, gate, report, compare, track, export, deploy,
study, data.

The commands live in one module per group, and are put together here, in the order `lorawatch --help` lists them:

    runs.py     run, evaluate: compute into a run folder
    results.py  metrics, show, check, report, compare, gate, track: read finished run folders
    deploy.py   export, deploy: a stage as the files a user ships; every checkpoint as it ships, through llama.cpp
    study.py    study: a grid of runs
    data.py     data fetch, data list: the paper's datasets
    common.py   one-line errors, interruptions, option parsing
"""

from __future__ import annotations

import signal
import warnings

import typer

from lorawatch.cli import data, deploy, results, runs, study
from lorawatch.cli.common import on_sigterm
from lorawatch.errors import format_warning

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sequential LoRA personalization of small language models, with stability monitoring.")
for command in (runs.run, runs.evaluate, results.metrics, results.show, results.check, results.report,
                results.compare, results.gate, results.track, deploy.export, deploy.deploy, study.study):
    app.command()(command)
app.add_typer(data.data_app, name="data")


def main() -> None:
    warnings.formatwarning = format_warning  # one line, `warning: ...`, with no source line after it
    # Deprecation notices of the libraries are for their callers' developers, not for a user's terminal.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft)(\.|$)")
    signal.signal(signal.SIGTERM, on_sigterm)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars: lorawatch shows its own progress
    app()
