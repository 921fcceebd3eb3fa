"""Running the protocol into a run folder: the inputs read and the folder planned before any model work, then
the recipe run with the folder's lock held, and a folder that never recorded anything removed again."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rich.console import Console

from lorawatch.config import ExperimentConfig
from lorawatch.data.inputs import load_data
from lorawatch.deploy.deployed import check_tools as check_deploy_tools
from lorawatch.integrations.tracking import RunLogger, check_destination as check_tracking
from lorawatch.recipe.monitor import MonitorParams, resolve_threshold
from lorawatch.recipe.protocol import Recipe, data_inputs
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir.schema import MonitorRecord
from lorawatch.rundir.lifecycle import FolderPlan, abandon_run_dir, plan_run_dir, run_lock, start_run_dir
from lorawatch.rundir.stage_files import environment

__all__ = ["deploy_finished_run", "resolve_monitor", "run_experiment", "run_recipe"]


def run_experiment(config: ExperimentConfig, run_dir: str | Path, *, console: Console | None = None,
                   overwrite: bool = False, force: bool = False, tracking_parent: str | None = None,
                   tracking_name: str | None = None) -> Path:
    """Run (or resume) the whole protocol into `run_dir` and return it.

    Data problems surface before any model work. A run folder that already holds this config is resumed:
    finished parts (a stage's training, a task's evaluation, a reference pass) are read back, the rest is
    computed, and the results are identical to an uninterrupted run. With `config.tracking`, each finished stage
    is also logged to MLflow or TensorBoard (tracking.py), as a child of `tracking_parent` when given, named
    `tracking_name` (default: the config's name).
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    if config.tracking is not None:
        check_tracking(config.tracking, run_dir)
    if config.deploy is not None:
        check_deploy_tools()
    data = load_data(config)
    monitor = resolve_monitor(config)
    plan = plan_run_dir(run_dir, config, data_inputs(data), overwrite=overwrite, force=force)
    recipe = Recipe(config, run_dir, data, console, plan.mode == "resume",
                    None if monitor is None else monitor.params)

    def after_start() -> None:
        if monitor is not None:
            RunFolder(run_dir).monitor_settings.write(monitor)
        if config.tracking is not None:
            recipe.tracker = RunLogger(run_dir, config.tracking, name=tracking_name, parent=tracking_parent)
            console.print(f"lorawatch: tracking to {recipe.tracker.where}")

    try:
        run_recipe(recipe, plan, after_start=after_start)
    except BaseException as error:
        if recipe.tracker is not None:
            recipe.tracker.abort(error)
        raise
    deploy_finished_run(recipe, config, console)
    return run_dir


def deploy_finished_run(recipe: Recipe, config: ExperimentConfig, console: Console) -> None:
    """The config's deploy section, once every stage is finished: the deployed forms are measured from the finished
    run's files by the same code as `lorawatch deploy` (deploy/deployed.py), which reads the PyTorch checkpoints'
    predictions it compares with, and a run's training and evaluation are not held up stage by stage by llama.cpp."""
    if config.deploy is None:
        return
    from lorawatch.deploy.deployed import deploy_after_run

    recipe.loaded = None  # the run's model (its adapter injected) is done with: the deployed forms load the base again
    deploy_after_run(recipe.run_dir, config, console)


def run_recipe(recipe: "Recipe", plan: FolderPlan, *, after_start: Callable[[], None] | None = None) -> None:
    """With the folder's lock held: set up (model, checks), start the folder (clear, record or resume it), then
    run. A command that fails before it recorded anything leaves no folder behind."""
    run_dir = recipe.run_dir
    try:
        with run_lock(run_dir):
            recipe.setup()
            # Every check has passed and the lock is held: only now is the folder cleared, recorded or resumed.
            for note in start_run_dir(run_dir, plan, recipe.config, recipe.fingerprint(), environment(recipe.loaded)):
                recipe.console.print(f"lorawatch: {note}")
            if after_start is not None:
                after_start()
            recipe.run()
    except BaseException:
        abandon_run_dir(run_dir, plan)
        raise


def resolve_monitor(config: ExperimentConfig) -> MonitorRecord | None:
    """monitor.json: the monitor's settings with any calibrated threshold worked out (before any model work)."""
    if config.monitor is None:
        return None
    settings = config.monitor
    threshold, calibration = resolve_threshold(settings.threshold, settings.calibrate_from, settings.signal)
    # The default signal is left out of monitor.json, as in folders written before there was a choice.
    signal = {} if settings.signal == "kl" else {"signal": settings.signal}
    params = MonitorParams(every=settings.every, action=settings.action, threshold=threshold,
                           relative=settings.relative, patience=settings.patience, **signal)
    return MonitorRecord(params=params, calibration=calibration)
