"""A study: many finished run folders, grouped by (model, task order), and the paper's tables built from them.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lorawatch import store
from lorawatch.config import ExperimentConfig
from lorawatch.errors import UserError
from lorawatch.metrics import ACCURACY_TOLERANCE, MIN_CHECKPOINTS_PER_LABEL, mean_std_frames
from lorawatch.tables import load_run, seed_tables

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


# --- tables ---------------------------------------------------------------------------------------


@dataclass
class ReportTable:
    """One of the paper's tables: display cells for Markdown/LaTeX and a numeric frame for CSV."""

    name: str                   # file stem, e.g. "table4"
    title: str
    headers: list[str]
    rows: list[list[str]]       # display cells; the model name only on the first row of its block
    block_starts: list[int]     # row indices where a model's block starts
    data: pd.DataFrame          # numbers (mean and *_std columns); undefined = empty in the CSV
    note: str = ""
    header_groups: list[tuple[str, int]] | None = None  # (label, span) above the headers, for LaTeX

    def to_markdown(self) -> str:
        headers = self.headers
        if self.header_groups:
            # Markdown has one header row: fold the group label into each column header
            folded, col = [], 0
            for label, span in self.header_groups:
                for h in headers[col:col + span]:
                    folded.append(f"{label}: {h}" if label else h)
                col += span
            headers = folded
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i < self._label_columns else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        n = len(self.headers)
        spec = "l" * self._label_columns + "r" * (n - self._label_columns)
        out = ["% " + _latex(self.title) + " (needs \\usepackage{booktabs})",
               "\\begin{tabular}{" + spec + "}", "\\toprule"]
        if self.header_groups:
            cells, rules, col = [], [], 1
            for label, span in self.header_groups:
                cells.append(f"\\multicolumn{{{span}}}{{c}}{{{_latex(label)}}}" if span > 1 else _latex(label))
                if label and span > 1:
                    rules.append(f"\\cmidrule(lr){{{col}-{col + span - 1}}}")
                col += span
            out.append(" & ".join(cells) + " \\\\")
            out.extend(rules)
        out.append(" & ".join(_latex(h) for h in self.headers) + " \\\\")
        out.append("\\midrule")
        for i, row in enumerate(self.rows):
            if i in self.block_starts and i > 0:
                out.append("\\midrule")
            out.append(" & ".join(_latex(c) for c in row) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        return self.data.to_csv(index=False, float_format="%.10g")

    @property
    def _label_columns(self) -> int:
        # leading text columns (model, order, step, task...) are left-aligned
        return sum(1 for h in self.headers if h in _TEXT_HEADERS)


_TEXT_HEADERS = {"Model", "Order", "Step", "Learned task", "Checkpoint"}

_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "---",
          "Δ": r"$\Delta$", "→": r"$\rightarrow$", "·": r"$\cdot$", "−": "-"}


def _latex(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(text))


def cell(mean: float, std: float, with_std: bool, digits: int = 3) -> str:
    if mean is None or not np.isfinite(mean):
        return "—"
    if not with_std or std is None or not np.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _per_step_table(study: Study, name: str, title: str, note: str, headers: list[str],
                    columns: list[tuple[str, str]], learned_task_column: bool) -> ReportTable:
    """Rows: every group, steps 1..T. `columns` = (step column, CSV name)."""
    with_order = len(study.orders) > 1
    shown = ["Model"] + (["Order"] if with_order else []) + ["Step"] + \
        (["Learned task"] if learned_task_column else ["Checkpoint"]) + headers
    rows, starts, records = [], [], []
    for group in study.groups:
        multi = len(group.per_seed) > 1
        starts.append(len(rows))
        for k, task in enumerate(group.tasks, start=1):
            mean, std = group.mean.iloc[k], group.std.iloc[k]
            first = k == 1
            row = [group.model if first else ""] + ([group.order if first else ""] if with_order else [])
            row += [str(k), task if learned_task_column else f"After {task}"]
            row += [cell(mean[c], std[c], multi) for c, _ in columns]
            rows.append(row)
            record = {"model": group.model, "spec": group.spec, "order": group.order, "step": k,
                      "checkpoint": task, "n_seeds": len(group.per_seed)}
            for c, csv_name in columns:
                record[csv_name] = mean[c]
                record[f"{csv_name}_std"] = std[c]
            records.append(record)
    return ReportTable(name, title, shown, rows, starts, pd.DataFrame(records), note)


