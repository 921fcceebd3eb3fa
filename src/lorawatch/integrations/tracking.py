"""Experiment tracking: a run folder logged to MLflow or TensorBoard, live during `lorawatch run` (a `tracking`
section or `--track`) or after the fact (`lorawatch track`, `export_run`).

Everything logged is read back from the run folder, never from a run's memory, so that live logging and an
export are the same code and log the same keys. The run folder's `tracking.json` records, per destination,
the tracker run and the stages already logged: a resumed run continues the same tracker run, and exporting a
folder again logs nothing twice. A study is a parent tracker run with its units as children (MLflow: the
`mlflow.parentRunId` tag; TensorBoard: the children's log folders inside the parent's).

mlflow and tensorboard are optional (`pip install 'lorawatch[mlflow]'`, `'lorawatch[tensorboard]'`) and
imported only in trackers.py, when a tracker is opened. Where a run goes, and whether it can go there, is worked
out in tracking_destination.py.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from lorawatch.rundir import schema
from lorawatch.rundir.layout import RunFolder, Stage
from lorawatch.analysis import significance, verdicts
from lorawatch.config import ExperimentConfig, TrackingSettings
from lorawatch.errors import UserError
from lorawatch.integrations.trackers import Tracker, flatten_params, open_parent, open_tracker
from lorawatch.integrations.tracking_destination import BACKENDS, check_destination, destination, require, resolve

# The Python API of docs/tracking.md, the trackers and their destinations included
__all__ = ["RunLogger", "Tracker", "check_destination", "check_finished", "export_run", "export_settings",
           "open_parent", "open_tracker", "require", "resolve", "statistics_metrics"]

_ARTIFACT_TABLES = ("accuracy_matrix", "cl_metrics", "stability")


# --- what a run logs -----------------------------------------------------------------------------------------------

class RunLogger:
    """Logs one run folder to one tracker run, reading only the folder: `stage` after each finished stage,
    `finish` once the tables are written, `abort` when the run stops on an error or an interruption (the run is
    then FAILED or KILLED in MLflow, and a resume reopens it)."""

    def __init__(self, run_dir: Path, settings: TrackingSettings, *, home: Path | None = None,
                 name: str | None = None, parent: str | None = None):
        from lorawatch.report.tables import load_run_config

        self.run_dir = Path(run_dir)
        config = load_run_config(self.run_dir)
        self.seeds, self.tasks = list(config.seeds), [t.name for t in config.ordered_tasks()]
        self.statistics = config.statistics  # the settings the seeds' verdicts are read (or computed) with
        name = name or config.name
        home = self.run_dir if home is None else Path(home)
        key = destination(settings, home, name, parent)
        self.folder = RunFolder(self.run_dir)
        record = self.folder.tracking
        self.entries = [e.model_dump() for e in record.load().runs] if record.exists() else []
        self.entry = next((e for e in self.entries if e["destination"] == key), None)
        self.tracker = None
        if self.entry is not None and self.entry["finished"]:
            return  # everything is logged: nothing to open
        params = {k: v for k, v in config.model_dump(mode="json").items() if k != "tracking"}
        self.tracker = open_tracker(settings, home, name, parent=parent,
                                    run_id=None if self.entry is None else self.entry["run_id"],
                                    tags={"lorawatch.run_dir": str(self.run_dir.resolve())})
        if self.tracker.new:
            if self.entry is not None:  # the recorded run is gone from the store: log everything again
                self.entries.remove(self.entry)
            self.entry = {"destination": key, "run_id": self.tracker.run_id, "where": self.tracker.where,
                          "logged": {}, "finished": False}
            self.entries.append(self.entry)
            self.tracker.log_params(flatten_params(params))
            self._save()

    @property
    def where(self) -> str:
        return self.entry["where"] + ("" if self.tracker else " (logged before)")

    def _save(self) -> None:
        self.folder.tracking.write({"runs": self.entries})

    def _prefix(self, seed: int) -> str:
        return f"seed{seed}/" if len(self.seeds) > 1 else ""

    def stage(self, seed: int, stage: int) -> None:
        """Log the seed's finished stages up to `stage` that are not logged yet (a resumed run's earlier ones
        too), in order."""
        if self.tracker is None:
            return
        logged = self.entry["logged"].setdefault(str(seed), [])
        offset = 0  # optimizer steps of the earlier stages: train/loss and drift/* run on one axis per seed
        for k in range(stage + 1):
            folder = self.folder.stage(seed, k)
            if not folder.finished():
                return  # not finished: neither it nor a later stage is final
            record = folder.record.load()
            if k not in logged:
                self._log_stage(seed, k, folder, record, offset)
                logged.append(k)
                self._save()
            offset += record.training.optimizer_steps if record.training else 0

    def _log_stage(self, seed: int, stage: int, folder: Stage, record: schema.StageRecord, offset: int) -> None:
        prefix, log = self._prefix(seed), self.tracker.log_metrics
        for i, loss in enumerate(record.training.step_losses if record.training else []):
            log({f"{prefix}train/loss": loss}, offset + i + 1)
        if folder.monitor_series.exists():
            for point in folder.monitor_series.load():
                drift = {"kl_mean": point.kl_mean, "entropy_mean": point.entropy_mean,
                         "margin_mean": point.margin_mean, "threshold": point.threshold}
                log({f"{prefix}drift/{k}": v for k, v in drift.items() if v is not None}, offset + point.step)
        scores = folder.scores.load().accuracy()
        stats = folder.reference_stats.load().body()
        log({**{f"{prefix}stage/accuracy/{task}": value for task, value in scores.items()},
             **{f"{prefix}stage/{_stat_name(key)}": value for key, value in stats.items()}}, stage)

    def finish(self) -> None:
        """Log what is left of a finished run (its stages, the CL metrics, the summary, the artifacts) and close
        the tracker run as FINISHED."""
        if self.tracker is None:
            return
        summary = self.folder.summary.load()
        for seed in self.seeds:
            self.stage(seed, len(self.tasks))
            metrics = self.folder.seed(seed).cl_metrics.load()
            for step, row in enumerate(metrics.per_checkpoint):
                self.tracker.log_metrics({f"{self._prefix(seed)}cl/{k}": v for k, v in row.model_dump().items()
                                          if isinstance(v, float)}, step)
            self._log_statistics(seed, [row.checkpoint for row in metrics.per_checkpoint],
                                 set(summary.per_seed.get(str(seed), {})))
        for seed, values in summary.per_seed.items():
            self.tracker.log_metrics(_numbers(values, f"{self._prefix(int(seed))}summary/"), 0)
        if len(self.seeds) > 1:
            self.tracker.log_metrics(_numbers(self._over_seeds(summary), "summary/"), 0)
        for path, folder in self._artifacts():
            self.tracker.log_artifact(path, folder)
        self.entry["finished"] = True
        self._save()
        self.tracker.close("FINISHED")

    def _over_seeds(self, summary: schema.Summary) -> dict[str, float | None]:
        """Each headline number's mean, std and t interval over seeds. The interval is computed from the per-seed
        values, as the terminal and the page do, so that a summary written before it had intervals gets one."""
        values: dict[str, float | None] = {}
        for key, stat in summary.mean_std.items():
            interval = significance.seed_interval([summary.per_seed[str(s)].get(key) for s in self.seeds
                                                   if str(s) in summary.per_seed], self.statistics.confidence)
            low, high = interval or (None, None)
            values.update({key: stat.mean, f"{key}_std": stat.std, f"{key}_ci_low": low, f"{key}_ci_high": high})
        return values

    def _log_statistics(self, seed: int, checkpoints: list[str], in_summary: set[str]) -> None:
        """The seed's verdicts and intervals. Logged here, with the run's end, and not per stage: they exist once
        the seed has finished (statistics.json is written with its tables), and a finished tracker run logs
        nothing again, so each is logged once."""
        record = verdicts.load_seed_statistics(self.run_dir, seed, self.statistics)
        prefix = self._prefix(seed)
        for step, values in sorted(statistics_metrics(record, checkpoints, in_summary).items()):
            self.tracker.log_metrics({prefix + key: value for key, value in values.items() if value is not None},
                                     step)

    def _artifacts(self) -> list[tuple[Path, str]]:
        run = self.folder
        found = [(run.config, ""), (self.run_dir / "report.html", "")]
        for seed in self.seeds:
            seed_folder = run.seed(seed)
            found += [(seed_folder.table(t).path, seed_folder.path.name) for t in _ARTIFACT_TABLES]
        found += [(run.summary_table(t, s).path, run.summary_folder.name)
                  for t in _ARTIFACT_TABLES for s in ("mean", "std")]
        return [(path, folder) for path, folder in found if path.is_file()]

    def abort(self, error: BaseException) -> None:
        """The run stopped: KILLED on Ctrl-C, FAILED on any other error; a resume reopens the same run."""
        if self.tracker is not None:
            self.tracker.close("FAILED" if isinstance(error, Exception) else "KILLED")


def _stat_name(key: str) -> str:
    """reference_stats.json's fields under the paper's words: kl_mean -> kl_to_base, kl_p95 -> kl_to_base_p95,
    margin_mean_delta -> margin_delta."""
    stat, which, *delta = key.split("_")
    return "_".join([{"kl": "kl_to_base"}.get(stat, stat), *([] if which == "mean" else [which]), *delta])


def statistics_metrics(record: schema.StatisticsRecord, checkpoints: list[str],
                       in_summary: Collection[str] = ()) -> dict[int, dict[str, float | None]]:
    """A seed's statistics record as tracked metrics, by step (the checkpoint's stage, as stage/ and cl/ use):

        verdict/vs_previous/regressed_tasks      tasks the checkpoint is worse on than the previous one (and
        verdict/vs_previous/improved_tasks       better on); vs_base/ the same against the base model
        verdict/vs_previous/max_negative_flip_rate
        verdict/vs_previous/<task>/{p_adjusted,difference,ci_low,ci_high,negative_flip_rate}
        verdict/vs_previous/kl_change{,_ci_low,_ci_high}   KL to base's change with its paired interval
        stage/accuracy_ci_low/<task>, stage/accuracy_ci_high/<task>     Wilson interval of stage/accuracy/<task>
        stage/kl_to_base_ci_low, stage/kl_to_base_ci_high               bootstrap interval of stage/kl_to_base
        cl/<metric>_ci_low, cl/<metric>_ci_high                         bootstrap interval of cl/<metric>
        summary/<metric>_ci_low, summary/<metric>_ci_high (step 0)      of the headline numbers
        summary/<metric> (step 0)        a headline number summary.json does not hold (`in_summary`: those it
                                         does, logged from there), e.g. final_avg_vs_base
    """
    step_of = {name: k for k, name in reversed(list(enumerate(checkpoints)))}  # the first stage of a name
    by_step: dict[int, dict[str, float | None]] = {}
    for c in record.comparisons:
        by_step.setdefault(c.stage, {}).update(_comparison_metrics(c))
    intervals = [(a.checkpoint, {f"stage/accuracy_ci_low/{a.task}": a.low, f"stage/accuracy_ci_high/{a.task}": a.high})
                 for a in record.accuracy]
    intervals += [(m.checkpoint, {f"cl/{m.metric}_ci_low": m.low, f"cl/{m.metric}_ci_high": m.high})
                  for m in record.metrics]
    intervals += [(d.checkpoint, {"stage/kl_to_base_ci_low": d.low, "stage/kl_to_base_ci_high": d.high})
                  for d in record.drift]
    for checkpoint, values in intervals:
        if checkpoint in step_of:
            by_step.setdefault(step_of[checkpoint], {}).update(values)
    headline = by_step.setdefault(0, {})
    for h in record.headline:
        headline.update({f"summary/{h.metric}_ci_low": h.low, f"summary/{h.metric}_ci_high": h.high})
        if h.metric not in in_summary:
            headline[f"summary/{h.metric}"] = h.value
    return by_step


def _comparison_metrics(c: schema.Comparison) -> dict[str, float | None]:
    """One comparison's counts, worst negative flip rate, per-task test and interval, and KL change."""
    base = f"verdict/vs_{c.against}/"
    values: dict[str, float | None] = {
        f"{base}regressed_tasks": float(len(c.regressed())),
        f"{base}improved_tasks": float(sum(t.verdict == "improved" for t in c.tasks)),
        f"{base}max_negative_flip_rate": max((t.negative_flip_rate for t in c.tasks), default=0.0)}
    for t in c.tasks:
        values.update({f"{base}{t.task}/{field}": getattr(t, field)
                       for field in ("p_adjusted", "difference", "ci_low", "ci_high", "negative_flip_rate")})
    if c.kl_before is not None and c.kl_after is not None:  # a comparison from before KL changes has none
        values.update({f"{base}kl_change": c.kl_after - c.kl_before, f"{base}kl_change_ci_low": c.kl_ci_low,
                       f"{base}kl_change_ci_high": c.kl_ci_high})
    return values


