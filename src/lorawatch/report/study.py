"""A study: many finished run folders, grouped by (model, task order), read back per seed and aggregated.

The paper's tables are built from it in paper_tables.py, Figure 1's statistics in statistics.py.

Every number comes from the same code as `lorawatch metrics` and `lorawatch show`: each seed's accuracy
matrix, CL metrics and stability table are read with `tables.seed_tables` (which calls `compute_cl_metrics`
on the seed's own matrix), and seeds are aggregated with `metrics.mean_std_frames` (mean, sample std;
a metric undefined in any seed stays undefined).

Run folders with the same model spec, task order and settings are one group: their seeds are merged (a seed
may appear only once). Runs of one model that differ in a setting (a study's grid axis: a learning rate, a
dtype, a monitor) are groups of their own, named after what differs ("SmolLM2 [train.learning_rate=0.0001]").
All runs must cover the same set of tasks. Within a (model, task order), `setting_pairs` sets each such group
against a baseline group for the report's paired comparisons.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from lorawatch.rundir.layout import CONFIG, REFERENCE_STATS, SCORES, RunFolder
from lorawatch.config import ExperimentConfig
from lorawatch.errors import UserError
from lorawatch.analysis.metrics import mean_std_frames
from lorawatch.report.tables import is_ordered, load_run, seed_tables

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
    settings: dict              # _protocol_fingerprint of its runs, flattened
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
class StudyResults:
    """Finished run folders grouped by model, task order and settings, each group's seeds read back."""

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
    """The settings that must agree for seeds of two run folders to be merged (data paths and the evaluation's
    fast-path switches, which are exact, may differ), flattened to dotted fields."""
    data = config.model_dump(mode="json")
    return _flatten({
        "model": {"dtype": data["model"]["dtype"]},
        "lora": data["lora"],
        "train": data["train"],
        "eval": {"max_new_tokens": data["eval"]["max_new_tokens"]},
        "tasks": {t["name"]: {k: v for k, v in t.items() if k not in ("name", "train", "test")}
                  for t in data["tasks"]},
        "reference": {k: v for k, v in data["reference"].items() if k != "path"},
        "monitor": data["monitor"] or "none",
        "strategy": data["strategy"],
    })


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _variant_labels(groups: list[Group]) -> dict[int, str]:
    """For models with groups of different settings: each group's label, the fields that differ between them
    (a strategy or a monitor as one part: `strategy=replay(count=3)`, `monitor=none`)."""
    labels = {}
    for spec in dict.fromkeys(g.spec for g in groups):
        same = [g for g in groups if g.spec == spec]
        fields = list(dict.fromkeys(f for g in same for f in g.settings))
        varying = [f for f in fields if len({repr(g.settings.get(f)) for g in same}) > 1]
        for g in same:
            parts = {}
            for f in varying:
                section = f.split(".", 1)[0]
                if section in ("strategy", "monitor"):
                    parts[section] = f"{section}={_section_text(g.settings, section)}"
                else:
                    parts[f] = f"{f}={_short(g.settings.get(f))}"
            # a strategy or monitor that is not there says nothing beside one that is: "[strategy=replay(...)]"
            shown = [p for p in parts.values() if p not in ("strategy=none", "monitor=none")]
            if parts:
                labels[id(g)] = ", ".join(shown) or "none"
    return labels


def _section_text(settings: dict, section: str) -> str:
    """A strategy's or a monitor's settings in a few words: its name (or action), then what else it sets."""
    values = {f.split(".", 1)[1]: v for f, v in settings.items() if f.startswith(f"{section}.") and v is not None}
    head = values.pop("name", None) or values.pop("action", None) or "none"
    return head + (f"({', '.join(f'{k}={_short(v)}' for k, v in values.items())})" if values else "")


def _short(value) -> str:
    return value if isinstance(value, str) else ("none" if value is None else repr(value))