def _seeds_note(study: Study) -> str:
    counts = sorted({len(g.per_seed) for g in study.groups})
    if counts == [1]:
        return "one seed per model and order"
    note = "mean ± std over seeds (sample std, ddof = 1)"
    return note if counts[0] > 1 else note + "; one-seed rows show the mean only"


def table3(study: Study) -> ReportTable:
    return _per_step_table(
        study, "table3", "Table 3: sequential adaptation per model and step",
        "After learning = R[k,k]; immediate gain = R[k,k] − R[k−1,k]; vs. base = R[k,k] − R[0,k]; "
        "average accuracy = mean over all tasks of R[k,·]; " + _seeds_note(study) + ".",
        ["After learning", "Immediate gain", "vs. Base", "Average accuracy"],
        [("learned_acc", "after_learning"), ("gain", "immediate_gain"), ("delta_vs_base", "vs_base"),
         ("avg_all", "avg_accuracy")], learned_task_column=True)


def table4(study: Study) -> ReportTable:
    return _per_step_table(
        study, "table4", "Table 4: continual-learning metrics per checkpoint",
        "OP_k = mean_{i≤k} R[k,i]; BWT_k = mean_{i<k} (R[k,i] − R[i,i]); FWT_k = mean_{i>k} (R[k,i] − R[0,i]); "
        "— where undefined (BWT after the first task, FWT after the last); " + _seeds_note(study) + ".",
        ["OP", "BWT", "FWT"], [("op", "op"), ("bwt", "bwt"), ("fwt", "fwt")], learned_task_column=False)


def table5(study: Study) -> ReportTable:
    return _per_step_table(
        study, "table5", "Table 5: stability on the reference set, relative to the base checkpoint",
        "Δ entropy and Δ margin: mean over the reference set minus the base checkpoint's; KL to base: mean "
        "KL(checkpoint ‖ base) of the next-token distribution; " + _seeds_note(study) + ".",
        ["Δ Entropy", "Δ Margin", "KL to Base"],
        [("entropy_mean_delta", "entropy_delta"), ("margin_mean_delta", "margin_delta"), ("kl_mean", "kl_to_base")],
        learned_task_column=False)


def table6(study: Study) -> ReportTable:
    orders = study.orders
    headers = ["Model"] + [o.capitalize() if o in ORDER_RANK else o for o in orders] * 2
    rows, records = [], []
    for model in study.models:
        row_acc, row_kl = [], []
        for order in orders:
            group = study.group(model, order)
            if group is None:
                row_acc.append("—")
                row_kl.append("—")
                continue
            multi = len(group.per_seed) > 1
            mean, std = group.mean.iloc[-1], group.std.iloc[-1]
            row_acc.append(cell(mean["avg_all"], std["avg_all"], multi))
            row_kl.append(cell(mean["kl_mean"], std["kl_mean"], multi))
            records.append({"model": model, "spec": group.spec, "order": order,
                            "tasks": " > ".join(group.tasks), "n_seeds": len(group.per_seed),
                            "final_avg_accuracy": mean["avg_all"], "final_avg_accuracy_std": std["avg_all"],
                            "final_kl_to_base": mean["kl_mean"], "final_kl_to_base_std": std["kl_mean"]})
        rows.append([model] + row_acc + row_kl)
    groups = [("", 1), ("Final Average Accuracy", len(orders)), ("Final KL to Base (Drift)", len(orders))]
    return ReportTable("table6", "Table 6: final results per task order",
                       headers, rows, [0], pd.DataFrame(records),
                       "Final average accuracy = mean over all tasks after the last step; final KL to base = mean "
                       "KL on the reference set after the last step; " + _seeds_note(study) + ".",
                       header_groups=groups)


def build_tables(study: Study) -> list[ReportTable]:
    return [table3(study), table4(study), table5(study), table6(study)]


# --- KL against accuracy (Figure 1) ---------------------------------------------------------------


