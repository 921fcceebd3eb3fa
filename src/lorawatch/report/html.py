"""One self-contained HTML page for a run (`lorawatch show RUN --html`) or a study (`lorawatch report RUN...
--html`), to open from a file, offline.

Nothing on the page is fetched: figures are inline SVG, CSS and JS are inline, fonts are the system's. A
Content-Security-Policy in the page itself forbids every request but data: images (the favicon), so even a
future edit that adds a remote resource is blocked by the browser and shows up as a console error (which the
tests look for) rather than as a silent request. The example browser's data lives in one JSON blob
(report/html_examples.py) rendered by a little plain JS.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path

import matplotlib
import numpy as np
from jinja2 import Environment, PackageLoader
from markupsafe import Markup

from lorawatch.analysis.metrics import METRIC_COLUMNS
from lorawatch.rundir import atomic, schema
from lorawatch.rundir.layout import MONITOR_SETTINGS
from lorawatch.analysis import significance
from lorawatch.report import deployed_view, drift_signals, html_figures, labels, verdict_view
from lorawatch.report.monitoring_view import interventions, monitor_series
from lorawatch.report.html_examples import browser_section, finished_stages
from lorawatch.report.html_verdicts import verdicts_section
from lorawatch.report.tables import RunResults, load_run

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")

# The page's markup is in templates/ (shipped with the package), escaping every value it is given; a value the
# code built as markup (a figure, a finished section) is passed as Markup.
_TEMPLATES = Environment(loader=PackageLoader("lorawatch.report", "templates"), autoescape=True)
_PARTS = _TEMPLATES.get_template("parts.html.j2").module
_RUN = _TEMPLATES.get_template("run.html.j2").module
_STUDY = _TEMPLATES.get_template("study.html.j2").module


def _static(name: str) -> str:
    """A stylesheet or script of the page, shipped beside the templates."""
    return files("lorawatch.report").joinpath("templates", name).read_text(encoding="utf-8")


def _css() -> Markup:
    return Markup(_static("page.css") + _static("browser.css") + _static("verdicts.css"))


# --- small builders ----------------------------------------------------------------------------------------------


def _number(value, digits: int = 3) -> str:
    return labels.number(value, digits, unsigned_zero=True)  # -0.000 says nothing more than 0.000


def _mean_std(mean, std, multi: bool, digits: int = 3) -> str:
    return labels.mean_sd(mean, std if multi else None, digits, unsigned_zero=True)


def _table(headers: list[str], rows: list[list], numeric_from: int = 1) -> Markup:
    """Columns from `numeric_from` on are right-aligned."""
    return _PARTS.table(headers, rows, numeric_from)


def _section(ident: str, title: str, content: str, heading: str) -> Markup:
    return _PARTS.section(ident, title, Markup(content), heading)


def _details(summary: str, text: str) -> Markup:
    return _PARTS.details(summary, text)


def _file_svg(path: Path, caption: str, wide: bool = True) -> Markup:
    if not path.is_file():
        return _PARTS.note(f"{path.name} is not in the report folder.")
    return _PARTS.figure(Markup(html_figures.inline_svg(path.read_text(encoding="utf-8"))), caption, wide)


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


def _card(label: str, value: str, interval: str, hint: str) -> dict:
    return {"label": label, "value": value, "interval": interval, "hint": hint}


def _vs_base_card(results: RunResults, records: Records) -> dict | None:
    """The final average accuracy minus the base model's (below 0: the paper's failure zone), from the records'
    headline, as the terminal's summary line; None for a record without it."""
    found = [verdict_view.interval_of(records[seed], None, "final_avg_vs_base") for seed in results.seeds]
    if not found or any(f is None for f in found):
        return None
    hint = "final avg accuracy minus the base model's: < 0 is the failure zone"
    if len(found) == 1:
        return _card("Final avg vs base", verdict_view.signed(found[0].value),
                     _bracket(found[0].low, found[0].high, sign=True), hint)
    values = np.array([f.value for f in found])
    interval = significance.seed_interval(list(values), next(iter(records.values())).settings.confidence)
    return _card("Final avg vs base", f"{verdict_view.signed(float(values.mean()))} ± {values.std(ddof=1):.3f}",
                 "" if interval is None else _bracket(*interval, sign=True), hint)


