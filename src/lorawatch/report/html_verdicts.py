"""The page's "Is it real?" section: every trained checkpoint of every seed against the previous checkpoint and
the base, task by task, as the terminal's verdict table shows it (verdict_view), with each flip count a link that
opens the example browser on exactly those flipped examples (html_examples.browser_link).

The numbers come from the seeds' statistics records (seed-S/statistics.json, or computed for an older folder):
nothing is recomputed here, so the page, the terminal and `lorawatch gate` cannot disagree.
"""

from __future__ import annotations

import html

from lorawatch.rundir import schema
from lorawatch.report import verdict_view
from lorawatch.report.html_examples import browser_link

esc = html.escape
AGAINST = (("previous", "vs previous checkpoint"), ("base", "vs base"))
# (count field, browser direction, arrow, what the flip is): ↓ right -> wrong is the negative flip
FLIPS = (("regressed", "lost", "↓", "right → wrong"), ("improved", "gained", "↑", "wrong → right"))
VERDICT_CLASS = {"regressed": "verdict v-regressed", "improved": "verdict v-improved"}



def _flip_links(t: schema.TaskComparison, prefix: str, seed: int, before: int, after: int) -> str:
    """`↓3 ↑1`, each non-zero count a link to those examples in the run's browser (a zero has nothing to show)."""
    parts = []
    for field, direction, arrow, what in FLIPS:
        count = getattr(t, field)
        if not count:
            parts.append(f'<span class="xb-none">{arrow}0</span>')
            continue
        href = browser_link(prefix, seed, before, after, t.task, direction)
        title = f"{count} {what} on {t.task}: show them in the example browser"
        parts.append(f'<a class="xb-link {direction}" href="{esc(href)}" title="{esc(title)}">{arrow}{count}</a>')
    return " ".join(parts)


def _comparison_cells(t: schema.TaskComparison | None, comparison: schema.Comparison | None, prefix: str,
                      seed: int) -> str:
    """The four cells of one comparison: Δ [CI], flips (links), p, verdict (a regression stands out)."""
    if t is None or comparison is None:
        return '<td colspan="4"></td>'
    delta, _, p, verdict = verdict_view.comparison_cells(t)
    accuracies = (f"accuracy {verdict_view.number(t.accuracy_before)} → {verdict_view.number(t.accuracy_after)} "
                  f"on the same {t.n} rows")
    flips = _flip_links(t, prefix, seed, comparison.against_stage, comparison.stage)
    return (f'<td class="num" title="{esc(accuracies)}">{esc(delta)}</td><td class="num flips">{flips}</td>'
            f'<td class="num" title="unadjusted p {esc(verdict_view.p_text(t.p_value))}">{esc(p)}</td>'
            f'<td class="{VERDICT_CLASS.get(t.verdict, "verdict")}">{esc(verdict)}</td>')


def seed_table(seed: int, record: schema.StatisticsRecord, prefix: str) -> str:
    """One seed's comparisons: a row per trained checkpoint and task, the checkpoints' rows set apart."""
    columns = verdict_view.comparison_columns(record.settings)
    groups = "".join(f'<th colspan="4">{esc(label)}</th>' for _, label in AGAINST)
    head = (f'<tr><th rowspan="2">checkpoint</th><th rowspan="2">task</th>{groups}</tr>'
            "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns * len(AGAINST)) + "</tr>")
    rows, last_stage = [], None
    for row in verdict_view.verdict_rows({seed: record}):
        classes = [name for name, on in (("block", last_stage is not None and row["stage"] != last_stage),
                                         ("regressed", any(row[a] is not None and row[a].verdict == "regressed"
                                                           for a, _ in AGAINST))) if on]
        last_stage = row["stage"]
        cells = "".join(_comparison_cells(row[a], record.comparison(row["stage"], a), prefix, seed)
                        for a, _ in AGAINST)
        attribute = ' class="' + " ".join(classes) + '"' if classes else ""
        rows.append(f'<tr{attribute}><th>after {esc(row["checkpoint"])}</th><td>{esc(row["task"])}</td>{cells}</tr>')
    return (f'<div class="scroll"><table class="verdicts" data-seed="{seed}"><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _regressions(records: dict[int, schema.StatisticsRecord]) -> str:
    lines = verdict_view.regression_lines(records)
    if not lines:
        return ('<p class="allclear"><b>No regression detected:</b> no task of any trained checkpoint is worse than '
                "the previous checkpoint or the base beyond chance.</p>")
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return f'<div class="alert"><b>Regressions ({len(lines)})</b><ul>{items}</ul></div>'


def verdicts_section(records: dict[int, schema.StatisticsRecord], prefix: str, heading: str = "h2") -> str:
    """The section's content (html.py wraps it): how to read it, the regressions, a table per seed, and what the
    test sizes can show at all (a "no detectable change" on a small test set says little)."""
    first = next(iter(records.values()))
    settings = first.settings
    sub = "h3" if heading == "h2" else "h4"
    correction = "Holm-adjusted over the tasks" if settings.correction == "holm" else "unadjusted"
    intro = (f"<p>Each trained checkpoint against the previous one and against the base, on the same test rows: "
             f"Δ accuracy with its {settings.confidence:.0%} paired bootstrap interval; the flips, ↓ right → wrong "
             f"and ↑ wrong → right (a count opens those examples in the example browser below); the exact "
             f"McNemar p, {correction}; the verdict at α {settings.alpha:g}.</p>")
    multi = len(records) > 1
    tables = "".join((f"<{sub}>Seed {seed}</{sub}>" if multi else "") + seed_table(seed, record, prefix)
                     for seed, record in records.items())
    sizes = "".join(f"<li>{esc(line)}</li>" for line in verdict_view.detectable_lines(first))
    same = " (the same for every seed: they share the test rows)" if multi else ""
    return (intro + _regressions(records) + tables +
            f"<{sub}>What the test sizes can show</{sub}><ul>{sizes}</ul>"
            f'<p class="note">The smallest drop each test size can show at all{esc(same)}: a smaller true drop '
            "reads as “no detectable change” whatever the model did.</p>")
