"""The commands that read finished run folders: metrics, show, check, report, compare, gate, track."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lorawatch.cli.common import fail, print_run_results
from lorawatch.errors import UserError


def metrics(
    matrix_csv: Annotated[Path, typer.Argument(help="CSV: checkpoint column, then one column per task")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """CL metrics (OP, BWT, FWT, gain, ...) of any checkpoint-by-task accuracy matrix."""
    from lorawatch.analysis.metrics import FRAME_COLUMNS, compute_cl_metrics, read_matrix_csv

    try:
        tasks, matrix = read_matrix_csv(matrix_csv)
        result = compute_cl_metrics(matrix, tasks)
    except UserError as error:
        fail(str(error))
    except ValueError as error:
        fail(f"{matrix_csv}: {error}")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"CL metrics of {matrix_csv}", title_justify="left")
    columns = FRAME_COLUMNS
    for column in columns:
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for row in result.to_dict()["per_checkpoint"]:
        table.add_row(*[str(row[c]) if c == "checkpoint" else ("—" if row[c] is None else f"{row[c]:.3f}")
                        for c in columns])
    console = Console()
    console.print(table)
    console.print("Summary: " + " · ".join(f"{k} {'—' if v is None else (f'{v:.3f}' if isinstance(v, float) else v)}"
                                          for k, v in result.summary.items()))


def show(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    as_html: Annotated[bool, typer.Option("--html", help="also write RUN_DIR/report.html: tables, figures, live "
                                                         "drift, costs and an example browser in one page that "
                                                         "opens offline")] = False,
) -> None:
    """Print a run folder's accuracy matrix, CL metrics and stability table."""
    try:
        print_run_results(run_dir, as_html)
    except UserError as error:
        fail(str(error))


def check(run_dirs: Annotated[list[Path], typer.Argument(help="run folders, finished or not")]) -> None:
    """Read every file of run folders against the run-folder schema; one line per problem (exit 1 if any)."""
    from lorawatch.rundir.lifecycle import is_run_folder
    from lorawatch.rundir.schema import SCHEMA_VERSION
    from lorawatch.rundir.check import check_run_folder

    problems = 0
    for run_dir in run_dirs:
        if not run_dir.is_dir() or not is_run_folder(run_dir):
            fail(f"{run_dir}: not a lorawatch run folder")
        found = check_run_folder(run_dir)
        for line in found:
            typer.echo(line)
        problems += len(found)
        if not found:
            typer.echo(f"{run_dir}: every file fits the run-folder schema (this lorawatch writes version "
                       f"{SCHEMA_VERSION})")
    if problems:
        raise typer.Exit(1)


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished run folders (one model and task order each)")],
    out: Annotated[Path, typer.Option(help="folder for the tables, figures and report.md")],
    as_html: Annotated[bool, typer.Option("--html", help="also write OUT/report.html: the tables, figures and every "
                                                         "run's sections and example browser in one page that opens "
                                                         "offline")] = False,
) -> None:
    """The paper's tables (3-6) and figures over many run folders, as Markdown, CSV, LaTeX, PNG and SVG.

    Run folders with the same model and task order are merged (their seeds pooled).
    """
    from lorawatch.report.study_report import write_report

    try:
        result = write_report(run_dirs, out)
        page = None
        if as_html:
            from lorawatch.report.html import write_report_html

            page = write_report_html(result, result.out / "report.html")
    except UserError as error:
        fail(str(error))
    print(result.out / "report.md")
    if page is not None:
        print(page)


def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished run folders, e.g. with and without a monitor")],
    out: Annotated[Optional[Path], typer.Option(help="also write compare.md, compare.json and the live-drift "
                                                     "figure into this folder")] = None,
) -> None:
    """Runs side by side: accuracy matrix, OP/BWT/FWT, final KL, compute spent and interventions."""
    from lorawatch.report.compare import compare_runs, print_comparison, write_comparison

    try:
        result = compare_runs(run_dirs)
        print_comparison(result, Console())
        if out is not None:
            print(write_comparison(result, out)[0])
    except UserError as error:
        fail(str(error))


