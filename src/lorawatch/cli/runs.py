"""`lorawatch run` and `lorawatch evaluate`: the commands that compute into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lorawatch.cli.common import long_command, parse_seeds, parse_set_options, print_run_results


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
    monitor_signal: Annotated[Optional[str], typer.Option(help="monitor: what the threshold applies to: kl "
                                                               "(default), kl_forward, top1_change, top5_change, "
                                                               "gold_drop")] = None,
    monitor_threshold: Annotated[Optional[float], typer.Option(help="monitor: absolute threshold on the signal "
                                                                    "(KL by default)")] = None,
    monitor_relative: Annotated[Optional[float], typer.Option(help="monitor: threshold as a multiple of the "
                                                                   "previous checkpoint's value")] = None,
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
    from lorawatch.recipe.run import run_experiment

    with long_command():
        config = base_config(config_file, preset_name)
        changes = {"model.spec": model, "model.device": device, "model.dtype": dtype,
                   "seeds": parse_seeds(seeds) if seeds is not None else None,
                   "order": (order if order in ("original", "reversed") else [n.strip() for n in order.split(",")])
                   if order is not None else None,
                   "tasks.*.max_train_rows": max_train_rows, "tasks.*.max_test_rows": max_test_rows,
                   "eval.max_new_tokens": max_new_tokens,
                   **({f"eval.{part}": False for part in PLAIN_SWITCHES} if plain else {})}
        changes.update({"monitor.action": monitor, "monitor.threshold": monitor_threshold,
                        "monitor.relative": monitor_relative, "monitor.every": monitor_every,
                        "monitor.patience": monitor_patience, "monitor.signal": monitor_signal,
                        "monitor.calibrate_from": monitor_calibrate_from, "tracking.backend": track})
        changes.update(parse_set_options(set_fields or []))
        config = with_changes(config, changes, preset_name)
        console = Console(stderr=True)
        run_dir = run_experiment(config, out or Path("runs") / config.name, console=console, overwrite=overwrite,
                                 force=force)
        print_run_results(run_dir, as_html)


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

    with long_command():
        config = with_changes(base_config(config_file, preset_name), {
            "model.spec": model, "model.device": device, "model.dtype": dtype,
            "tasks.*.max_test_rows": max_test_rows, "eval.max_new_tokens": max_new_tokens,
            **({f"eval.{part}": False for part in PLAIN_SWITCHES} if plain else {})}, preset_name)
        order = None if trained_on is None else [name.strip() for name in trained_on.split(",") if name.strip()]
        run_dir = evaluate_adapters(config, adapters, out or Path("runs") / f"{config.name}-evaluate",
                                    trained_on=order, seed=seed, console=Console(stderr=True), overwrite=overwrite,
                                    force=force)
        print_run_results(run_dir, as_html)
