"""One self-contained HTML page for a run (`lorawatch show RUN --html`) or a study (`lorawatch report RUN...
--html`), to open from a file, offline.

Nothing on the page is fetched: figures are inline SVG, CSS and JS are inline, fonts are the system's. A
Content-Security-Policy in the page itself forbids every request but data: images (the favicon), so even a
future edit that adds a remote resource is blocked by the browser and shows up as a console error (which the
tests look for) rather than as a silent request. The example browser's data lives in one JSON blob
(report/html_examples.py) rendered by a little plain JS.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lorawatch.rundir import atomic, schema
from lorawatch.rundir.layout import COSTS, MONITOR_SETTINGS
from lorawatch.analysis import significance
from lorawatch.report import verdict_view
from lorawatch.report.monitoring_view import interventions, monitor_series
from lorawatch.report.html_examples import BROWSER_CSS, BROWSER_JS, browser_section, finished_stages
from lorawatch.report.html_verdicts import VERDICT_CSS, verdicts_section
from lorawatch.report.tables import RunResults, load_run

esc = html.escape
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")
HEADLINE = (("final_avg_accuracy", "Final avg accuracy", "mean over all tasks after the last stage"),
            ("bwt", "BWT", "backward transfer: < 0 means forgetting"), ("fwt", "FWT", "forward transfer"),
            ("learning_accuracy", "Learning accuracy", "R[k,k], mean over tasks"),
            ("mean_gain", "Mean gain", "R[k,k] − R[k−1,k], mean over tasks"),
            ("final_kl_to_base", "Final KL to base", "reference set, after the last stage"))

CSS = """
:root{--fg:#1d2330;--mute:#5b6475;--line:#d9dde5;--bg:#f6f7f9;--accent:#2f5fb3;--bad:#b3261e;--good:#1b7f3b}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;color:var(--fg);
  background:var(--bg)}
header.top{background:#fff;border-bottom:1px solid var(--line);padding:16px max(16px,calc(50% - 600px))}
header.top h1{margin:0 0 4px;font-size:1.45rem} .sub-title{color:var(--mute);margin:0;overflow-wrap:anywhere}
nav{display:flex;flex-wrap:wrap;gap:4px 14px;margin-top:10px;font-size:.9rem} nav a{color:var(--accent)}
main{max-width:1200px;margin:0 auto;padding:8px 16px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:16px 0}
h2{font-size:1.2rem;margin:.2em 0 .6em} h3{font-size:1.05rem;margin:1em 0 .5em}
.note{color:var(--mute);font-size:.9rem} .num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:10px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 12px;background:#fbfcfe}
.card .v{font-size:1.35rem;font-weight:600;font-variant-numeric:tabular-nums} .card .k{font-weight:600}
.card small{display:block;color:var(--mute)} .card .ci{color:var(--fg);font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.9rem;margin:4px 0}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;vertical-align:top}
th{text-align:left;background:#f0f2f6} tr.block td{border-top:2px solid #aab}
td.heat{text-align:center;min-width:80px;font-variant-numeric:tabular-nums;white-space:nowrap}
td.heat .ci{display:block;font-size:.78rem;opacity:.9}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:12px;align-items:start}
svg{display:block;width:100%;height:auto} figure{margin:8px 0} figcaption{color:var(--mute);font-size:.88rem}
.wide{overflow-x:auto} .wide svg{min-width:540px} details{margin:6px 0} summary{cursor:pointer;font-weight:600}
pre{background:#f4f5f8;border:1px solid var(--line);border-radius:6px;padding:8px;overflow:auto;max-height:480px;
  font-size:.82rem}
details.run{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 14px;margin:16px 0}
details.run>summary{font-size:1.1rem}
details.run section{border:0;padding:0 0 8px;border-top:1px solid var(--line);border-radius:0}
@media (max-width:600px){main{padding:4px 8px 32px} section{padding:10px} header.top{padding:12px}}
""" + BROWSER_CSS + VERDICT_CSS


# --- small builders ----------------------------------------------------------------------------------------------


def _number(value, digits: int = 3) -> str:
    """A table's number (pandas reads a column of zeros as integers: still shown as 0.000); "—" if undefined."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return "—" if value is None else str(value)
    text = f"{float(value):.{digits}f}" if math.isfinite(float(value)) else "—"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # -0.000 says nothing more than 0.000


def _mean_std(mean, std, multi: bool, digits: int = 3) -> str:
    text, spread = _number(mean, digits), _number(std, digits)
    return text + (f" ± {spread}" if multi and "—" not in (text, spread) else "")


