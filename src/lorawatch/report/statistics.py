"""Figure 1's statistics: every checkpoint's KL to base against its average accuracy, their correlation (pooled
and per model), and the KL threshold of a failure zone."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from lorawatch.analysis.metrics import ACCURACY_TOLERANCE, MIN_CHECKPOINTS_PER_LABEL
from lorawatch.report.study import StudyResults



def kl_accuracy_points(study: StudyResults) -> pd.DataFrame:
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
