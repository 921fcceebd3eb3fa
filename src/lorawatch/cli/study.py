"""`lorawatch study`: a grid of runs from one study file, and `lorawatch study status`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lorawatch.cli.common import fail, long_command
from lorawatch.errors import UserError


def study(
    study_file: Annotated[str, typer.Argument(metavar="STUDY.yaml | status",
                                              help="the study file; or `status` followed by a study folder")],
    folder: Annotated[Optional[Path], typer.Argument(metavar="[DIR]", help="with `status`: the study folder")] = None,
    out: Annotated[Optional[Path], typer.Option(help="study folder (default: runs/<study name>)")] = None,
    backend: Annotated[str, typer.Option(help="local (units one after the other here) or ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="ray: an existing cluster's address (default: an embedded "
                                                        "local Ray)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="ray, embedded: units at once (default: as the CPUs "
                                                        "allow)", min=1)] = None,
    plan: Annotated[bool, typer.Option("--plan", help="only write DIR/units.txt, one `lorawatch run` line per "
                                                      "unit, for another scheduler")] = False,
    report_dir: Annotated[Optional[Path], typer.Option("--report", help="the report's folder (default: "
                                                                     "DIR/report)")] = None,
    track: Annotated[Optional[str], typer.Option(help="also log the study to mlflow or tensorboard: a parent run, "
                                                      "each unit a child (docs/tracking.md)")] = None,
    as_html: Annotated[bool, typer.Option("--html", help="also write the report as one HTML page")] = False,
) -> None:
    """Run a grid of runs from STUDY.yaml (one run folder per grid point and seed), then the report over them.

    Rerunning the command resumes: finished units are kept, interrupted ones resume from their run folders,
    failed ones are tried again. `lorawatch study status DIR` shows each unit's state.
    """
    from lorawatch.study.driver import print_status, run_study

    if study_file == "status":
        try:
            if folder is None:
                raise UserError("usage: lorawatch study status DIR (the study's --out folder)")
            raise typer.Exit(print_status(folder, Console()))
        except UserError as error:
            fail(str(error))
    if folder is not None:
        fail(f"unexpected argument {folder}; the study folder is given with --out")
    if backend not in ("local", "ray"):
        fail(f"--backend: expected local or ray, got {backend!r}")
    if track not in (None, "mlflow", "tensorboard"):
        fail(f"--track: expected mlflow or tensorboard, got {track!r}")
    with long_command():
        code = run_study(Path(study_file), out, backend=backend, address=address, workers=workers, plan=plan,
                         as_html=as_html, console=Console(stderr=True), report_dir=report_dir, track=track)
    raise typer.Exit(code)