def _headline(results: RunResults, records: Records) -> Markup:
    stats, multi = results.summary()["mean_std"], len(results.seeds) > 1
    level = f"{next(iter(records.values())).settings.confidence:.0%}"
    cards = []
    for h in labels.HEADLINE:
        if h.key not in stats:
            continue
        cards.append(_card(h.title, _mean_std(stats[h.key]["mean"], stats[h.key]["std"], multi),
                           _headline_interval(results, records, h.key), h.hint))
        if h.key == "final_avg_accuracy":
            cards.append(_vs_base_card(results, records))
    seeds = f"mean ± std over seeds {', '.join(map(str, results.seeds))}" if multi else f"seed {results.seeds[0]}"
    brackets = (f"{level} t interval of the mean over the {len(results.seeds)} seeds" if multi else
                f"{level} bootstrap interval over test rows")
    return _RUN.headline([c for c in cards if c is not None], seeds, brackets)


def _heatmap(results: RunResults, records: Records) -> Markup:
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
            found = None if record is None else verdict_view.accuracy_of(record, row["checkpoint"], task)
            cells.append({
                "background": matplotlib.colors.to_hex(cmap(min(max(value, 0.0), 1.0))) if math.isfinite(value)
                else "#ccc",
                "ink": "#fff" if math.isfinite(value) and value < 0.6 else "#000",
                "bold": i > 0 and row["checkpoint"] == task,  # the task just learned
                "text": _mean_std(value, None if std is None else float(std.loc[i, task]), multi),
                "interval": None if found is None else _bracket(found.low, found.high),
                "title": None if found is None else f"{found.correct}/{found.n} right"})
        rows.append(("base" if i == 0 else f"after {row['checkpoint']}", cells))
    confidence = None if record is None else f"{record.settings.confidence:.0%}"
    return Markup(_TEMPLATES.get_template("heatmap.html.j2").render(tasks=tasks, rows=rows, confidence=confidence))


def _metric_cell(value, record: schema.StatisticsRecord, checkpoint: str, metric: str) -> str:
    found = verdict_view.interval_of(record, checkpoint, metric)
    return _number(value) if found is None else verdict_view.with_interval(value, found.low, found.high)


def _metrics(results: RunResults, records: Records) -> Markup:
    """Mean ± std over seeds, or one seed's metrics each with its bootstrap interval over test rows."""
    multi = len(results.seeds) > 1
    mean, std = results.cl_metrics(), results.cl_metrics(stat="std") if multi else None
    columns = METRIC_COLUMNS
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
    return _RUN.metrics(["checkpoint", *labels.METRIC_HEADERS.values()], rows, note)


def _drift(results: RunResults, records: Records) -> Markup:
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
    panels = [Markup(svg) for svg in html_figures.drift_panels(mean, [results.stability(s) for s in results.seeds]
                                                                 if multi else [])]
    level = f"{next(iter(records.values())).settings.confidence:.0%}"
    # How KL to base moved at each checkpoint, with its paired interval over the reference rows (the terminal's
    # line); nothing for records without it.
    return _RUN.drift(["checkpoint"] + [h for _, h in columns], rows, panels, multi, level if kl else None,
                      verdict_view.drift_change_lines(records), level)


