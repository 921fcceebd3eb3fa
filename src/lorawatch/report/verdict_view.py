"""How intervals, paired comparisons and verdicts read: one wording for the terminal, report.md and compare.

Every cell that compares two checkpoints shows the accuracy difference with its paired bootstrap interval, the
flips (right -> wrong ↓, wrong -> right ↑), the exact McNemar p adjusted over the tasks, and the verdict.
"""

from __future__ import annotations

import math

from rich.table import Table

from lorawatch.rundir import schema

MINUS = "\u2212"


def _rounded(value: float, digits: int) -> float:
    return round(value, digits) + 0.0  # + 0.0: a value that rounds to zero reads 0.000, never −0.000


def number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{_rounded(value, digits):.{digits}f}".replace("-", MINUS)


def signed(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{_rounded(value, digits):+.{digits}f}".replace("-", MINUS)


def with_interval(value: float | None, low: float | None, high: float | None, digits: int = 3,
                  sign: bool = False) -> str:
    """`0.500 [0.31, 0.69]`; a signed difference reads `+0.100 [−0.05, +0.25]`."""
    show = signed if sign else number
    if value is None or low is None or high is None:
        return show(value, digits)
    return f"{show(value, digits)} [{show(low, 2)}, {show(high, 2)}]"


def p_text(p: float) -> str:
    return "1" if p >= 0.9995 else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def flips(t: schema.TaskComparison) -> str:
    return f"↓{t.regressed} ↑{t.improved}"


def verdict_cell(t: schema.TaskComparison) -> str:
    return {"regressed": "REGRESSED", "improved": "improved"}.get(t.verdict, "–")


def comparison_columns(settings: schema.StatisticsParams) -> list[str]:
    correction = "Holm" if settings.correction == "holm" else "unadjusted"
    level = f"{settings.confidence:.0%}"
    return [f"Δ accuracy [{level} CI]", "flips ↓ ↑", f"p ({correction})", f"verdict (α {settings.alpha:g})"]


def comparison_cells(t: schema.TaskComparison | None) -> list[str]:
    if t is None:
        return ["", "", "", ""]
    return [with_interval(t.difference, t.ci_low, t.ci_high, sign=True), flips(t), p_text(t.p_adjusted),
            verdict_cell(t)]


def verdict_rows(records: dict[int, schema.StatisticsRecord]) -> list[dict]:
    """One row per seed, trained checkpoint and task: its comparison against the previous checkpoint and the base."""
    rows = []
    for seed, record in records.items():
        stages = sorted({c.stage for c in record.comparisons})
        for stage in stages:
            previous, base = record.comparison(stage, "previous"), record.comparison(stage, "base")
            for i, task in enumerate((previous or base).tasks):
                rows.append({"seed": seed, "stage": stage, "checkpoint": (previous or base).checkpoint,
                             "task": task.task, "previous": previous.tasks[i] if previous else None,
                             "base": base.tasks[i] if base else None})
    return rows


def compact_cell(t: schema.TaskComparison | None) -> str:
    """Two lines for a terminal cell: the difference with its interval; flips, p and the verdict."""
    if t is None:
        return ""
    verdict = {"regressed": " · [bold red]REGRESSED[/]", "improved": " · [green]improved[/]"}.get(t.verdict, "")
    return (f"{with_interval(t.difference, t.ci_low, t.ci_high, sign=True)}\n"
            f"{flips(t)} · p {p_text(t.p_adjusted)}{verdict}")


def verdict_table(records: dict[int, schema.StatisticsRecord]) -> Table:
    settings = next(iter(records.values())).settings
    multi = len(records) > 1
    correction = "Holm-adjusted " if settings.correction == "holm" else ""
    table = Table(title=f"Is it real? Each trained checkpoint against the previous one and the base on the same test "
                        f"rows: Δ accuracy [{settings.confidence:.0%} paired bootstrap CI]; ↓ right→wrong, ↑ "
                        f"wrong→right; {correction}exact McNemar p; verdict at α {settings.alpha:g}",
                  title_justify="left")
    if multi:
        table.add_column("seed")
    table.add_column("checkpoint")
    table.add_column("task")
    table.add_column("vs previous checkpoint", justify="right")
    table.add_column("vs base", justify="right")
    for row in verdict_rows(records):
        table.add_row(*([str(row["seed"])] if multi else []), row["checkpoint"], row["task"],
                      compact_cell(row["previous"]), compact_cell(row["base"]))
    return table


def verdicts_markdown(records: dict[int, schema.StatisticsRecord]) -> str:
    settings = next(iter(records.values())).settings
    headers = ["seed", "checkpoint", "task"] + [f"vs {a}: {h}" for a in ("previous", "base")
                                                for h in comparison_columns(settings)]
    lines = ["| " + " | ".join(headers) + " |", "|---|---|---|" + "---:|" * 8]
    for row in verdict_rows(records):
        lines.append("| " + " | ".join([str(row["seed"]), row["checkpoint"], row["task"],
                                        *comparison_cells(row["previous"]), *comparison_cells(row["base"])]) + " |")
    return "\n".join(lines)


def regression_lines(records: dict[int, schema.StatisticsRecord]) -> list[str]:
    """A sentence per regressed (seed, checkpoint, task), or one saying there is none."""
    lines = []
    for row in verdict_rows(records):
        for against in ("previous", "base"):
            t = row[against]
            if t is not None and t.verdict == "regressed":
                lines.append(f"seed {row['seed']}: {row['checkpoint']} regressed on {row['task']} against the "
                             f"{against if against == 'base' else 'previous checkpoint'}: "
                             f"{number(t.accuracy_before)} → {number(t.accuracy_after)} "
                             f"({with_interval(t.difference, t.ci_low, t.ci_high, sign=True)}), {flips(t)}, "
                             f"p = {p_text(t.p_adjusted)}")
    return lines


def drift_change_lines(records: dict[int, schema.StatisticsRecord]) -> list[str]:
    """Per seed, how each checkpoint's KL to base moved from the previous one, with its paired interval over the
    reference rows."""
    lines = []
    for seed, record in records.items():
        parts = [f"{c.checkpoint} {number(c.kl_after)} "
                 f"({with_interval(c.kl_after - c.kl_before, c.kl_ci_low, c.kl_ci_high, sign=True)})"
                 for c in record.comparisons if c.against == "previous" and c.kl_before is not None]
        if parts:
            lines.append((f"seed {seed}: " if len(records) > 1 else "") + ", ".join(parts))
    return lines


def detectable_lines(record: schema.StatisticsRecord) -> list[str]:
    """What each task's test size can show, as a person reads it (tasks of the same size share a line)."""
    settings = record.settings
    correction = f", Holm over {len(record.detectable)} tasks" if settings.correction == "holm" else ""
    by_size: dict[int, list[schema.DetectableDrop]] = {}
    for d in record.detectable:
        by_size.setdefault(d.n, []).append(d)
    lines = []
    for n, group in by_size.items():
        d, names = group[0], ", ".join(g.task for g in group)
        if d.min_flips is None:
            lines.append(f"{names}: {n} rows cannot show any drop at α {settings.alpha:g}{correction}")
            continue
        line = (f"{names}: {n} rows cannot show a drop smaller than {number(d.floor)} ({d.min_flips} right→wrong "
                f"and none wrong→right) at α {settings.alpha:g}{correction}")
        if d.drop_at_power is not None:
            line += f"; {d.power:.0%} power needs a true drop of {number(d.drop_at_power)} even if no row improves"
        lines.append(line)
    return lines


def interval_of(record: schema.StatisticsRecord, checkpoint: str | None, metric: str) -> schema.Interval | None:
    """A metric's interval: a checkpoint's, or the run's headline one (checkpoint None)."""
    rows = record.headline if checkpoint is None else [m for m in record.metrics if m.checkpoint == checkpoint]
    return next((m for m in rows if m.metric == metric), None)


def accuracy_of(record: schema.StatisticsRecord, checkpoint: str, task: str) -> schema.AccuracyInterval | None:
    return next((a for a in record.accuracy if a.checkpoint == checkpoint and a.task == task), None)