def _table(headers: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """Cells are text, escaped here; columns from `numeric_from` on are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i >= numeric_from else ""}>{esc(str(c))}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(ident: str, title: str, content: str, heading: str) -> str:
    return f'<section id="{ident}"><{heading}>{esc(title)}</{heading}>{content}</section>'


def _details(summary: str, text: str) -> str:
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>"


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


def _figure_svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return inline_svg(buffer.getvalue())


def _file_svg(path: Path, caption: str, wide: bool = True) -> str:
    if not path.is_file():
        return f'<p class="note">{esc(path.name)} is not in the report folder.</p>'
    return (f'<figure{" class=wide" if wide else ""}>{inline_svg(path.read_text(encoding="utf-8"))}'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


# --- a run's sections ------------------------------------------------------------------------------------------------


Records = dict[int, schema.StatisticsRecord]  # seed -> its intervals and verdicts (RunResults.statistics)


def _bracket(low: float | None, high: float | None, digits: int = 2, sign: bool = False) -> str:
    """`[0.31, 0.69]` (a difference: `[−0.05, +0.25]`), as the terminal writes an interval; "" when there is none."""
    if low is None or high is None:
        return ""
    show = verdict_view.signed if sign else verdict_view.number
    return f"[{show(low, digits)}, {show(high, digits)}]"


def _headline_interval(results: RunResults, records: Records, key: str) -> str:
    """One seed: the bootstrap interval over test rows; several: the t interval of the mean over seeds (as the
    terminal's summary line)."""
    if len(results.seeds) > 1:
        # from the per-seed values, as the terminal does: a summary written before the intervals gets one too
        per_seed = results.summary()["per_seed"]
        interval = significance.seed_interval([per_seed[str(seed)].get(key) for seed in results.seeds],
                                              next(iter(records.values())).settings.confidence)
        return "" if interval is None else _bracket(*interval)
    found = verdict_view.interval_of(records[results.seeds[0]], None, key)
    return "" if found is None else _bracket(found.low, found.high)


def _card(label: str, value: str, interval: str, hint: str) -> str:
    return (f'<div class="card"><span class="k">{esc(label)}</span><div class="v">{esc(value)}</div>'
            + (f'<small class="ci">{esc(interval)}</small>' if interval else "") + f"<small>{esc(hint)}</small></div>")


def _vs_base_card(results: RunResults, records: Records) -> str:
    """The final average accuracy minus the base model's (below 0: the paper's failure zone), from the records'
    headline, as the terminal's summary line; "" for a record without it."""
    found = [verdict_view.interval_of(records[seed], None, "final_avg_vs_base") for seed in results.seeds]
    if not found or any(f is None for f in found):
        return ""
    hint = "final avg accuracy minus the base model's: < 0 is the failure zone"
    if len(found) == 1:
        return _card("Final avg vs base", verdict_view.signed(found[0].value),
                     _bracket(found[0].low, found[0].high, sign=True), hint)
    values = np.array([f.value for f in found])
    interval = significance.seed_interval(list(values), next(iter(records.values())).settings.confidence)
    return _card("Final avg vs base", f"{verdict_view.signed(float(values.mean()))} ± {values.std(ddof=1):.3f}",
                 "" if interval is None else _bracket(*interval, sign=True), hint)


def _headline(results: RunResults, records: Records) -> str:
    stats, multi = results.summary()["mean_std"], len(results.seeds) > 1
    level = f"{next(iter(records.values())).settings.confidence:.0%}"
    cards = []
    for key, label, hint in HEADLINE:
        if key not in stats:
            continue
        cards.append(_card(label, _mean_std(stats[key]["mean"], stats[key]["std"], multi),
                           _headline_interval(results, records, key), hint))
        if key == "final_avg_accuracy":
            cards.append(_vs_base_card(results, records))
    seeds = f"mean ± std over seeds {', '.join(map(str, results.seeds))}" if multi else f"seed {results.seeds[0]}"
    brackets = (f"{level} t interval of the mean over the {len(results.seeds)} seeds" if multi else
                f"{level} bootstrap interval over test rows")
    return f'<div class="cards">{"".join(cards)}</div><p class="note">{esc(seeds)}; in brackets: {brackets}.</p>'


def _heatmap(results: RunResults, records: Records) -> str:
    """The accuracy matrix as a table coloured like the report's heatmap (viridis, 0..1): crisp at any width.
    One seed: each cell with its Wilson interval (several seeds: mean ± std, the spread that matters there)."""
    multi = len(results.seeds) > 1
    record = None if multi else records[results.seeds[0]]
    mean = results.accuracy_matrix()
    std = results.accuracy_matrix(stat="std") if multi else None
    tasks = [c for c in mean.columns if c != "checkpoint"]
    cmap = matplotlib.colormaps["viridis"]
    rows = []
    for i, row in mean.iterrows():
        cells = []
        for task in tasks:
            value = float(row[task])
            color = "#ccc" if not math.isfinite(value) else matplotlib.colors.to_hex(cmap(min(max(value, 0.0), 1.0)))
            ink = "#fff" if math.isfinite(value) and value < 0.6 else "#000"
            weight = ";font-weight:700" if i > 0 and row["checkpoint"] == task else ""  # the task just learned
            text = esc(_mean_std(value, None if std is None else float(std.loc[i, task]), multi))
            found = None if record is None else verdict_view.accuracy_of(record, row["checkpoint"], task)
            title = ""
            if found is not None:
                text += f'<span class="ci">{esc(_bracket(found.low, found.high))}</span>'
                title = f' title="{found.correct}/{found.n} right"'
            cells.append(f'<td class="heat" style="background:{color};color:{ink}{weight}"{title}>{text}</td>')
        label = "base" if i == 0 else f"after {row['checkpoint']}"
        rows.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{esc(t)}</th>" for t in tasks)
    return (f'<div class="scroll"><table class="heatmap"><thead><tr><th>checkpoint \\ task</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div><p class="note">Rows are checkpoints, columns tasks in '
            "training order; bold: the task just learned; colour: accuracy from 0 (dark) to 1 (yellow)"
            + ("; mean ± std over seeds." if multi else
               f"; in brackets: {record.settings.confidence:.0%} Wilson interval over the task's test rows.") + "</p>")


def _metric_cell(value, record: schema.StatisticsRecord, checkpoint: str, metric: str) -> str:
    found = verdict_view.interval_of(record, checkpoint, metric)
    return _number(value) if found is None else verdict_view.with_interval(value, found.low, found.high)


def _metrics(results: RunResults, records: Records) -> str:
    """Mean ± std over seeds, or one seed's metrics each with its bootstrap interval over test rows."""
    multi = len(results.seeds) > 1
    mean, std = results.cl_metrics(), results.cl_metrics(stat="std") if multi else None
    columns = ["op", "bwt", "fwt", "avg_all", "gain", "delta_vs_base"]
    if multi:
        rows = [[r["checkpoint"]] + [_mean_std(r[c], std.loc[i, c], multi) for c in columns]
                for i, r in mean.iterrows()]
        note = "mean ± std over seeds"
    else:
        record = records[results.seeds[0]]
        rows = [[r["checkpoint"]] + [_metric_cell(r[c], record, r["checkpoint"], c) for c in columns]
                for _, r in mean.iterrows()]
        note = (f"in brackets: {record.settings.confidence:.0%} bootstrap interval over test rows (resampled within "
                "each task, the same rows for every checkpoint)")
    return (_table(["checkpoint", "OP", "BWT", "FWT", "avg (all tasks)", "gain", "vs base"], rows) +
            f'<p class="note">{esc(note)}.</p>')


def _drift(results: RunResults, records: Records) -> str:
    multi = len(results.seeds) > 1
    mean, std = results.stability(), results.stability(stat="std") if multi else None
    columns = [("kl_mean", "KL to base"), ("kl_p95", "KL p95"), ("entropy_mean", "entropy"),
               ("entropy_mean_delta", "Δ entropy"), ("margin_mean", "margin"), ("margin_mean_delta", "Δ margin"),
               ("reference_accuracy", "reference acc")]
    columns = [(c, h) for c, h in columns if c in mean.columns]
    # one seed: KL to base with its bootstrap interval over the reference rows, as the terminal shows it
    kl = {} if multi else {row.checkpoint: row for row in records[results.seeds[0]].drift}

    def cell(i: int, row, column: str) -> str:
        found = kl.get(row["checkpoint"]) if column == "kl_mean" else None
        if found is not None:
            # four digits: a KL to base is often below 0.01, where two would read [0.00, 0.00]
            return f"{_number(row[column], 4)} {_bracket(found.low, found.high, 4)}"
        return _mean_std(row[column], None if std is None else std.loc[i, column], multi)

    rows = [[r["checkpoint"]] + [cell(i, r, c) for c, _ in columns] for i, r in mean.iterrows()]
    panels = []
    per_seed = {s: results.stability(s) for s in results.seeds}
    labels = ["base"] + list(mean["checkpoint"])[1:]
    for column, title in (("kl_mean", "KL to base"), ("entropy_mean_delta", "Δ entropy vs base"),
                          ("margin_mean_delta", "Δ top-2 margin vs base")):
        if column not in mean.columns:
            continue
        with _style():
            fig = Figure(figsize=(3.6, 2.6), layout="constrained")
            ax = fig.add_subplot()
            x = np.arange(len(mean))
            if multi:
                for frame in per_seed.values():
                    ax.plot(x[:len(frame)], frame[column], color="#9bb0d6", linewidth=1)
            ax.plot(x, mean[column], marker="o", color="#2f5fb3", linewidth=2)
            ax.set_xticks(x, labels, rotation=20, ha="right")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            panels.append(_figure_svg(fig))
    return (_table(["checkpoint"] + [h for _, h in columns], rows) +
            f'<div class="figs">{"".join(f"<figure>{p}</figure>" for p in panels)}</div><p class="note">On the '
            "reference set, at each row's answer position: KL(checkpoint ‖ base) of the next-token distribution, its "
            "entropy and the top-1 minus top-2 log-probability" + (" (thin lines: each seed)." if multi else ".")
            + (f" KL to base in brackets: its {records[results.seeds[0]].settings.confidence:.0%} bootstrap interval "
               "over the reference rows." if kl else "") + "</p>" + _drift_changes(records))


def _drift_changes(records: Records) -> str:
    """How KL to base moved at each checkpoint, with its paired interval over the reference rows (the terminal's
    line, verdict_view.drift_change_lines); nothing for records without it."""
    lines = verdict_view.drift_change_lines(records)
    if not lines:
        return ""
    level = f"{next(iter(records.values())).settings.confidence:.0%}"
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return (f"<p>KL to base after each checkpoint (in parentheses its change from the previous checkpoint, "
            f"[{level} paired bootstrap interval over the reference rows]):</p><ul>{items}</ul>")


def _monitor(results: RunResults) -> str | None:
    series = monitor_series(results.path)
    if series.empty:
        return None
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
        svg = _figure_svg(fig)
    taken = interventions(results.path)
    table = _table(["seed", "stage", "task", "action", "step", "KL", "threshold", "kept step", "kept KL"],
                   [[e["seed"], e["stage"], e["task"], e["action"], e["step"], f"{e['kl']:.4f}",
                     f"{e['threshold']:.4f}", e["kept_step"], _number(e["kept_kl"], 4)] for e in taken],
                   numeric_from=4) if taken else "<p>No interventions.</p>"
    settings = results.monitor_settings()
    said = json.dumps(settings.body(), indent=1) if settings else f"(no {MONITOR_SETTINGS})"
    return (f'<figure class="wide">{svg}<figcaption>Live drift measured while each stage trained (dashed: the '
            "stage's threshold; ×: above it; dotted: stage starts).</figcaption></figure>"
            f"<h3>Interventions</h3>{table}" + _details(f"Monitor settings ({MONITOR_SETTINGS})", said))


def _costs(results: RunResults) -> str:
    parts = []
    costs = results.costs()
    if costs is None:
        parts.append(f"<p>No {COSTS} in this run folder.</p>")
    else:
        total = sum(costs.phase_seconds.values()) or 1.0
        parts.append(f"<p>Wall time <b>{costs.wall_seconds:.1f} s</b> · peak memory (RSS) "
                     f"<b>{costs.peak_rss_bytes / 2**20:.0f} MiB</b>{' · resumed' if costs.resumed else ''} "
                     "(the run's latest command).</p>")
        parts.append(_table(["phase", "seconds", "share"], [[k, f"{v:.2f}", f"{v / total:.0%}"]
                                                             for k, v in costs.phase_seconds.items()]))
        if costs.generation:
            fields = list(next(iter(costs.generation.values())).model_dump())
            parts.append("<h3>Generation</h3>" + _table(["phase"] + [f.replace("_", " ") for f in fields],
                                                         [[k] + list(v.model_dump().values())
                                                          for k, v in costs.generation.items()]))
        if costs.fast_path:
            used = ", ".join(k for k, v in costs.fast_path.used.items() if v) or "none"
            off = "; ".join(f"{k}: {v}" for k, v in costs.fast_path.switched_off.items())
            off = f" Switched off: {off}." if off else ""
            parts.append(f"<p>Fast-path parts used: {esc(used)}.{esc(off)}</p>")
    rows = []
    for seed in results.seeds:
        for k in finished_stages(results.path, seed)[1:]:
            stage = results.stage(seed, k)
            t = stage.training
            rows.append([seed, k, stage.task or stage.checkpoint, t.optimizer_steps if t else "—",
                         f"{t.seconds:.1f}" if t else "—", _number(stage.eval_seconds, 1),
                         f"{_number(t.first_loss)} → {_number(t.last_loss)}" if t else "—"])
    if rows:
        parts.append("<h3>Per stage</h3>" + _table(["seed", "stage", "task", "optimizer steps", "training s",
                                                     "evaluation s", "loss first → last"], rows, numeric_from=3))
    return "".join(parts)


def _config(results: RunResults) -> str:
    shown = []
    for path in results.folder.described_files():
        name = path.name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            if path.suffix == ".json":
                try:
                    text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
                except ValueError:
                    pass  # shown as it is: the page describes the folder, `lorawatch check` judges it
            shown.append(_details(name, text))
    return "".join(shown) or "<p>No configuration files found.</p>"


def run_sections(results: RunResults, prefix: str = "", heading: str = "h2") -> tuple[str, list[tuple[str, str]]]:
    """A run's sections and the (anchor, title) of each, for the navigation; `prefix` keeps anchors unique
    when several runs share a page."""
    monitor = _monitor(results)
    records = {seed: results.statistics(seed) for seed in results.seeds}  # read once, shown in four sections
    parts = [("overview", "Headline", "Headline numbers", _headline(results, records)),
             ("matrix", "Accuracy matrix", "Accuracy matrix", _heatmap(results, records)),
             ("metrics", "OP/BWT/FWT", "Continual-learning metrics per checkpoint", _metrics(results, records)),
             ("verdicts", "Is it real?", "Is it real? Each checkpoint against the previous one and the base",
              verdicts_section(records, prefix, heading)),
             ("drift", "KL, entropy, margin", "Drift on the reference set per stage", _drift(results, records)),
             ("monitor", "Live drift", "Live drift monitoring", monitor),
             ("examples", "Examples", None, browser_section(results, prefix, heading)),
             ("costs", "Costs", "Costs of the run", _costs(results)),
             ("config", "Config", "Config and environment", _config(results))]
    parts = [p for p in parts if p[3] is not None]  # no live drift without a monitor
    body = "".join(content if title is None else _section(prefix + ident, title, content, heading)
                   for ident, _, title, content in parts)
    return body, [(prefix + ident, label) for ident, label, _, _ in parts]


def _run_line(results: RunResults) -> str:
    config = results.config
    return (f"{config.model.spec} · {' → '.join(results.tasks)} · seed{'s' if len(results.seeds) > 1 else ''} "
            f"{', '.join(map(str, results.seeds))} · {results.path}")


# --- pages ------------------------------------------------------------------------------------------------------------


def _page(title: str, subtitle: str, nav: list[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{esc(title)}</title><link rel="icon" href="data:,"><style>{CSS}</style></head><body>'
            f'<header class="top"><h1>{esc(title)}</h1><p class="sub-title">{esc(subtitle)}</p><nav>{links}</nav>'
            f"</header><main>{body}</main><script>{BROWSER_JS}</script></body></html>\n")


def _write(out_file: Path, page: str) -> Path:
    out_file = Path(out_file)
    # errors="replace": a lone surrogate in a model's output must not stop the page from being written
    atomic.write_bytes(out_file, page.encode("utf-8", errors="replace"))
    return out_file


def write_run_html(run_dir: Path, out_file: Path) -> Path:
    """One finished run as a self-contained page; returns `out_file`."""
    results = load_run(run_dir)
    body, nav = run_sections(results)
    return _write(out_file, _page(f"lorawatch · {results.config.name}", _run_line(results), nav, body))


_TEXT_HEADERS = {"Model", "Order", "Step", "Learned task", "Checkpoint"}  # left-aligned, as in paper_tables


def _report_table(table) -> str:
    groups = ""
    if table.header_groups:
        groups = "".join(f'<th colspan="{span}">{esc(label)}</th>' for label, span in table.header_groups)
        groups = f"<tr>{groups}</tr>"
    labels = sum(1 for h in table.headers if h in _TEXT_HEADERS)
    head = groups + "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.headers) + "</tr>"
    body = "".join(f'<tr{" class=block" if i in table.block_starts and i else ""}>' +
                   "".join(f'<td{" class=num" if j >= labels else ""}>{esc(c)}</td>' for j, c in enumerate(row))
                   + "</tr>"
                   for i, row in enumerate(table.rows))
    return (f'<h3>{esc(table.title)}</h3><div class="scroll"><table><thead>{head}</thead><tbody>{body}</tbody></table>'
            f'</div><p class="note">{esc(table.note)}</p>')


def _correlation(corr: dict) -> str:
    def line(entries: dict, label: str) -> str:
        parts = [f"{name.title()} not computed ({entries[name]['reason']})" if entries[name]["r"] is None else
                 f"{name.title()} r = {entries[name]['r']:.3f}, p = {entries[name]['p']:.3g}"
                 for name in ("pearson", "spearman")]
        return f"<li>{esc(label)} ({entries['n']} points): {esc('; '.join(parts))}</li>"

    zone = corr.get("failure_zone") or {}
    zone_text = (f"Failure zone: KL to base > {zone['threshold']:.4g} (balanced accuracy "
                 f"{zone['balanced_accuracy']:.3f})." if zone.get("threshold") is not None else
                 f"Failure zone: no threshold ({zone.get('reason', 'not fitted')}).")
    items = [line(corr, "All models pooled")] + [line(e, m) for m, e in (corr.get("per_model") or {}).items()]
    return f"<ul>{''.join(items)}</ul><p>{esc(zone_text)}</p><p class=\"note\">{esc(corr.get('independence', ''))}</p>"


def write_report_html(report, out_file: Path) -> Path:
    """The study of `lorawatch.report.study_report.write_report(...)`'s result as one page: its tables and figures (read from
    the report folder), then every run folder's own sections, collapsed."""
    study, out = report.study, Path(report.out)
    runs = [(g, Path(d)) for g in study.groups for d in g.run_dirs]
    overview = _table(["Model", "Spec", "Order", "Tasks (training order)", "Seeds", "Run folders"],
                      [[g.model, g.spec, g.order, " → ".join(g.tasks), ", ".join(map(str, g.seeds)),
                        ", ".join(map(str, g.run_dirs))] for g in study.groups], numeric_from=99)
    sections = [("study", "Runs in this study", overview),
                ("tables", "The paper's tables", "".join(_report_table(t) for t in report.tables)),
                ("figure1", "Figure 1: KL to base against average accuracy",
                 _file_svg(out / "figure1.svg", "Every checkpoint after a training step (seed means).") +
                 _correlation(report.correlation)),
                ("figure2", "Figure 2: KL to base per step",
                 _file_svg(out / "figure2.svg", "Original order solid, reversed dashed.")),
                ("figure3", "Figure 3: final accuracy against final drift",
                 _file_svg(out / "figure3.svg", "One point per run and seed."))]
    per_model = [p for p in report.files if p.suffix == ".svg" and p.name.startswith("model-")]
    sections.append(("models", "Per model: accuracy matrix and accuracy/KL per step",
                     f'<div class="figs">{"".join(_file_svg(p, p.stem, wide=False) for p in per_model)}</div>'))
    if (out / "monitor.svg") in report.files:
        taken = [dict(e, run=d.name) for _, d in runs for e in interventions(d)]
        sections.append(("live", "Live drift monitoring", _file_svg(out / "monitor.svg", "KL to base during training.")
                         + (_table(["run", "seed", "stage", "task", "action", "step", "KL", "threshold", "kept step"],
                                   [[e["run"], e["seed"], e["stage"], e["task"], e["action"], e["step"],
                                     f"{e['kl']:.4f}", f"{e['threshold']:.4f}", e["kept_step"]] for e in taken],
                                   numeric_from=5) if taken else "<p>No interventions.</p>")))
    body = "".join(_section(i, t, c, "h2") for i, t, c in sections)
    nav = [(i, t.split(":")[0]) for i, t, _ in sections]
    for n, (group, run_dir) in enumerate(runs, start=1):
        results = load_run(run_dir)
        content, _ = run_sections(results, prefix=f"run{n}-", heading="h3")
        body += (f'<details class="run" id="run{n}"><summary>Run {n}: {esc(run_dir.name)} · {esc(group.label)}'
                 f'</summary><p class="note">{esc(_run_line(results))}</p>{content}</details>')
        nav.append((f"run{n}", f"Run {n}: {run_dir.name}"))
    subtitle = f"{len(study.groups)} model × order group(s) from {len(runs)} run folder(s) · report folder {out}"
    return _write(out_file, _page("lorawatch report", subtitle, nav, body))