def _drift_signals(results: RunResults) -> Markup:
    """Each checkpoint against the base, seed by seed, on the reference set and the task just trained."""
    rows = []
    for seed in results.seeds:
        for row in drift_signals.seed_signals(results.folder, seed):
            rows.append([seed, row["checkpoint"], row["set"], row["n"], *drift_signals.cells(row)])
    note = Markup("<p>Mean over the prompts ± its standard error, as llama.cpp's <code>--kl-divergence</code> "
                  "reports a quantization: on the reference set, and on the test prompts of the task each checkpoint "
                  "was just trained on. —: not measured (a run folder from before these statistics).</p>")
    return note + _table(["seed", "checkpoint", "prompts", "n", *drift_signals.HEADERS], rows, numeric_from=3)


def _deployed(results: RunResults) -> Markup | None:
    """The deployed forms (`lorawatch deploy`) against their PyTorch checkpoints; None when the run has none."""
    frame = deployed_view.run_frame(results.path, results.seeds, results.config.statistics)
    if frame.empty:
        return None
    parts = [Markup("<p>{}</p>").format(deployed_view.EXPLANATION.replace("`", ""))]  # format() escapes
    for seed, part in frame.groupby("seed", sort=False):
        parts.append(Markup("<h4>seed {}</h4>").format(seed))
        parts.append(_table(deployed_view.ACCURACY_HEADERS,
                            [deployed_view.accuracy_cells(row) for _, row in part.iterrows()], numeric_from=3))
        forms = part.drop_duplicates(["stage", "format"])
        parts.append(_table(deployed_view.DRIFT_HEADERS,
                            [deployed_view.drift_cells(row) for _, row in forms.iterrows()], numeric_from=2))
    return Markup("").join(parts)


def _monitor(results: RunResults) -> Markup | None:
    series = monitor_series(results.path)
    if series.empty:
        return None
    svg = Markup(html_figures.monitor_figure(series))
    rows = [[e["seed"], e["stage"], e["task"], e["action"], e["step"], f"{e['kl']:.4f}", f"{e['threshold']:.4f}",
             e["kept_step"], _number(e["kept_kl"], 4)] for e in interventions(results.path)]
    settings = results.monitor_settings()
    said = json.dumps(settings.body(), indent=1) if settings else f"(no {MONITOR_SETTINGS})"
    return _RUN.monitor(svg, ["seed", "stage", "task", "action", "step", "KL", "threshold", "kept step", "kept KL"],
                        rows, said)


def _costs(results: RunResults) -> Markup:
    costs = results.costs()
    phases, generation, used, off = [], None, None, ""
    if costs is not None:
        total = sum(costs.phase_seconds.values()) or 1.0
        phases = [[k, f"{v:.2f}", f"{v / total:.0%}"] for k, v in costs.phase_seconds.items()]
        if costs.generation:
            fields = list(next(iter(costs.generation.values())).model_dump())
            generation = {"headers": ["phase"] + [f.replace("_", " ") for f in fields],
                          "rows": [[k] + list(v.model_dump().values()) for k, v in costs.generation.items()]}
        if costs.fast_path:
            used = ", ".join(k for k, v in costs.fast_path.used.items() if v) or "none"
            off = "; ".join(f"{k}: {v}" for k, v in costs.fast_path.switched_off.items())
    stages = []
    for seed in results.seeds:
        for k in finished_stages(results.path, seed)[1:]:
            stage = results.stage(seed, k)
            t = stage.training
            stages.append([seed, k, stage.task or stage.checkpoint, t.optimizer_steps if t else "—",
                           f"{t.seconds:.1f}" if t else "—", _number(stage.eval_seconds, 1),
                           f"{_number(t.first_loss)} → {_number(t.last_loss)}" if t else "—"])
    return _RUN.costs(costs, phases, generation, used, off, stages)