def _read_seed(run_dir: Path, seed: int, tasks: list[str]) -> SeedResult:
    for k in range(len(tasks) + 1):
        stage = RunFolder(run_dir).stage(seed, k)
        for record in (stage.record, stage.scores, stage.reference_stats):
            if not record.exists():
                raise UserError(f"{run_dir}: the run has not finished (seed {seed} has no "
                                f"{stage.path.name}/{record.path.name})")
    try:
        matrix, metrics, stability = seed_tables(run_dir, seed)
    except KeyError as exc:
        raise UserError(f"{run_dir}: seed {seed}: a stage's {SCORES} has no accuracy for task {exc}") from None
    except (OSError, ValueError) as exc:  # unreadable JSON, or a matrix compute_cl_metrics rejects
        raise UserError(f"{run_dir}: seed {seed}: cannot read its results ({exc})") from None
    if not is_ordered(matrix):
        raise UserError(f"{run_dir}: the task each checkpoint was trained on is not known (evaluated without "
                        "--trained-on); the paper's tables need it: run `lorawatch evaluate` again with --trained-on")
    found = list(matrix.columns[1:])
    if found != tasks:
        raise UserError(f"{run_dir}: seed {seed} has stages for tasks {', '.join(found)} but {CONFIG} trains "
                        f"{', '.join(tasks)}")
    missing = [c for c in _REQUIRED_STABILITY if c not in stability.columns]
    if missing:
        raise UserError(f"{run_dir}: seed {seed}: {REFERENCE_STATS} lacks {', '.join(missing)}")
    R = matrix[tasks].to_numpy(dtype=float)
    learned = [math.nan] + [R[k, k - 1] for k in range(1, len(tasks) + 1)]
    steps = pd.DataFrame({"checkpoint": matrix["checkpoint"].to_list(), "learned_acc": learned})
    for column in ("gain", "delta_vs_base", "avg_all", "op", "bwt", "fwt"):
        steps[column] = metrics[column].to_numpy(dtype=float)
    for column in ("kl_mean", "entropy_mean_delta", "margin_mean_delta", "reference_accuracy"):
        steps[column] = stability[column].to_numpy(dtype=float)
    return SeedResult(run_dir, seed, matrix, metrics, stability, steps)


def load_study(run_dirs: Sequence[str | Path]) -> StudyResults:
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
            raise UserError(f"{run_dir}: cannot read {CONFIG} ({exc})") from None
        config = results.config
        tasks = results.tasks
        if task_set is None:
            task_set, first_dir = frozenset(tasks), run_dir
        elif frozenset(tasks) != task_set:
            raise UserError(f"{run_dir}: its tasks ({', '.join(sorted(tasks))}) differ from those of {first_dir} "
                            f"({', '.join(sorted(task_set))}); a report compares runs on the same tasks")
        settings = _protocol_fingerprint(config)
        key = (config.model.spec, order_label(config), repr(sorted(settings.items())))
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(spec=config.model.spec, order=key[1], settings=settings, tasks=tuple(tasks),
                                        config=config)
        elif tuple(tasks) != group.tasks:
            raise UserError(f"{run_dir}: trains {' → '.join(tasks)} but {group.run_dirs[0]} (same model and order "
                            f"{key[1]!r}) trains {' → '.join(group.tasks)}")
        for seed in config.seeds:
            clash = next((s.run_dir for s in group.per_seed if s.seed == seed), None)
            if clash is not None:
                raise UserError(f"{run_dir}: seed {seed} of {config.model.spec} ({key[1]} order, same settings) is "
                                f"also in {clash}; each seed may appear only once")
            group.per_seed.append(_read_seed(run_dir, seed, tasks))
        group.run_dirs.append(run_dir)

    ordered = list(groups.values())
    names = {g.spec: model_display_name(g.spec) for g in ordered}
    variants = _variant_labels(ordered)
    for group in ordered:
        shared = [s for s, n in names.items() if n == names[group.spec]]
        group.model = names[group.spec] if len(shared) == 1 else group.spec
        if id(group) in variants:
            group.model += f" [{variants[id(group)]}]"
        group.mean, group.std = mean_std_frames([s.steps for s in group.per_seed], index_col="checkpoint")
        group.matrix_mean, group.matrix_std = mean_std_frames([s.matrix for s in group.per_seed],
                                                              index_col="checkpoint")
    # models in the order they were first given, then original, reversed, other orders
    first = {m: i for i, m in reversed(list(enumerate(g.model for g in ordered)))}
    ordered.sort(key=lambda g: (first[g.model], ORDER_RANK.get(g.order, 2)))
    return StudyResults(ordered, task_set or frozenset())


# --- settings against a baseline ----------------------------------------------------------------------------


def is_plain(group: Group) -> bool:
    """Strategy `none` and no monitor: the plain protocol, what a strategy or a monitor is measured against."""
    return group.settings.get("strategy.name") == "none" and group.settings.get("monitor") == "none"


def setting_pairs(study: StudyResults) -> list[tuple[Group, Group]]:
    """(baseline, group) for every other group of a model and task order that has groups differing in a setting.
    The baseline is the first plain group (is_plain), else the first group in the study's order."""
    pairs = []
    for key in dict.fromkeys((g.spec, g.order) for g in study.groups):
        same = [g for g in study.groups if (g.spec, g.order) == key]
        if len(same) < 2:
            continue
        baseline = next((g for g in same if is_plain(g)), same[0])
        pairs += [(baseline, g) for g in same if g is not baseline]
    return pairs
