"""lorawatch: sequential LoRA personalization of small language models, with stability monitoring.

    config = lorawatch.preset("demo")            # or lorawatch.load_config("exp.yaml")
    run_dir = lorawatch.run(config, "runs/demo")
    results = lorawatch.load_run(run_dir)        # data frames: accuracy_matrix(), cl_metrics(), stability()
    lorawatch.evaluate(config, ["out/task-a", "out/task-b"], "runs/theirs", trained_on=["a", "b"])
    lorawatch.run_study("study/demo-lr-sweep.yaml", backend="ray")   # a grid of runs, then the report over them
"""

from lorawatch.config import ExperimentConfig, build_config, load_config
from lorawatch.errors import ConfigError, DataError, ModelSpecError, UserError
from lorawatch.analysis.metrics import ClMetrics, compute_cl_metrics, read_matrix_csv
from lorawatch.presets import preset
from lorawatch.report.tables import RunResults, load_run

__version__ = "0.1.0"


def run(config: ExperimentConfig, run_dir, *, overwrite: bool = False):
    """Run the protocol into `run_dir` (see lorawatch.recipe.run.run_experiment); returns the run folder."""
    from lorawatch.recipe.run import run_experiment

    return run_experiment(config, run_dir, overwrite=overwrite)


def evaluate(config: ExperimentConfig, adapters, run_dir, *, trained_on: list[str] | None = None,
             overwrite: bool = False):
    """Evaluate adapters trained elsewhere into `run_dir` (see lorawatch.recipe.external_adapters); returns the run folder."""
    from lorawatch.recipe.external_adapters import evaluate_adapters

    return evaluate_adapters(config, adapters, run_dir, trained_on=trained_on, overwrite=overwrite)


def run_study(study_file, out=None, *, backend: str = "local", address: str | None = None,
              workers: int | None = None, track: str | None = None):
    """Run a study from STUDY.yaml (see lorawatch.study.spec); returns its folder. A unit that did not finish is a
    UserError naming it (the finished ones are kept: calling again resumes)."""
    from pathlib import Path

    from rich.console import Console

    from lorawatch.study.folder import study_states
    from lorawatch.study.spec import load_study_file
    from lorawatch.study.driver import run_study as drive

    out = Path(out) if out is not None else Path("runs") / load_study_file(study_file).name
    code = drive(Path(study_file), out, backend=backend, address=address, workers=workers, plan=False,
                     as_html=False, console=Console(stderr=True), track=track)
    if code:
        failed = [s.name for s in study_states(out) if s.state != "done"]
        raise UserError(f"{out}: unit(s) {', '.join(failed)} did not finish; `lorawatch study status {out}` says why")
    return out


__all__ = [
    "ClMetrics", "ConfigError", "DataError", "ExperimentConfig", "ModelSpecError", "RunResults", "UserError",
    "build_config", "compute_cl_metrics", "evaluate", "load_config", "load_run", "preset", "read_matrix_csv", "run",
    "run_study",
]
