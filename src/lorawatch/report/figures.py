"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no global backend change).

Every figure is written as PNG (150 dpi) and SVG, atomically, and the functions return the paths written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorawatch.rundir import atomic
from lorawatch.report.monitoring_view import monitor_series
from lorawatch.report.study import Group, StudyResults, slug

LINESTYLES = {"original": "-", "reversed": "--"}
MARKERS = {"original": "o", "reversed": "^"}
_OTHER_LINESTYLES = (":", "-.")
_OTHER_MARKERS = ("s", "D", "v", "P")


def _style(study: StudyResults, order: str) -> tuple[str, str]:
    others = [o for o in study.orders if o not in LINESTYLES]
    if order in LINESTYLES:
        return LINESTYLES[order], MARKERS[order]
    i = others.index(order)
    return _OTHER_LINESTYLES[i % len(_OTHER_LINESTYLES)], _OTHER_MARKERS[i % len(_OTHER_MARKERS)]


def model_colors(study: StudyResults) -> dict[str, str]:
    palette = matplotlib.colormaps["tab10"].colors
    return {m: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, m in enumerate(study.models)}


def _side_legend(fig: Figure, ax) -> None:
    """The legend beside the axes; below them when its labels are long (a study's settings or strategies), where it
    would otherwise squeeze the axes to nothing. The figure grows by the rows it adds."""
    labels = ax.get_legend_handles_labels()[1]
    if max((len(label) for label in labels), default=0) <= 48:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        return
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + 0.2 * len(labels))
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=1, frameon=False)