def gate(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (`run` or `evaluate`) or a study folder")],
    stage: Annotated[str, typer.Option(help="the checkpoint to gate: a stage number or `last`")] = "last",
    against: Annotated[str, typer.Option(help="what it is compared with: `previous`, `base` or a stage number")
                       ] = "previous",
    alpha: Annotated[Optional[float], typer.Option(help="significance level of a regression, for all tasks together "
                                                        "(default: the run's statistics.alpha, 0.05)")] = None,
    max_nfr: Annotated[Optional[float], typer.Option("--max-nfr", help="fail when a task's negative flip rate (rows "
                                                                       "right before and wrong after, over all "
                                                                       "rows) is above this")] = None,
    max_kl: Annotated[Optional[float], typer.Option("--max-kl", help="fail when the checkpoint's KL to base on the "
                                                                     "reference set is above this")] = None,
    max_deploy_kl: Annotated[Optional[float], typer.Option("--max-deploy-kl", help="fail when a deployed form of "
                                                                                   "the checkpoint (`lorawatch "
                                                                                   "deploy`) has a mean KL(checkpoint "
                                                                                   "‖ deployed) on the reference set "
                                                                                   "above this")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
) -> None:
    """May this checkpoint ship? Exit 0 when no task regressed and every limit holds, 2 when a task regressed or a
    limit is exceeded (one line per reason), 1 on an error. Every seed of the run (every unit of a study) is gated.
    A deployed form of the gated checkpoint (`lorawatch deploy`) that regressed on a task against the PyTorch
    checkpoint fails it too.
    """
    from lorawatch.analysis.gate import gate as gate_run, parse_stage

    try:
        if alpha is not None and not 0 < alpha < 1:
            raise UserError(f"--alpha: expected a level between 0 and 1, got {alpha:g}")
        if max_nfr is not None and not 0 <= max_nfr <= 1:
            raise UserError(f"--max-nfr: expected a rate between 0 and 1, got {max_nfr:g}")
        if max_kl is not None and not max_kl >= 0:
            raise UserError(f"--max-kl: expected a KL of 0 or more, got {max_kl:g}")
        if max_deploy_kl is not None and not max_deploy_kl >= 0:
            raise UserError(f"--max-deploy-kl: expected a KL of 0 or more, got {max_deploy_kl:g}")
        result = gate_run(run_dir, stage=parse_stage(stage, "--stage", ("last",)),
                          against=parse_stage(against, "--against", ("previous", "base")), alpha=alpha,
                          max_nfr=max_nfr, max_kl=max_kl, max_deploy_kl=max_deploy_kl)
    except UserError as error:
        sys.stderr.write(f"error: {' '.join(str(error).split())}\n")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.lines:
            print(line)
        for reason in result.reasons:
            print(f"reason: {reason}")
        print("gate: passed" if result.passed else f"gate: failed ({len(result.reasons)} reason(s))")
    raise typer.Exit(0 if result.passed else 2)


def track(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished run folders")],
    to: Annotated[Optional[str], typer.Option("--to", help="mlflow or tensorboard (default: the run's own tracking "
                                                           "section, else mlflow)")] = None,
    uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite:///RUN_DIR/mlflow.db) or "
                                                    "TensorBoard log folder (default: RUN_DIR/tensorboard)")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default: the run's name)")] = None,
) -> None:
    """Log finished run folders to MLflow or TensorBoard after the fact, as `run --track` does live: parameters,
    training loss, live drift, accuracy and drift per stage, CL metrics, summary and tables.

    Tracking a folder again to the same place logs nothing twice. Prints where each run went.
    """
    from lorawatch.integrations.tracking import export_run, export_settings

    try:
        for run_dir in run_dirs:
            print(f"{run_dir}: {export_run(run_dir, export_settings(run_dir, to, uri, experiment))}")
    except UserError as error:
        fail(str(error))