def _config(results: RunResults) -> Markup:
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
            shown.append((name, text))
    return _RUN.config(shown)


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
             ("signals", "Drift signals", "Drift signals: each checkpoint against the base model",
              _drift_signals(results)),
             ("deployed", "Deployed form", "Deployed form: each checkpoint through llama.cpp against PyTorch",
              _deployed(results)),
             ("monitor", "Live drift", "Live drift monitoring", monitor),
             ("examples", "Examples", None, browser_section(results, prefix, heading)),
             ("costs", "Costs", "Costs of the run", _costs(results)),
             ("config", "Config", "Config and environment", _config(results))]
    parts = [p for p in parts if p[3] is not None]  # no live drift without a monitor, no deployed forms unmeasured
    body = Markup("").join(Markup(content) if title is None else _section(prefix + ident, title, content, heading)
                           for ident, _, title, content in parts)
    return body, [(prefix + ident, label) for ident, label, _, _ in parts]


def _run_line(results: RunResults) -> str:
    config = results.config
    return (f"{config.model.spec} · {' → '.join(results.tasks)} · seed{'s' if len(results.seeds) > 1 else ''} "
            f"{', '.join(map(str, results.seeds))} · {results.path}")


# --- pages ------------------------------------------------------------------------------------------------------------


def _page(title: str, subtitle: str, nav: list[tuple[str, str]], body: str) -> str:
    return _TEMPLATES.get_template("page.html.j2").render(
        csp=Markup(CSP), css=_css(), title=title, subtitle=subtitle, nav=nav, body=Markup(body),
        script=Markup(_static("browser.js"))) + "\n"


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


def _correlation(corr: dict) -> Markup:
    def line(entries: dict, label: str) -> str:
        parts = [f"{name.title()} not computed ({entries[name]['reason']})" if entries[name]["r"] is None else
                 f"{name.title()} r = {entries[name]['r']:.3f}, p = {entries[name]['p']:.3g}"
                 for name in ("pearson", "spearman")]
        return f"{label} ({entries['n']} points): {'; '.join(parts)}"

    zone = corr.get("failure_zone") or {}
    zone_text = (f"Failure zone: KL to base > {zone['threshold']:.4g} (balanced accuracy "
                 f"{zone['balanced_accuracy']:.3f})." if zone.get("threshold") is not None else
                 f"Failure zone: no threshold ({zone.get('reason', 'not fitted')}).")
    lines = [line(corr, "All models pooled")] + [line(e, m) for m, e in (corr.get("per_model") or {}).items()]
    return _STUDY.correlation(lines, zone_text, corr.get("independence", ""))


def _signal_study(out: Path) -> Markup | None:
    """The report's signal study (report/signal_study_view.py wrote its CSVs and figures): the AUROCs where enough
    checkpoints forgot, and the rank correlations with the size of the forgetting."""
    import pandas as pd

    from lorawatch.analysis.signal_study import MIN_PER_CLASS
    from lorawatch.report.signal_study_view import CORRELATION_CSV, SIGNAL_CHECKPOINTS_CSV, SIGNAL_STUDY_CSV

    if not (out / SIGNAL_CHECKPOINTS_CSV).is_file():
        return None
    checkpoints = pd.read_csv(out / SIGNAL_CHECKPOINTS_CSV)
    forgot = int(checkpoints["forgot"].sum()) if len(checkpoints) else 0
    parts = [_PARTS.note(f"{len(checkpoints)} checkpoints from the second stage on; {forgot} regressed on an earlier "
                         "task by the paired verdict against the previous checkpoint.")]
    ranked = pd.read_csv(out / SIGNAL_STUDY_CSV).dropna(subset=["auroc"])
    if len(ranked):
        parts.append(_file_svg(out / "signals.svg", "AUROC of telling the checkpoints that forgot from the others "
                                                    "(stratified bootstrap interval; 0.5 is chance)."))
        parts.append(_table(["signal", "checkpoints", "forgot", "AUROC", "interval", "cut"],
                            [[r.signal, r.checkpoints, r.forgot, f"{r.auroc:.3f}", _bracket(r.ci_low, r.ci_high, 3),
                              f"{r.cut:.4g}"] for r in ranked.itertuples()]))
    else:
        parts.append(_PARTS.note(f"Not ranked by AUROC: at least {MIN_PER_CLASS} checkpoints of each kind are "
                                 "needed."))
    correlation = pd.read_csv(out / CORRELATION_CSV).dropna(subset=["rho"])
    if len(correlation):
        parts.append(_file_svg(out / "signals-correlation.svg", "Spearman's ρ with the checkpoint's largest accuracy "
                                                                "drop on an earlier task (bootstrap interval)."))
        parts.append(_table(["signal", "checkpoints", "ρ", "interval", "p (Holm)"],
                            [[r.signal, r.checkpoints, f"{r.rho:+.3f}", _bracket(r.ci_low, r.ci_high, 3, sign=True),
                              f"{r.p_adjusted:.3g}"] for r in correlation.itertuples()]))
    return Markup("").join(parts)


