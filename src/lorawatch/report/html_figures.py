"""The HTML page's figures, drawn by matplotlib as inline SVG (html.py places them)."""

from __future__ import annotations

import hashlib
import io
import re
from contextlib import contextmanager

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


@contextmanager
def _style():
    # Text stays <text> (the page's system fonts draw it): smaller than glyph paths; fixed ids salt.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "lorawatch", "font.size": 9}):
        yield


def inline_svg(svg: str) -> str:
    """An SVG document ready to sit inside HTML: no XML prolog, doctype or metadata, sized by CSS, and every id
    prefixed so that two figures on one page (matplotlib names them alike) never share one."""
    svg = re.sub(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<metadata>.*?</metadata>", "", svg, flags=re.S).strip()
    prefix = "s" + hashlib.sha1(svg.encode("utf-8", "replace")).hexdigest()[:8] + "-"
    ids = set(re.findall(r'\sid="([^"]+)"', svg))
    svg = re.sub(r'(\sid=")([^"]+)"', lambda m: f'{m.group(1)}{prefix}{m.group(2)}"', svg)
    svg = re.sub(r'(url\(#|href="#)([^")]+)', lambda m: m.group(1) + (prefix if m.group(2) in ids else "") + m.group(2),
                 svg)
    # width/height in pt would fix the size; the viewBox keeps the aspect ratio while CSS sets the width
    return re.sub(r'<svg([^>]*?)\swidth="([\d.]+)pt"\s+height="[\d.]+pt"', r'<svg\1 style="max-width:\2pt"', svg,
                  count=1)


def figure_svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return inline_svg(buffer.getvalue())


def drift_panels(mean: pd.DataFrame, per_seed: list[pd.DataFrame]) -> list[str]:
    """KL to base, Δ entropy and Δ margin per checkpoint: the mean (thick), each seed of several (thin)."""
    panels = []
    ticks = ["base"] + list(mean["checkpoint"])[1:]
    for column, title in (("kl_mean", "KL to base"), ("entropy_mean_delta", "Δ entropy vs base"),
                          ("margin_mean_delta", "Δ top-2 margin vs base")):
        if column not in mean.columns:
            continue
        with _style():
            fig = Figure(figsize=(3.6, 2.6), layout="constrained")
            ax = fig.add_subplot()
            x = np.arange(len(mean))
            for frame in per_seed:
                ax.plot(x[:len(frame)], frame[column], color="#9bb0d6", linewidth=1)
            ax.plot(x, mean[column], marker="o", color="#2f5fb3", linewidth=2)
            ax.set_xticks(x, ticks, rotation=20, ha="right")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            panels.append(figure_svg(fig))
    return panels


def monitor_figure(series: pd.DataFrame) -> str:
    """The live drift measured while each stage trained (monitoring_view.monitor_series), every seed."""
    with _style():
        fig = Figure(figsize=(7.5, 3.4), layout="constrained")
        ax = fig.add_subplot()
        colors = matplotlib.colormaps["tab10"].colors
        for i, (seed, rows) in enumerate(series.groupby("seed")):
            color = colors[i % len(colors)]
            ax.plot(rows["cumulative_step"], rows["kl_mean"], marker=".", color=color, label=f"seed {seed}")
            for stage, stage_rows in rows.groupby("stage"):
                start = (stage_rows["cumulative_step"] - stage_rows["step"]).iloc[0]  # steps of earlier stages
                if stage_rows["threshold"].notna().any():
                    ax.hlines(stage_rows["threshold"].iloc[0], start, stage_rows["cumulative_step"].max(),
                              colors=[color], linestyles="dashed", linewidth=1)
                if i == 0:  # above the axes, where neither the curves nor the legend can hide them
                    ax.axvline(start, color="#bbb", linewidth=0.8, linestyle=":")
                    ax.text(start, 1.01, f"{stage}: {stage_rows['task'].iloc[0]}", transform=ax.get_xaxis_transform(),
                            va="bottom", fontsize=7, color="#666")
            above = rows[rows["above"]]
            ax.scatter(above["cumulative_step"], above["kl_mean"], marker="x", s=50, color=color, zorder=3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step (cumulative over stages)")
        ax.set_ylabel("KL to base (reference, mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        return figure_svg(fig)
