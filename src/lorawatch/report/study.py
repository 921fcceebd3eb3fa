"""A study: many finished run folders, grouped by (model, task order), read back per seed and aggregated.

The paper's tables are built from it in paper_tables.py, Figure 1's statistics in statistics.py.

Every number comes from the same code as `lorawatch metrics` and `lorawatch show`: each seed's accuracy
matrix, CL metrics and stability table are read with `tables.seed_tables` (which calls `compute_cl_metrics`
on the seed's own matrix), and seeds are aggregated with `metrics.mean_std_frames` (mean, sample std;
a metric undefined in any seed stays undefined).

Run folders with the same model spec and the same task order are one group: their seeds are merged (a seed
may appear only once). All runs must cover the same set of tasks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from lorawatch import store
from lorawatch.config import ExperimentConfig
from lorawatch.errors import UserError
from lorawatch.metrics import mean_std_frames
from lorawatch.tables import is_ordered, load_run, seed_tables

# Per step (row 0 = base): what the tables and figures need, all per seed before aggregation.
STEP_COLUMNS = ("learned_acc", "gain", "delta_vs_base", "avg_all", "op", "bwt", "fwt", "kl_mean",
                "entropy_mean_delta", "margin_mean_delta", "reference_accuracy")
_REQUIRED_STABILITY = ("kl_mean", "entropy_mean_delta", "margin_mean_delta")
ORDER_RANK = {"original": 0, "reversed": 1}


# --- collecting runs -------------------------------------------------------------------------------


@dataclass
class SeedResult:
    run_dir: Path
    seed: int
    matrix: pd.DataFrame     # checkpoint, then one column per task in training order
    metrics: pd.DataFrame    # compute_cl_metrics(...).to_frame()
    stability: pd.DataFrame  # per checkpoint: reference accuracy, KL to base, entropy/margin and deltas
    steps: pd.DataFrame      # checkpoint + STEP_COLUMNS


@dataclass
class Group:
    """One model trained in one task order: the seeds of one or more run folders."""

    spec: str
    order: str                  # "original", "reversed", or "A → B → C"
    tasks: tuple[str, ...]      # training order
    config: ExperimentConfig    # of the first run folder
    run_dirs: list[Path] = field(default_factory=list)
    per_seed: list[SeedResult] = field(default_factory=list)
    model: str = ""             # display name
    mean: pd.DataFrame | None = None  # checkpoint + STEP_COLUMNS, mean over seeds
    std: pd.DataFrame | None = None   # sample std over seeds (0 for one seed)
    matrix_mean: pd.DataFrame | None = None
    matrix_std: pd.DataFrame | None = None

    @property
    def seeds(self) -> list[int]:
        return [s.seed for s in self.per_seed]

    @property
    def label(self) -> str:
        return f"{self.model} · {self.order}"


@dataclass
class Study:
    groups: list[Group]
    task_set: frozenset[str]

    @property
    def models(self) -> list[str]:
        """Display names, in the order their first run folder was given."""
        return list(dict.fromkeys(g.model for g in self.groups))

    @property
    def orders(self) -> list[str]:
        labels = list(dict.fromkeys(g.order for g in self.groups))
        return sorted(labels, key=lambda o: (ORDER_RANK.get(o, 2), labels.index(o)))

    def groups_of(self, model: str) -> list[Group]:
        return [g for g in self.groups if g.model == model]

    def group(self, model: str, order: str) -> Group | None:
        return next((g for g in self.groups if g.model == model and g.order == order), None)


def model_display_name(spec: str) -> str:
    """The last path part of a model spec: `Qwen/Qwen3.5-0.8B` -> `Qwen3.5-0.8B`."""
    parts = [p for p in re.split(r"[\\/]", spec.strip()) if p]
    return parts[-1] if parts else spec


def order_label(config: ExperimentConfig) -> str:
    return config.order if isinstance(config.order, str) else " → ".join(config.order)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def _protocol_fingerprint(config: ExperimentConfig) -> dict:
    """The settings that must agree for seeds of two run folders to be merged (data paths may differ)."""
    data = config.model_dump(mode="json")
    return {
        "lora": data["lora"],
        "train": data["train"],
        "eval.max_new_tokens": data["eval"]["max_new_tokens"],
        "tasks": [{k: v for k, v in t.items() if k not in ("train", "test")} for t in data["tasks"]],
        "reference": {k: v for k, v in data["reference"].items() if k != "path"},
    }


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{prefix}{key}.")
            return f"{prefix}{key}"
    return None


def _read_seed(run_dir: Path, seed: int, tasks: list[str]) -> SeedResult:
    for k in range(len(tasks) + 1):
        folder = store.stage_dir(run_dir, seed, k)
        for name in ("stage.json", "scores.json", "reference_stats.json"):
            if not (folder / name).is_file():
                raise UserError(f"{run_dir}: the run has not finished (seed {seed} has no "
                                f"{folder.name}/{name})")
    try:
        matrix, metrics, stability = seed_tables(run_dir, seed)
    except KeyError as exc:
        raise UserError(f"{run_dir}: seed {seed}: a stage's scores.json has no accuracy for task {exc}") from None
    except (OSError, ValueError) as exc:  # unreadable JSON, or a matrix compute_cl_metrics rejects
        raise UserError(f"{run_dir}: seed {seed}: cannot read its results ({exc})") from None
    if not is_ordered(matrix):
        raise UserError(f"{run_dir}: the task each checkpoint was trained on is not known (evaluated without "
                        "--trained-on); the paper's tables need it: run `lorawatch evaluate` again with --trained-on")
    found = list(matrix.columns[1:])
    if found != tasks:
        raise UserError(f"{run_dir}: seed {seed} has stages for tasks {', '.join(found)} but config.json trains "
                        f"{', '.join(tasks)}")
    missing = [c for c in _REQUIRED_STABILITY if c not in stability.columns]
    if missing:
        raise UserError(f"{run_dir}: seed {seed}: reference_stats.json lacks {', '.join(missing)}")
    R = matrix[tasks].to_numpy(dtype=float)
    learned = [math.nan] + [R[k, k - 1] for k in range(1, len(tasks) + 1)]
    steps = pd.DataFrame({"checkpoint": matrix["checkpoint"].to_list(), "learned_acc": learned})
    for column in ("gain", "delta_vs_base", "avg_all", "op", "bwt", "fwt"):
        steps[column] = metrics[column].to_numpy(dtype=float)
    for column in ("kl_mean", "entropy_mean_delta", "margin_mean_delta", "reference_accuracy"):
        steps[column] = stability[column].to_numpy(dtype=float)
    return SeedResult(run_dir, seed, matrix, metrics, stability, steps)


def load_study(run_dirs: Sequence[str | Path]) -> Study:
    """Read and group finished run folders. Bad input raises UserError naming the folder."""
    if not run_dirs:
        raise UserError("give at least one run folder")
    groups: dict[tuple[str, str], Group] = {}
    seen: dict[Path, Path] = {}
    task_set: frozenset[str] | None = None
    first_dir: Path | None = None
    for given in run_dirs:
        run_dir = Path(given)
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: not a folder (expected a lorawatch run folder)")
        resolved = run_dir.resolve()
        if resolved in seen:
            raise UserError(f"{run_dir}: given twice (also as {seen[resolved]})")
        seen[resolved] = run_dir
        try:
            results = load_run(run_dir)
        except (OSError, ValueError) as exc:
            raise UserError(f"{run_dir}: cannot read config.json ({exc})") from None
        config = results.config
        tasks = results.tasks
        if task_set is None:
            task_set, first_dir = frozenset(tasks), run_dir
        elif frozenset(tasks) != task_set:
            raise UserError(f"{run_dir}: its tasks ({', '.join(sorted(tasks))}) differ from those of {first_dir} "
                            f"({', '.join(sorted(task_set))}); a report compares runs on the same tasks")
        key = (config.model.spec, order_label(config))
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(spec=config.model.spec, order=key[1], tasks=tuple(tasks), config=config)
        else:
            other = group.run_dirs[0]
            if tuple(tasks) != group.tasks:
                raise UserError(f"{run_dir}: trains {' → '.join(tasks)} but {other} (same model and order "
                                f"{key[1]!r}) trains {' → '.join(group.tasks)}")
            difference = _first_difference(_protocol_fingerprint(config), _protocol_fingerprint(group.config))
            if difference:
                raise UserError(f"{run_dir}: field '{difference}' differs from {other} (same model and order); "
                                "seeds of runs with different settings cannot be merged")
        for seed in config.seeds:
            clash = next((s.run_dir for s in group.per_seed if s.seed == seed), None)
            if clash is not None:
                raise UserError(f"{run_dir}: seed {seed} of {config.model.spec} ({key[1]} order) is also in "
                                f"{clash}; each seed may appear only once")
            group.per_seed.append(_read_seed(run_dir, seed, tasks))
        group.run_dirs.append(run_dir)

    ordered = list(groups.values())
    names = {g.spec: model_display_name(g.spec) for g in ordered}
    for group in ordered:
        shared = [s for s, n in names.items() if n == names[group.spec]]
        group.model = names[group.spec] if len(shared) == 1 else group.spec
        group.mean, group.std = mean_std_frames([s.steps for s in group.per_seed], index_col="checkpoint")
        group.matrix_mean, group.matrix_std = mean_std_frames([s.matrix for s in group.per_seed],
                                                              index_col="checkpoint")
    # models in the order they were first given, then original, reversed, other orders
    first = {m: i for i, m in reversed(list(enumerate(g.model for g in ordered)))}
    ordered.sort(key=lambda g: (first[g.model], ORDER_RANK.get(g.order, 2)))
    return Study(ordered, task_set or frozenset())