def write_report_html(report, out_file: Path) -> Path:
    """The study of `lorawatch.report.study_report.write_report(...)`'s result as one page: its tables and figures (read from
    the report folder), then every run folder's own sections, collapsed."""
    study, out = report.study, Path(report.out)
    runs = [(g, Path(d)) for g in study.groups for d in g.run_dirs]
    overview = _table(["Model", "Spec", "Order", "Tasks (training order)", "Seeds", "Run folders"],
                      [[g.model, g.spec, g.order, " → ".join(g.tasks), ", ".join(map(str, g.seeds)),
                        ", ".join(map(str, g.run_dirs))] for g in study.groups], numeric_from=99)
    sections = [("study", "Runs in this study", overview),
                ("tables", "The paper's tables", Markup("").join(_STUDY.report_table(t) for t in report.tables)),
                ("figure1", "Figure 1: KL to base against average accuracy",
                 _file_svg(out / "figure1.svg", "Every checkpoint after a training step (seed means).") +
                 _correlation(report.correlation)),
                ("figure2", "Figure 2: KL to base per step",
                 _file_svg(out / "figure2.svg", "Original order solid, reversed dashed.")),
                ("figure3", "Figure 3: final accuracy against final drift",
                 _file_svg(out / "figure3.svg", "One point per run and seed."))]
    per_model = [p for p in report.files if p.suffix == ".svg" and p.name.startswith("model-")]
    sections.append(("models", "Per model: accuracy matrix and accuracy/KL per step",
                     Markup('<div class="figs">{}</div>').format(
                         Markup("").join(_file_svg(p, p.stem, wide=False) for p in per_model))))
    if (out / "monitor.svg") in report.files:
        taken = [dict(e, run=d.name) for _, d in runs for e in interventions(d)]
        sections.append(("live", "Live drift monitoring", _file_svg(out / "monitor.svg", "KL to base during training.")
                         + (_table(["run", "seed", "stage", "task", "action", "step", "KL", "threshold", "kept step"],
                                   [[e["run"], e["seed"], e["stage"], e["task"], e["action"], e["step"],
                                     f"{e['kl']:.4f}", f"{e['threshold']:.4f}", e["kept_step"]] for e in taken],
                                   numeric_from=5) if taken else Markup("<p>No interventions.</p>"))))
    signals = _signal_study(out)
    if signals is not None:
        sections.append(("signals", "Which drift signal warns best", signals))
    body = Markup("").join(_section(i, t, c, "h2") for i, t, c in sections)
    nav = [(i, t.split(":")[0]) for i, t, _ in sections]
    for n, (group, run_dir) in enumerate(runs, start=1):
        results = load_run(run_dir)
        content, _ = run_sections(results, prefix=f"run{n}-", heading="h3")
        body += _STUDY.run(n, run_dir.name, group.label, _run_line(results), content)
        nav.append((f"run{n}", f"Run {n}: {run_dir.name}"))
    subtitle = f"{len(study.groups)} model × order group(s) from {len(runs)} run folder(s) · report folder {out}"
    return _write(out_file, _page("lorawatch report", subtitle, nav, body))