def kl_accuracy_points(study: Study) -> pd.DataFrame:
    """Every checkpoint after a training step (seed means): KL to base, average accuracy over all tasks, and
    whether that accuracy fell below the same group's base model. Base checkpoints (KL = 0 by definition,
    the same model in every order) are left out."""
    records = []
    for group in study.groups:
        base_avg = float(group.mean["avg_all"].iloc[0])
        for k, task in enumerate(group.tasks, start=1):
            row, std = group.mean.iloc[k], group.std.iloc[k]
            records.append({"model": group.model, "spec": group.spec, "order": group.order, "step": k,
                            "checkpoint": task, "n_seeds": len(group.per_seed),
                            "kl_to_base": float(row["kl_mean"]), "kl_to_base_std": float(std["kl_mean"]),
                            "avg_accuracy": float(row["avg_all"]), "avg_accuracy_std": float(std["avg_all"]),
                            "base_avg_accuracy": base_avg,
                            "below_base": bool(row["avg_all"] < base_avg - ACCURACY_TOLERANCE)})
    return pd.DataFrame(records)


FAILURE_ZONE_METHOD = (
    "Each checkpoint is labelled failed when its average accuracy over all tasks (seed mean) is below its own "
    "base model's average accuracy. Candidate thresholds are the midpoints between consecutive distinct KL "
    "values (sorted); a checkpoint is predicted failed when its KL to base is above the threshold. The threshold "
    "with the highest balanced accuracy ((true-positive rate + true-negative rate) / 2) is chosen; ties go to the "
    f"smallest threshold. Not fitted with fewer than {MIN_CHECKPOINTS_PER_LABEL} failed or fewer than "
    f"{MIN_CHECKPOINTS_PER_LABEL} healthy checkpoints, nor when all KL values are equal."
)


def fit_failure_threshold(kl: Sequence[float], failed: Sequence[bool]) -> dict:
    """The KL threshold that best separates failed from healthy checkpoints (see FAILURE_ZONE_METHOD)."""
    kl = np.asarray(kl, dtype=float)
    failed = np.asarray(failed, dtype=bool)
    result = {"threshold": None, "balanced_accuracy": None, "n_failed": int(failed.sum()),
              "n_healthy": int((~failed).sum()), "min_per_label": MIN_CHECKPOINTS_PER_LABEL,
              "rule": "failed if KL to base > threshold", "method": FAILURE_ZONE_METHOD}
    values = np.unique(kl)
    if min(result["n_failed"], result["n_healthy"]) < MIN_CHECKPOINTS_PER_LABEL:
        result["reason"] = (f"{result['n_failed']} failed and {result['n_healthy']} healthy checkpoint(s); at least "
                            f"{MIN_CHECKPOINTS_PER_LABEL} of each are needed")
        return result
    if len(values) < 2:
        result["reason"] = "all checkpoints have the same KL to base"
        return result
    best_t, best_ba = None, -1.0
    for t in (values[:-1] + values[1:]) / 2:  # ascending, so a strict > keeps the smallest of tied thresholds
        predicted = kl > t
        tpr = (predicted & failed).sum() / failed.sum()
        tnr = (~predicted & ~failed).sum() / (~failed).sum()
        ba = float((tpr + tnr) / 2)
        if ba > best_ba + 1e-12:
            best_t, best_ba = float(t), ba
    result["threshold"], result["balanced_accuracy"] = best_t, best_ba
    return result


INDEPENDENCE_NOTE = (
    "Checkpoints of one run share its training trajectory, and one model's runs share its base: the points are "
    "not independent, so the p-values (which assume they are) overstate the evidence. The pooled correlation "
    "also mixes models whose KL scales differ; read it beside the per-model ones.")


def correlation(points: pd.DataFrame) -> dict:
    """Pearson and Spearman correlation of KL to base with average accuracy over the points.

    Values are rounded to 9 decimals first, so that accuracies equal but for float noise tie in the ranks."""
    from scipy import stats

    x = np.round(points["kl_to_base"].to_numpy(dtype=float), 9)
    y = np.round(points["avg_accuracy"].to_numpy(dtype=float), 9)
    out: dict = {"n": int(len(x))}
    for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            out[name] = {"r": None, "p": None,
                         "reason": "needs at least 3 checkpoints with varying KL and accuracy"}
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r, p = fn(x, y)
        out[name] = {"r": float(r), "p": float(p)}
        if caught:  # e.g. scipy's NearConstantInputWarning: kept with the numbers, not printed
            out[name]["warning"] = str(caught[0].message)
    return out


def correlations(points: pd.DataFrame) -> dict:
    """The pooled correlation, the same per model, and the caveat that goes with them."""
    per_model = {model: correlation(points[points["model"] == model]) for model in dict.fromkeys(points["model"])}
    return {**correlation(points), "per_model": per_model, "independence": INDEPENDENCE_NOTE}
