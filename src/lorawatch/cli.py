"""The `lorawatch` command line: run, evaluate, metrics, show, check, gate, report, compare, track, data."""

from __future__ import annotations

import json
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lorawatch.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sequential LoRA personalization of small language models, with stability monitoring.")


def _fail(message: str) -> None:
    # One line on stderr, never wrapped: scripts and users grep it.
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    raise typer.Exit(2)


def _parse_seeds(text: str) -> list[int]:
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


@contextmanager
def _long_command():
    """A command that computes into a run folder: a user's mistake is one line (exit 2); Ctrl-C (130) and SIGTERM
    (143, as Ray, SLURM and Kubernetes send on preemption) keep the finished work and say how to resume."""
    try:
        yield
    except UserError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished work is saved; run the same command again to resume\n")
        raise typer.Exit(130)
    except Terminated:
        sys.stderr.write("terminated (SIGTERM): finished work is saved; run the same command again to resume\n")
        raise typer.Exit(143)


@app.command()
def run(
    config_file: Annotated[Optional[Path], typer.Argument(help="YAML/JSON experiment config")] = None,
    preset_name: Annotated[Optional[str], typer.Option("--preset", help="a named config, e.g. demo")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder (default: runs/<name>)")] = None,
    model: Annotated[Optional[str], typer.Option(help="model spec: alias, hub id, folder or .gguf")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16, float16")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="comma-separated seeds, e.g. 33,42,123")] = None,
    order: Annotated[Optional[str], typer.Option(help="task order: original, reversed, or names A,B,C")] = None,
    max_train_rows: Annotated[Optional[int], typer.Option(help="cap on training rows per task")] = None,
    max_test_rows: Annotated[Optional[int], typer.Option(help="cap on test rows per task")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="generation length")] = None,
    monitor: Annotated[Optional[str], typer.Option(help="live drift monitor action: warn, stop, revert, "
                                                         "rollback")] = None,
    monitor_threshold: Annotated[Optional[float], typer.Option(help="monitor: absolute KL threshold")] = None,
    monitor_relative: Annotated[Optional[float], typer.Option(help="monitor: threshold as a multiple of the "
                                                                   "previous checkpoint's KL")] = None,
    monitor_every: Annotated[Optional[int], typer.Option(help="monitor: optimizer steps between "
                                                              "measurements")] = None,
    monitor_calibrate_from: Annotated[Optional[str], typer.Option(help="monitor: threshold from a report folder "
                                                                       "or a run folder")] = None,
    monitor_patience: Annotated[Optional[int], typer.Option(help="monitor: consecutive measurements above the "
                                                                 "threshold before acting")] = None,
    track: Annotated[Optional[str], typer.Option(help="also log the run, stage by stage, to mlflow or tensorboard "
                                                      "(docs/tracking.md)")] = None,
    set_fields: Annotated[Optional[list[str]], typer.Option("--set", help="FIELD=VALUE: any config field, dotted "
                                                                          "(tasks.*.max_train_rows=96, "
                                                                          "train.learning_rate=1e-4); VALUE is "
                                                                          "JSON, else text; repeatable")] = None,
    plain: Annotated[bool, typer.Option("--plain", help="evaluate without any fast-path part (no drafts, merged "
                                                          "adapter, shared prefixes, dropped rows, reference from "
                                                          "generation or cached base stage), for comparison")] = False,
    overwrite: Annotated[bool, typer.Option(help="start the run folder again from scratch")] = False,
    force: Annotated[bool, typer.Option(help="resume even though the config differs from the recorded one")] = False,
    as_html: Annotated[bool, typer.Option("--html", help="also write RUN/report.html (see `show --html`)")] = False,
) -> None:
    """Run the protocol: base evaluation, then train/evaluate stage by stage; print the tables.

    Running the same command again on an unfinished run folder resumes it where it stopped.
    """
    from lorawatch.config import PLAIN_SWITCHES, with_changes
    from lorawatch.presets import base_config
    from lorawatch.recipe.protocol import run_experiment

    with _long_command():
        config = base_config(config_file, preset_name)
        changes = {"model.spec": model, "model.device": device, "model.dtype": dtype,
                   "seeds": _parse_seeds(seeds) if seeds is not None else None,
                   "order": (order if order in ("original", "reversed") else [n.strip() for n in order.split(",")])
                   if order is not None else None,
                   "tasks.*.max_train_rows": max_train_rows, "tasks.*.max_test_rows": max_test_rows,
                   "eval.max_new_tokens": max_new_tokens,
                   **({f"eval.{part}": False for part in PLAIN_SWITCHES} if plain else {})}
        changes.update({"monitor.action": monitor, "monitor.threshold": monitor_threshold,
                        "monitor.relative": monitor_relative, "monitor.every": monitor_every,
                        "monitor.patience": monitor_patience,
                        "monitor.calibrate_from": monitor_calibrate_from, "tracking.backend": track})
        changes.update(parse_set_options(set_fields or []))
        config = with_changes(config, changes, preset_name)
        console = Console(stderr=True)
        run_dir = run_experiment(config, out or Path("runs") / config.name, console=console, overwrite=overwrite,
                                 force=force)
        _print_results(run_dir, as_html)


@app.command()
def evaluate(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT adapter folders in training order, or a training "
                                                        "output folder holding checkpoint-N/ folders")],
    config_file: Annotated[Optional[Path], typer.Option("--config", help="YAML/JSON experiment config: the model, "
                                                                         "tasks and reference set")] = None,
    preset_name: Annotated[Optional[str], typer.Option("--preset", help="a named config, e.g. demo")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder (default: runs/<name>-evaluate)")] = None,
    trained_on: Annotated[Optional[str], typer.Option(help="the task each adapter was trained on, in order: A,B,C "
                                                           "(without it OP/BWT/FWT are left undefined)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="the seed the adapters were trained with (a label)")] = None,
    model: Annotated[Optional[str], typer.Option(help="base model spec: alias, hub id, folder or .gguf")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16, float16")] = None,
    max_test_rows: Annotated[Optional[int], typer.Option(help="cap on test rows per task")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="generation length")] = None,
    plain: Annotated[bool, typer.Option("--plain", help="evaluate without any fast-path part")] = False,
    overwrite: Annotated[bool, typer.Option(help="start the run folder again from scratch")] = False,
    force: Annotated[bool, typer.Option(help="resume even though the config differs from the recorded one")] = False,
    as_html: Annotated[bool, typer.Option("--html", help="also write RUN/report.html (see `show --html`)")] = False,
) -> None:
    """Evaluate adapters trained elsewhere (Trainer, TRL, ...) like `run`'s checkpoints: base model and every
    adapter on every task and the reference set, into a run folder that show, report and compare read.

    Running the same command again on an unfinished run folder resumes it.
    """
    from lorawatch.config import PLAIN_SWITCHES, with_changes
    from lorawatch.recipe.external_adapters import evaluate_adapters
    from lorawatch.presets import base_config

    with _long_command():
        config = with_changes(base_config(config_file, preset_name), {
            "model.spec": model, "model.device": device, "model.dtype": dtype,
            "tasks.*.max_test_rows": max_test_rows, "eval.max_new_tokens": max_new_tokens,
            **({f"eval.{part}": False for part in PLAIN_SWITCHES} if plain else {})}, preset_name)
        order = None if trained_on is None else [name.strip() for name in trained_on.split(",") if name.strip()]
        run_dir = evaluate_adapters(config, adapters, out or Path("runs") / f"{config.name}-evaluate",
                                    trained_on=order, seed=seed, console=Console(stderr=True), overwrite=overwrite,
                                    force=force)
        _print_results(run_dir, as_html)


@app.command()
def metrics(
    matrix_csv: Annotated[Path, typer.Argument(help="CSV: checkpoint column, then one column per task")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """CL metrics (OP, BWT, FWT, gain, ...) of any checkpoint-by-task accuracy matrix."""
    from lorawatch.analysis.metrics import compute_cl_metrics, read_matrix_csv

    try:
        tasks, matrix = read_matrix_csv(matrix_csv)
        result = compute_cl_metrics(matrix, tasks)
    except UserError as error:
        _fail(str(error))
    except ValueError as error:
        _fail(f"{matrix_csv}: {error}")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"CL metrics of {matrix_csv}", title_justify="left")
    columns = ["checkpoint", "op", "bwt", "fwt", "avg_all", "gain", "delta_vs_base"]
    for column in columns:
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for row in result.to_dict()["per_checkpoint"]:
        table.add_row(*[str(row[c]) if c == "checkpoint" else ("—" if row[c] is None else f"{row[c]:.3f}")
                        for c in columns])
    console = Console()
    console.print(table)
    console.print("Summary: " + " · ".join(f"{k} {'—' if v is None else (f'{v:.3f}' if isinstance(v, float) else v)}"
                                          for k, v in result.summary.items()))


def _print_results(run_dir: Path, as_html: bool) -> None:
    """A finished run's tables on stdout; with --html, its page written and its path printed last."""
    from lorawatch.report.tables import load_run, print_results

    print_results(load_run(run_dir), Console())
    if as_html:
        from lorawatch.report.html import write_run_html

        print(write_run_html(run_dir, run_dir / "report.html"))


@app.command()
def show(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    as_html: Annotated[bool, typer.Option("--html", help="also write RUN_DIR/report.html: tables, figures, live "
                                                         "drift, costs and an example browser in one page that "
                                                         "opens offline")] = False,
) -> None:
    """Print a run folder's accuracy matrix, CL metrics and stability table."""
    try:
        _print_results(run_dir, as_html)
    except UserError as error:
        _fail(str(error))


@app.command()
def check(run_dirs: Annotated[list[Path], typer.Argument(help="run folders, finished or not")]) -> None:
    """Read every file of run folders against the run-folder schema; one line per problem (exit 1 if any)."""
    from lorawatch.rundir.lifecycle import is_run_folder
    from lorawatch.rundir.schema import SCHEMA_VERSION
    from lorawatch.rundir.check import check_run_folder

    problems = 0
    for run_dir in run_dirs:
        if not run_dir.is_dir() or not is_run_folder(run_dir):
            _fail(f"{run_dir}: not a lorawatch run folder")
        found = check_run_folder(run_dir)
        for line in found:
            typer.echo(line)
        problems += len(found)
        if not found:
            typer.echo(f"{run_dir}: every file fits the run-folder schema (this lorawatch writes version "
                       f"{SCHEMA_VERSION})")
    if problems:
        raise typer.Exit(1)


@app.command()
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
        _fail(str(error))
    print(result.out / "report.md")
    if page is not None:
        print(page)


@app.command()
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
        _fail(str(error))


@app.command()
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
    as_json: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
) -> None:
    """May this checkpoint ship? Exit 0 when no task regressed and every limit holds, 2 when a task regressed or a
    limit is exceeded (one line per reason), 1 on an error. Every seed of the run (every unit of a study) is gated.
    """
    from lorawatch.analysis.gate import gate as gate_run, parse_stage

    try:
        if alpha is not None and not 0 < alpha < 1:
            raise UserError(f"--alpha: expected a level between 0 and 1, got {alpha:g}")
        if max_nfr is not None and not 0 <= max_nfr <= 1:
            raise UserError(f"--max-nfr: expected a rate between 0 and 1, got {max_nfr:g}")
        if max_kl is not None and not max_kl >= 0:
            raise UserError(f"--max-kl: expected a KL of 0 or more, got {max_kl:g}")
        result = gate_run(run_dir, stage=parse_stage(stage, "--stage", ("last",)),
                          against=parse_stage(against, "--against", ("previous", "base")), alpha=alpha,
                          max_nfr=max_nfr, max_kl=max_kl)
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


@app.command()
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
        _fail(str(error))


@app.command()
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
            _fail(str(error))
    if folder is not None:
        _fail(f"unexpected argument {folder}; the study folder is given with --out")
    if backend not in ("local", "ray"):
        _fail(f"--backend: expected local or ray, got {backend!r}")
    if track not in (None, "mlflow", "tensorboard"):
        _fail(f"--track: expected mlflow or tensorboard, got {track!r}")
    with _long_command():
        code = run_study(Path(study_file), out, backend=backend, address=address, workers=workers, plan=plan,
                         as_html=as_html, console=Console(stderr=True), report_dir=report_dir, track=track)
    raise typer.Exit(code)


data_app = typer.Typer(no_args_is_help=True, help="The paper's datasets: download them, see where they are.")
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="dataset name, e.g. trace-500 (see `lorawatch data list`)")],
    dest: Annotated[Optional[Path], typer.Option(help="target folder (default: $LORAWATCH_DATA/<name>, "
                                                      "else ~/.local/share/lorawatch/data/<name>)")] = None,
    source: Annotated[Optional[str], typer.Option(help="a local folder or a base URL (http://, https://, file://) "
                                                       "instead of the authors' repository")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 30.0,
) -> None:
    """Download a dataset, verifying every file's SHA-256; files already there are not downloaded again.

    Progress goes to stderr; the dataset's folder is printed on stdout.
    """
    from lorawatch.data.fetch import fetch_dataset

    try:
        folder = fetch_dataset(name, dest, source, timeout=timeout,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: verified files are kept; run the same command again to finish\n")
        raise typer.Exit(130)
    except Terminated:  # SIGTERM (a scheduler's preemption, `kill`): as Ctrl-C, with the code `run` gives it
        sys.stderr.write("terminated (SIGTERM): verified files are kept; run the same command again to finish\n")
        raise typer.Exit(143)
    print(folder)


@data_app.command("list")
def data_list() -> None:
    """The known datasets, and whether and where each is installed."""
    from lorawatch.data.fetch import DATASETS, dataset_dir, human_size, verified_files

    for name, spec in DATASETS.items():
        folder = dataset_dir(name)
        count = verified_files(name)
        if count == len(spec.files):
            state = f"installed in {folder}"
        elif count:
            state = f"incomplete ({count} of {len(spec.files)} files verified) in {folder}"
        else:
            state = f"not installed (would go to {folder})"
        print(f"{name}: {state}")
        print(f"    {spec.description}; {len(spec.files)} files, {human_size(spec.total_size)}")
        print(f"    from {spec.repository}@{spec.commit[:12]} {spec.folder}")


class Terminated(Exception):
    """SIGTERM, as Ray, SLURM and Kubernetes send on preemption: handled like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    # Deprecation notices of the libraries are for their callers' developers, not for a user's terminal.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft)(\.|$)")
    signal.signal(signal.SIGTERM, _on_sigterm)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars: lorawatch shows its own progress
    app()


if __name__ == "__main__":
    main()