def _base_accuracy_lines(ax, study: StudyResults, colors: dict[str, str]) -> None:
    """Each model's base average accuracy, dotted: what a checkpoint below it lost."""
    for model in study.models:
        base = study.groups_of(model)[0].mean["avg_all"].iloc[0]
        ax.axhline(base, color=colors[model], linestyle=":", linewidth=0.9, alpha=0.7, zorder=1)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "lorawatch", "svg.fonttype": "path"}):
        for fmt in ("png", "svg"):
            buffer = io.BytesIO()
            metadata = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(buffer, format=fmt, dpi=150, metadata=metadata)
            path = out_dir / f"{stem}.{fmt}"
            atomic.write_bytes(path, buffer.getvalue())
            paths.append(path)
    return paths


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def figure1(study: StudyResults, points: pd.DataFrame, corr: dict, zone: dict, out_dir: Path) -> list[Path]:
    """KL to base against average accuracy over all tasks, every checkpoint, model and order."""
    fig = _new_figure(8.0, 5.4)
    ax = fig.add_subplot()
    colors = model_colors(study)
    _base_accuracy_lines(ax, study, colors)
    for group in study.groups:
        linestyle, marker = _style(study, group.order)
        pts = points[(points["model"] == group.model) & (points["order"] == group.order)]
        multi = len(group.per_seed) > 1
        ax.errorbar(pts["kl_to_base"], pts["avg_accuracy"],
                    xerr=pts["kl_to_base_std"] if multi else None, yerr=pts["avg_accuracy_std"] if multi else None,
                    fmt=marker, color=colors[group.model], ecolor=colors[group.model], elinewidth=0.8,
                    alpha=0.9, markersize=7, markeredgecolor="white", markeredgewidth=0.6, capsize=0,
                    label=group.label, zorder=3)
        for _, p in pts.iterrows():
            ax.annotate(str(p["step"]), (p["kl_to_base"], p["avg_accuracy"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7, color=colors[group.model])
    threshold = zone.get("threshold")
    if threshold is not None:
        left, right = ax.get_xlim()
        right = max(right, threshold * 1.05)
        ax.axvspan(threshold, right, color="#d62728", alpha=0.08, zorder=0)
        ax.axvline(threshold, color="#d62728", linestyle="--", linewidth=1.2, zorder=2)
        ax.set_xlim(left, right)
        ax.text(threshold, 0.98, f"  failure zone: KL > {threshold:.3f}\n  (balanced accuracy "
                f"{zone['balanced_accuracy']:.2f}, {zone['n_failed']} of {zone['n_failed'] + zone['n_healthy']} "
                "below base)", transform=ax.get_xaxis_transform(), va="top", ha="left", fontsize=8,
                color="#a01c1c")
    pearson, spearman = corr["pearson"], corr["spearman"]
    stats_text = (f"Pearson r = {_fmt(pearson['r'])} (p = {_fmt_p(pearson['p'])})\n"
                  f"Spearman ρ = {_fmt(spearman['r'])} (p = {_fmt_p(spearman['p'])})\n"
                  f"n = {corr['n']} checkpoints (seed means)" + ("" if len(corr.get("per_model", {})) < 2 else
                                                                 ", models pooled"))
    for model, entries in (corr.get("per_model") or {}).items() if len(corr.get("per_model", {})) > 1 else ():
        stats_text += (f"\n{model}: r = {_fmt(entries['pearson']['r'])}, ρ = {_fmt(entries['spearman']['r'])} "
                       f"(n = {entries['n']})")
    # Beside the axes, under the legend: inside them it can hide a checkpoint.
    ax.text(1.03, 0.0, stats_text, transform=ax.transAxes, fontsize=8.5, va="bottom", ha="left",
            bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "#999999", "alpha": 0.9})
    ax.set_xlabel("KL to base on the reference set (mean)")
    ax.set_ylabel("Average accuracy over all tasks")
    ax.set_title("Figure 1: drift (KL to base) against accuracy, every checkpoint\n"
                 "numbers = step; dotted lines = each model's base accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    _side_legend(fig, ax)
    return _save(fig, out_dir, "figure1")


def figure2(study: StudyResults, out_dir: Path) -> list[Path]:
    """KL to base per step, one line per model and order (original solid, reversed dashed)."""
    fig = _new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    colors = model_colors(study)
    steps = 0
    for group in study.groups:
        linestyle, marker = _style(study, group.order)
        x = np.arange(len(group.mean))
        y = group.mean["kl_mean"].to_numpy(dtype=float)
        ax.plot(x, y, linestyle=linestyle, marker=marker, color=colors[group.model], label=group.label,
                linewidth=1.8, markersize=5)
        if len(group.per_seed) > 1:
            s = group.std["kl_mean"].to_numpy(dtype=float)
            ax.fill_between(x, y - s, y + s, color=colors[group.model], alpha=0.12, linewidth=0)
        steps = max(steps, len(x))
    ax.set_xticks(range(steps), ["base"] + [str(k) for k in range(1, steps)])
    ax.set_xlabel("step (number of tasks learned)")
    ax.set_ylabel("KL to base on the reference set (mean)")
    ax.set_title("Figure 2: drift per step — original order solid, reversed dashed", fontsize=10)
    ax.grid(alpha=0.3)
    _side_legend(fig, ax)
    return _save(fig, out_dir, "figure2")



def figure3(study: StudyResults, finals: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Final average accuracy against final KL to base, one point per run and seed: where each model, setting or
    strategy ends on the trade-off between what it learned and how far it moved from its base."""
    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot()
    colors = model_colors(study)
    _base_accuracy_lines(ax, study, colors)
    for group in study.groups:
        _, marker = _style(study, group.order)
        pts = finals[(finals["model"] == group.model) & (finals["order"] == group.order)]
        ax.scatter(pts["final_kl_to_base"], pts["final_avg_accuracy"], marker=marker, color=colors[group.model],
                   s=48, alpha=0.9, edgecolors="white", linewidths=0.6, label=group.label, zorder=3)
        mean_kl, mean_acc = pts["final_kl_to_base"].mean(), pts["final_avg_accuracy"].mean()
        if len(pts) > 1:  # the seeds' mean, joined to each seed
            for _, p in pts.iterrows():
                ax.plot([mean_kl, p["final_kl_to_base"]], [mean_acc, p["final_avg_accuracy"]],
                        color=colors[group.model], linewidth=0.6, alpha=0.5, zorder=2)
    ax.set_xlabel("final KL to base on the reference set")
    ax.set_ylabel("final average accuracy over all tasks")
    ax.set_title("Figure 3: final accuracy against final drift, one point per run and seed\n"
                 "dotted lines = each model's base accuracy; lines join a group's seeds", fontsize=10)
    ax.grid(alpha=0.3)
    _side_legend(fig, ax)
    return _save(fig, out_dir, "figure3")

def matrix_heatmap(study: StudyResults, model: str, out_dir: Path, stem: str | None = None) -> list[Path]:
    """The accuracy matrix (seed mean, ± std when there are several seeds), one panel per task order."""
    groups = study.groups_of(model)
    fig = _new_figure(1.2 + 3.9 * len(groups), 3.9)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    image = None
    for ax, group in zip(axes, groups):
        tasks = list(group.tasks)
        mean = group.matrix_mean[tasks].to_numpy(dtype=float)
        std = group.matrix_std[tasks].to_numpy(dtype=float)
        image = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        multi = len(group.per_seed) > 1
        for k in range(mean.shape[0]):
            for i in range(mean.shape[1]):
                text = f"{mean[k, i]:.3f}" + (f"\n±{std[k, i]:.3f}" if multi else "")
                ax.text(i, k, text, ha="center", va="center", fontsize=8,
                        color="white" if mean[k, i] < 0.6 else "black",
                        fontweight="bold" if k == i + 1 else "normal")
        ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks) + 1), ["base"] + [f"after {t}" for t in tasks], fontsize=8)
        ax.set_xlabel("task (training order)", fontsize=8)
        ax.set_title(f"{group.order} order · {len(group.per_seed)} seed(s)", fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.85, label="accuracy")
    fig.suptitle(f"{model}: accuracy matrix (bold = task just learned)", fontsize=10)
    return _save(fig, out_dir, stem or f"model-{slug(model)}-matrix")


def accuracy_and_kl(study: StudyResults, model: str, out_dir: Path, stem: str | None = None) -> list[Path]:
    """Average accuracy over all tasks (left axis) and KL to base (right axis) per step, per task order."""
    groups: list[Group] = study.groups_of(model)
    fig = _new_figure(7.2, 4.3)
    ax = fig.add_subplot()
    twin = ax.twinx()
    acc_color, kl_color = "#1f77b4", "#d62728"
    steps = 0
    for group in groups:
        linestyle, marker = _style(study, group.order)
        x = np.arange(len(group.mean))
        multi = len(group.per_seed) > 1
        for axis, column, color, name in ((ax, "avg_all", acc_color, "avg accuracy"),
                                          (twin, "kl_mean", kl_color, "KL to base")):
            y = group.mean[column].to_numpy(dtype=float)
            axis.plot(x, y, linestyle=linestyle, marker=marker, color=color, linewidth=1.8, markersize=5,
                      label=f"{name} · {group.order}")
            if multi:
                s = group.std[column].to_numpy(dtype=float)
                axis.fill_between(x, y - s, y + s, color=color, alpha=0.12, linewidth=0)
        steps = max(steps, len(x))
    if len(groups) == 1:
        labels = ["base"] + [f"{k}\n{t}" for k, t in enumerate(groups[0].tasks, start=1)]
    else:
        labels = ["base"] + [str(k) for k in range(1, steps)]
    ax.set_xticks(range(steps), labels, fontsize=8)
    ax.set_xlabel("step (task learned)")
    ax.set_ylabel("average accuracy over all tasks", color=acc_color)
    twin.set_ylabel("KL to base (reference set)", color=kl_color)
    ax.tick_params(axis="y", colors=acc_color)
    twin.tick_params(axis="y", colors=kl_color)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=8, loc="upper left", framealpha=0.9)
    ax.set_title(f"{model}: accuracy and drift per step"
                 + (" (original solid, reversed dashed)" if len(groups) > 1 else ""), fontsize=10)
    return _save(fig, out_dir, stem or f"model-{slug(model)}-steps")


def monitor_figure(runs: Sequence[tuple[str, Path]], out_dir: Path, stem: str = "monitor") -> list[Path]:
    """Live drift: KL to base against cumulative optimizer step for every run and seed; each stage's threshold
    dashed, measurements above it marked ×. Nothing is written (and [] returned) when no run was monitored."""
    fig = _new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab10"].colors
    drawn = False
    for i, (label, run_dir) in enumerate(runs):
        series = monitor_series(run_dir)
        if series.empty:
            continue
        drawn = True
        color = colors[i % len(colors)]
        for seed, rows in series.groupby("seed"):
            ax.plot(rows["cumulative_step"], rows["kl_mean"], marker=".", color=color,
                    label=f"{label} (seed {seed})")
            for _, stage_rows in rows.groupby("stage"):
                if stage_rows["threshold"].notna().any():
                    ax.hlines(stage_rows["threshold"].iloc[0], stage_rows["cumulative_step"].min(),
                              stage_rows["cumulative_step"].max(), colors=[color], linestyles="dashed", linewidth=1)
            crossed = rows[rows["above"]]
            ax.scatter(crossed["cumulative_step"], crossed["kl_mean"], marker="x", s=60, color=color, zorder=3)
    if not drawn:
        return []
    ax.set_xlabel("optimizer step (cumulative over stages)")
    ax.set_ylabel("KL to base (reference set, mean)")
    ax.set_title("Live drift during training (dashed: threshold, ×: above it)")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, stem)


def signal_figure(table: pd.DataFrame, out_dir: Path, stem: str = "signals") -> list[Path]:
    """Each candidate drift signal's AUROC at telling the checkpoints that forgot an earlier task from those that
    did not, with its bootstrap interval; the dashed line is chance."""
    ranked = table[table["auroc"].notna()]
    fig = _new_figure(8.0, 0.9 + 0.32 * max(len(ranked), 1))
    ax = fig.add_subplot()
    y = list(range(len(ranked)))[::-1]
    ax.errorbar(ranked["auroc"], y, xerr=[ranked["auroc"] - ranked["ci_low"], ranked["ci_high"] - ranked["auroc"]],
                fmt="o", color="#1f77b4", ecolor="#1f77b4", capsize=3)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(ranked["signal"])
    ax.set_xlim(-0.02, 1.02)  # room for a point at 0 or 1
    ax.set_ylim(-0.6, len(ranked) - 0.4)
    ax.set_xlabel("AUROC: checkpoints that forgot an earlier task against those that did not")
    forgot, did_not = (int(ranked[c].max()) if len(ranked) else 0 for c in ("forgot", "did_not"))
    ax.set_title(f"Which drift signal warns best ({forgot} checkpoints forgot, {did_not} did not)\n"
                 "bars: stratified bootstrap interval; dashed: chance", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, out_dir, stem)


def correlation_figure(table: pd.DataFrame, out_dir: Path, stem: str = "signals-correlation",
                       alpha: float = 0.05) -> list[Path]:
    """Each candidate drift signal's Spearman correlation with the checkpoint's largest drop on an earlier task,
    with its bootstrap interval; filled: significant after Holm."""
    measured = table[table["rho"].notna()]
    fig = _new_figure(8.0, 0.9 + 0.32 * max(len(measured), 1))
    ax = fig.add_subplot()
    y = np.arange(len(measured))[::-1]
    held = (measured["p_adjusted"] < alpha).to_numpy()
    ax.errorbar(measured["rho"], y, xerr=[measured["rho"] - measured["ci_low"], measured["ci_high"] - measured["rho"]],
                fmt="none", ecolor="#1f77b4", capsize=3)
    ax.scatter(measured["rho"][held], y[held], color="#1f77b4", zorder=3, label=f"Holm p < {alpha:g}")
    ax.scatter(measured["rho"][~held], y[~held], facecolor="white", edgecolor="#1f77b4", zorder=3,
               label="not significant")
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(measured["signal"])
    ax.set_xlim(-1.02, 1.02)
    ax.set_ylim(-0.6, len(measured) - 0.4)
    ax.set_xlabel("Spearman ρ with the checkpoint's largest accuracy drop on an earlier task")
    n = int(measured["checkpoints"].max()) if len(measured) else 0
    ax.set_title(f"Does the drift signal grow with the forgetting? ({n} checkpoints)\n"
                 "bars: bootstrap interval; dashed: no correlation", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, out_dir, stem)