def _numbers(values: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --- after the fact --------------------------------------------------------------------------------------------------

def _run_config(run_dir: Path) -> ExperimentConfig:
    from lorawatch.rundir.lifecycle import is_run_folder
    from lorawatch.report.tables import load_run_config

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder")
    if not is_run_folder(run_dir):
        raise UserError(f"{run_dir}: not a lorawatch run folder")
    return load_run_config(run_dir)


def check_finished(run_dir: Path) -> None:
    """A one-line error unless `run_dir` is a finished run folder (naming the first stage that is missing)."""
    config = _run_config(run_dir)
    run = RunFolder(run_dir)
    if run.summary.exists():
        return  # written once every seed's every stage is
    missing = next((f"seed {seed} stage {stage} has not finished" for seed in config.seeds
                    for stage in range(len(config.tasks) + 1) if not run.stage(seed, stage).finished()),
                   f"no {run.summary.path.relative_to(run_dir).as_posix()}")
    raise UserError(f"{run_dir}: the run has not finished ({missing}); run the same command again to finish it "
                    "before tracking it")


def export_run(run_dir: Path, settings: TrackingSettings, *, home: Path | None = None, name: str | None = None,
               parent: str | None = None) -> str:
    """Log a finished run folder completely and return where it went (one line). `home` (default: the run
    folder) holds the default store, `name` (default: the config's name) names the tracker run, `parent` makes it
    a child. Exporting again to the same destination logs nothing twice (tracking.json)."""
    from lorawatch.rundir.lifecycle import run_lock

    run_dir = Path(run_dir)
    check_finished(run_dir)
    check_destination(settings, home or run_dir)
    with run_lock(run_dir):  # tracking.json has one writer, like the rest of the folder
        logger = RunLogger(run_dir, settings, home=home, name=name, parent=parent)
        logger.finish()
        return logger.where


def export_settings(run_dir: Path, backend: str | None = None, uri: str | None = None,
                    experiment: str | None = None) -> TrackingSettings:
    """`lorawatch track`'s settings for a run: the run's own `tracking` section (else MLflow), with what the
    command line gives instead."""
    if backend is not None and backend not in BACKENDS:
        raise UserError(f"tracking backend {backend!r}: expected {' or '.join(BACKENDS)}")
    recorded = _run_config(Path(run_dir)).tracking
    if recorded is not None and (backend is None or backend == recorded.backend):
        base = recorded.model_dump()
    else:
        base = {"backend": backend or "mlflow"}
    changes = {k: v for k, v in {"uri": uri, "experiment": experiment}.items() if v is not None}
    return TrackingSettings(**{**base, **changes})
