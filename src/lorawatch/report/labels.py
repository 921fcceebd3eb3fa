"""What the report calls each number and how it writes one: the metric columns' headers, the headline numbers'
labels, and the "mean ± sd" cell, for the terminal, Markdown, LaTeX and the HTML page alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorawatch.analysis.metrics import METRIC_COLUMNS

# The header of each per-checkpoint metric column (analysis.metrics.METRIC_COLUMNS, in that order).
METRIC_HEADERS = {"op": "OP", "bwt": "BWT", "fwt": "FWT", "avg_all": "avg (all tasks)", "gain": "gain",
                  "delta_vs_base": "vs base"}
assert tuple(METRIC_HEADERS) == METRIC_COLUMNS
# The paper's Table 4 and `lorawatch compare`: overall performance, backward and forward transfer.
TRANSFER_METRICS = METRIC_COLUMNS[:3]


@dataclass(frozen=True)
class Headline:
    key: str  # in summary.json
    label: str  # in the terminal and Markdown
    title: str  # on the HTML page's card
    hint: str
    compared: bool = True  # one of `lorawatch compare`'s headline rows


HEADLINE = (
    Headline("final_avg_accuracy", "final avg accuracy", "Final avg accuracy", "mean over all tasks after the last stage"),
    Headline("bwt", "BWT", "BWT", "backward transfer: < 0 means forgetting"),
    Headline("fwt", "FWT", "FWT", "forward transfer"),
    Headline("learning_accuracy", "LA", "Learning accuracy", "R[k,k], mean over tasks", compared=False),
    Headline("mean_gain", "mean gain", "Mean gain", "R[k,k] − R[k−1,k], mean over tasks"),
    Headline("final_kl_to_base", "final KL to base", "Final KL to base", "reference set, after the last stage"),
)


def number(value, digits: int = 3, *, unsigned_zero: bool = False) -> str:
    """A table's number; "—" where undefined (None, NaN, infinite). A column of zeros that pandas read as integers
    is still 0.000; text is shown as it is. `unsigned_zero`: -0.000 is written 0.000."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return "—" if value is None else str(value)
    if not math.isfinite(float(value)):
        return "—"
    text = f"{float(value):.{digits}f}"
    return text[1:] if unsigned_zero and text.startswith("-") and float(text) == 0 else text


def mean_sd(mean, sd=None, digits: int = 3, *, unsigned_zero: bool = False) -> str:
    """"mean ± sd" over seeds; the mean alone without a defined sd (one seed), "—" without a defined mean."""
    text = number(mean, digits, unsigned_zero=unsigned_zero)
    spread = "—" if sd is None else number(sd, digits, unsigned_zero=unsigned_zero)
    return text if "—" in (text, spread) else f"{text} ± {spread}"
