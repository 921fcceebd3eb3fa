"""`lorawatch check`: a whole run folder read against the schema, one line per problem."""

from __future__ import annotations

from pathlib import Path

from lorawatch.rundir import store
from lorawatch.rundir.layout import (
    ADAPTER_FOLDER,
    PREDICTIONS_FOLDER,
    RECORDS,
    ROWS,
    TRACKER_STORES,
    RunFolder,
    Stage,
)
from lorawatch.rundir.schema import TABLE_COLUMNS


def check_run_folder(run_dir: Path) -> list[str]:
    """Every file of a run folder read against its schema: one line per problem (none for a sound folder)."""
    from lorawatch.config import build_config
    from lorawatch.data.tasks.scoring import Prediction
    from lorawatch.errors import ConfigError

    run = RunFolder(run_dir)
    problems = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(run_dir)
        if ADAPTER_FOLDER in relative.parts or relative.parts[0] in TRACKER_STORES:
            continue  # PEFT's own format; a tracker's (copies of the run's files, event files)
        table = path.stem.removesuffix("_mean").removesuffix("_std")
        try:
            if path == run.config:
                build_config(store.read_json(path), source=str(path))
            elif path.name in RECORDS:
                store.read_record(path, RECORDS[path.name])
            elif path.parent.name == PREDICTIONS_FOLDER and path.suffix == ".jsonl":
                store.read_rows(path, Prediction)
            elif path.name in ROWS:
                store.read_rows(path, ROWS[path.name])
            elif path.suffix == ".csv" and table in TABLE_COLUMNS:
                store.read_table(path, table)
        except (ConfigError, store.NewerRecordError) as exc:
            problems.append(str(exc))
        except (OSError, ValueError) as exc:
            problems.append(store.describe_problem(path, exc))
    return problems + missing_stage_files(run_dir)


def missing_stage_files(run_dir: Path) -> list[str]:
    """A finished stage (one with stage.json) lacks none of the files its results are read from: one line per
    missing file. Its adapter is not among them: results are shared without their adapters, and a resume redoes
    a stage whose adapter is missing."""
    run = RunFolder(run_dir)
    problems = []
    for seed in run.seeds_on_disk():
        for k in run.seed(seed).stages_on_disk():
            stage = run.stage(seed, k)
            if not stage.finished():
                continue
            problems += [f"{path}: missing; the stage is marked finished ({stage.record.path.name}) without it"
                         for path in stage.result_files(_scored_tasks(stage)) if not path.is_file()]
    return problems


def _scored_tasks(stage: Stage) -> list[str]:
    try:
        scores = store.read_json(stage.scores.path)
    except (OSError, ValueError):
        return []  # already reported, file by file
    return [t for t in scores if t not in ("reference", "schema_version")] if isinstance(scores, dict) else []
