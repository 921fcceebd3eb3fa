"""The HTML page of a run and of a study (report/html.py): written with nothing to fetch, its example browser's
flips computed right, and the pages checked in a real browser (headless Chromium through Selenium) at a desktop
and a phone width: no console error, no request leaving the file, key elements visible, filters working.

The browser tests skip (saying why) without Debian's chromium and chromium-driver or without selenium; the rest
runs everywhere. LORAWATCH_SCREENSHOTS=1 also saves docs/images/report-{desktop,narrow}.png, of the run folder
in LORAWATCH_SCREENSHOT_RUN when set (e.g. runs/demo), else of the tiny run made here.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from tiny import tiny_config, write_task_files

from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir import layout
from lorawatch.rundir import store
from lorawatch.report import verdict_view
from lorawatch.analysis import verdicts
from lorawatch.config import build_config
from lorawatch.report.study_report import write_report
from lorawatch.report.html import write_report_html, write_run_html
from lorawatch.report.html_examples import browser_link, flipped_examples, load_prompts, word_diff
from lorawatch.report.tables import load_run, load_run_config

ROOT = Path(__file__).resolve().parents[1]
RUN_V0 = Path(__file__).resolve().parent / "data" / "run-v0"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
NEEDS_BROWSER = "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"

# Which test rows are answered right, per stage (rows of a pattern) and row index (columns): planted into the
# predictions of finished runs, so the flips are known. stance flips 0→1: row 0 lost, row 3 gained.
PATTERNS = {"stance": [[1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 1]],
            "sum": [[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]}
PAIRS = [(0, 1), (1, 2), (0, 2)]
HOSTILE = "<script>window.__pwned = 1</script>"  # a model's output is text, never markup


def plant_flips(run_dir: Path, seeds) -> None:
    for seed in seeds:
        for k in range(3):
            for task, pattern in PATTERNS.items():
                path = RunFolder(run_dir).stage(seed, k).path / "predictions" / f"{task}.jsonl"
                rows = store.read_jsonl(path)
                for row in rows:
                    i = int(row["id"].rsplit("/", 1)[1])
                    row["correct"] = bool(pattern[k][i])
                    row["raw_output"] = (f"The answer is ({row['gold']})." if row["correct"] else
                                         f"Maybe the answer is (Z), {HOSTILE if i == 2 else 'not sure'}\x1a")
                store.write_jsonl(path, rows)
        restate(run_dir, seed)


def restate(run_dir: Path, seed: int) -> None:
    """The seed's statistics.json again, from the predictions as they are now (a folder from before it has none:
    its statistics are computed when read)."""
    if (RunFolder(run_dir).seed(seed).path / layout.STATISTICS).is_file():
        verdicts.write_seed_statistics(run_dir, seed, load_run_config(run_dir).statistics)


def expected_flips(seeds) -> set[tuple]:
    return {(seed, a, b, task, f"{task}/test/{i}", "gained" if p[b][i] else "lost")
            for seed in seeds for a, b in PAIRS for task, p in PATTERNS.items() for i in range(4) if p[a][i] != p[b][i]}


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A fresh monitored run of the tiny model (its data files still there: prompts shown), flips planted."""
    from lorawatch.recipe.run import run_experiment

    root = tmp_path_factory.mktemp("html-tiny")
    write_task_files(root / "data")
    config = tiny_config(tiny_model_dir, root / "data", seeds=(1,)).model_dump(mode="json")
    config["monitor"] = {"every": 1, "action": "rollback", "threshold": 0.02}
    run_experiment(build_config(config), root / "run")
    plant_flips(root / "run", [1])
    return root / "run"


def v0_copy(folder: Path, rows_per_task: int | None = None) -> Path:
    """The committed old run (two seeds, a monitor) with its data paths pointing nowhere: prompts unavailable.
    With `rows_per_task`, each stage's predictions become that many rows whose correctness alternates from one
    stage to the next (every row flips at 0→1 and 1→2): thousands of flips for the browser."""
    shutil.copytree(RUN_V0, folder)
    config = store.read_json(folder / "config.json")
    for task in config["tasks"]:
        task["train"], task["test"] = f"{folder}/gone/{task['name']}-train.json", f"{folder}/gone/{task['name']}.json"
    config["reference"]["path"] = f"{folder}/gone/reference.json"
    store.write_json(folder / "config.json", config)
    if rows_per_task is None:
        plant_flips(folder, [1, 2])
        return folder
    for seed in (1, 2):
        for k in range(3):
            for task in ("stance", "sum"):
                store.write_jsonl(RunFolder(folder).stage(seed, k).path / "predictions" / f"{task}.jsonl",
                                  [{"id": f"{task}/test/{i}", "task": task, "gold": "A", "correct": (i + k) % 2 == 0,
                                    "prediction": "A" if (i + k) % 2 == 0 else "B", "output_ids": None,
                                    "raw_output": f"Row {i}: the answer is {'A' if (i + k) % 2 == 0 else 'B'}."}
                                   for i in range(rows_per_task)])
    return folder


@pytest.fixture(scope="module")
def pages(tiny_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("html-pages")
    v0 = v0_copy(root / "run-v0")
    big = v0_copy(root / "run-big", rows_per_task=300)
    report = write_report([tiny_run, v0], root / "report")
    return {"run": write_run_html(tiny_run, root / "run.html"), "v0": write_run_html(v0, root / "v0.html"),
            "big": write_run_html(big, root / "big.html"), "study": write_report_html(report, root / "study.html"),
            "v0_dir": v0}


class _Attributes(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []   # every src, href and xlink:href
        self.ids: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self.links += [v or "" for k, v in attrs.items() if k in ("src", "href", "xlink:href", "srcset", "action")]
        if "id" in attrs:
            self.ids.append(attrs["id"])


def parse(page: Path) -> tuple[str, _Attributes]:
    text = page.read_text(encoding="utf-8")
    parser = _Attributes()
    parser.feed(text)
    return text, parser


def blobs(text: str) -> dict[str, dict]:
    return {m.group(1): json.loads(m.group(2)) for m in
            re.finditer(r'<script type="application/json" id="([^"]+)">(.*?)</script>', text, re.S)}


def flips_in(blob: dict) -> set[tuple]:
    pairs = blob["pairs"]
    return {(r[0], pairs[r[1]]["a"], pairs[r[1]]["b"], blob["tasks"][r[2]], r[3], "gained" if r[4] else "lost")
            for r in blob["rows"]}


# --- without a browser -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["run", "v0", "study"])
def test_page_fetches_nothing(pages, name):
    text, parsed = parse(pages[name])
    assert parsed.links, "the page has in-page links"
    for link in parsed.links:
        assert link.startswith(("#", "data:")), f"{name}: {link[:80]} would leave the file"
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "@import" not in text and not re.search(r"url\(\s*['\"]?(?:https?:)?//", text)
    assert not [t for t, a in parsed.tags if t in ("link", "script") and (a.get("src") or a.get("rel") == "stylesheet")]
    assert "default-src 'none'" in text  # the page's own policy blocks any request the checks above could miss
    assert len(parsed.ids) == len(set(parsed.ids)), "duplicate ids (inline SVGs must not share them)"


def test_run_page_holds_every_section(pages):
    text, parsed = parse(pages["run"])
    for ident in ("overview", "matrix", "metrics", "drift", "monitor", "examples", "costs", "config"):
        assert ident in parsed.ids, ident
    assert text.count("<svg") >= 4  # KL, Δ entropy, Δ margin, live drift
    assert "Interventions" in text and "rollback" in text and "peak memory" in text
    assert "<summary>config.json</summary>" in text and "<summary>environment.json</summary>" in text


def test_blob_holds_the_planted_flips(pages, tiny_run):
    (name, blob), = blobs(pages["run"].read_text(encoding="utf-8")).items()
    assert name == "xb-data" and flips_in(blob) == expected_flips([1])
    assert blob["promptNote"] is None
    assert blob["prompts"]["stance"]["stance/test/0"] == "Text 8: stance? A. dovish, B. hawkish, C. neutral."
    row = next(r for r in blob["rows"] if r[3] == "stance/test/0" and blob["pairs"][r[1]]["b"] == 1)
    assert row[4] == 0 and row[5] == "C"  # lost; gold C
    assert row[8] == "<del>The</del> answer is (<del>C</del>)<del>.</del>"
    assert row[9] == "<ins>Maybe the</ins> answer is (<ins>Z</ins>)<ins>, not sure\u241a</ins>"
    assert len(blob["ref"]) == 4 * 3 and {r[3] for r in blob["ref"]} == {"stance", "sum"}  # 4 rows per pair
    assert "<script>window" not in pages["run"].read_text(encoding="utf-8")  # in the blob as \u003cscript


def test_flipped_examples_by_hand(tiny_run):
    flips = flipped_examples(tiny_run, 1, 0, 1, "stance")
    assert [(f["id"], f["direction"]) for f in flips] == [("stance/test/0", "lost"), ("stance/test/3", "gained")]
    assert [f["id"] for f in flipped_examples(tiny_run, 1, 1, 2, "sum")] == []
    assert [(f["id"], f["direction"]) for f in flipped_examples(tiny_run, 1, 0, 2, "sum")] == [("sum/test/0", "gained")]


def test_word_diff_escapes_and_marks_words():
    assert word_diff("The answer is (A).", "The answer is (B).") == \
        ("The answer is (<del>A</del>).", "The answer is (<ins>B</ins>).")
    before, after = word_diff("a <b>", "a <b> & c\x00")
    assert before == "a &lt;b&gt;" and after == "a &lt;b&gt;<ins> &amp; c\u2400</ins>"


def test_prompts_unavailable_show_ids(pages):
    (blob,) = blobs(pages["v0"].read_text(encoding="utf-8")).values()
    assert blob["prompts"] == {} and blob["refPrompts"] == {}
    assert "could not be read" in blob["promptNote"] and "could not be read" in pages["v0"].read_text(encoding="utf-8")
    assert flips_in(blob) == expected_flips([1, 2]) and blob["seeds"] == [1, 2]


def test_changed_data_hides_its_prompts(tiny_run, tmp_path):
    data = tmp_path / "data"
    write_task_files(data)
    rows = json.loads((data / "mc_test.json").read_text())
    rows[0]["prompt"] = "edited after the run"
    (data / "mc_test.json").write_text(json.dumps(rows))
    config = store.read_json(tiny_run / "config.json")
    for task in config["tasks"]:
        task["test"] = str(data / Path(task["test"]).name)
    results = load_run(tiny_run)
    results.config = build_config(config)
    prompts, reference, note = load_prompts(results)
    assert "stance" not in prompts and prompts["sum"]["sum/test/0"] == "Question: 8 plus 8?"
    assert reference and "stance changed since the run" in note


def test_study_page_holds_the_report_and_every_run(pages):
    text, parsed = parse(pages["study"])
    for title in ("Table 3", "Table 4", "Table 5", "Table 6", "Figure 1", "Figure 2", "Live drift monitoring"):
        assert title in text, title
    for ident in ("tables", "figure1", "figure2", "models", "live", "run1", "run2", "run1-examples", "run2-matrix"):
        assert ident in parsed.ids, ident
    found = blobs(text)
    assert set(found) == {"run1-xb-data", "run2-xb-data"}
    assert flips_in(found["run1-xb-data"]) == expected_flips([1])
    assert flips_in(found["run2-xb-data"]) == expected_flips([1, 2])


def test_page_weight(pages):
    sizes = {name: pages[name].stat().st_size for name in ("run", "v0", "big", "study")}
    print("page weight (bytes):", sizes)
    assert sizes["run"] < 200_000 and sizes["v0"] < 200_000 and sizes["big"] < 1_500_000


# --- "Is it real?": the verdicts, their intervals, and flip counts that open the browser ---------------------------


def regressing_copy(folder: Path, rows: int = 40) -> Path:
    """The old run (seeds 1 and 2) with `rows` planted test rows per task: at stage 1 seed 1 loses 20 stance rows
    (regressed against the previous checkpoint and the base, and still against the base at stage 2), seed 2 only 3
    (no detectable change); at stage 2 both gain 30 sum rows (improved)."""
    v0_copy(folder)
    for seed, lost in ((1, 20), (2, 3)):
        for k in range(3):
            right = {"stance": [k == 0 or i >= lost for i in range(rows)],
                     "sum": [k == 2 and i < 30 for i in range(rows)]}
            for task, outcomes in right.items():
                store.write_jsonl(RunFolder(folder).stage(seed, k).path / "predictions" / f"{task}.jsonl",
                                  [{"id": f"{task}/test/{i}", "task": task, "gold": "A", "correct": r,
                                    "prediction": "A" if r else "B", "output_ids": None,
                                    "raw_output": f"Row {i}: {'A' if r else 'B'}."} for i, r in enumerate(outcomes)])
    return folder


@pytest.fixture(scope="module")
def regressing(tmp_path_factory) -> tuple[Path, Path]:
    folder = regressing_copy(tmp_path_factory.mktemp("html-regress") / "run")
    return folder, write_run_html(folder, folder.parent / "run.html")


def verdict_table(text: str, prefix: str = "", seed: int = 1) -> list[dict]:
    """A seed's rows in the page's "Is it real?" table: each cell's text, the row's classes, the flip links."""
    section = text[text.index(f'<section id="{prefix}verdicts">'):]
    section = section[:section.index("</section>")]
    table = re.search(rf'<table class="verdicts" data-seed="{seed}">(.*?)</table>', section, re.S).group(1)
    rows = []
    for attributes, row in re.findall(r"<tr([^>]*)>(.*?)</tr>", table.split("<tbody>")[1], re.S):
        cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
        rows.append({"classes": re.findall(r'class="([^"]*)"', attributes)[0].split() if attributes else [],
                     "cells": [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in cells], "html": row,
                     "links": [html.unescape(h) for h in re.findall(r'href="([^"]*)"', row)]})
    return rows


def selection(link: str) -> tuple[str, dict]:
    """A flip link's target: the browser's section and what it selects."""
    section, query = link[1:].split("?")
    return section, {k: v[0] for k, v in parse_qs(query).items()}


def test_is_it_real_section_shows_every_comparison(pages, tiny_run):
    text, parsed = parse(pages["run"])
    assert "verdicts" in parsed.ids and '<a href="#verdicts">Is it real?</a>' in text
    record = load_run(tiny_run).statistics(1)
    expected = verdict_view.verdict_rows({1: record})
    rows = verdict_table(text)
    assert [(r["cells"][0], r["cells"][1]) for r in rows] == \
        [("after stance", "stance"), ("after stance", "sum"), ("after sum", "stance"), ("after sum", "sum")]
    for row, want in zip(rows, expected):
        assert row["cells"][2:6] == verdict_view.comparison_cells(want["previous"])
        assert row["cells"][6:] == verdict_view.comparison_cells(want["base"])
        # and by hand from the planted patterns: 4 rows, never more than 2 discordant ones, so p = 1 and no verdict
        pattern = PATTERNS[want["task"]]
        for before, cells in ((want["stage"] - 1, row["cells"][2:6]), (0, row["cells"][6:])):
            after = want["stage"]
            lost = sum(pattern[before][i] > pattern[after][i] for i in range(4))
            gained = sum(pattern[before][i] < pattern[after][i] for i in range(4))
            assert cells[0].startswith(verdict_view.signed((gained - lost) / 4) + " [")
            assert cells[1:] == [f"↓{lost} ↑{gained}", "1", "–"]
    assert "No regression detected" in text and 'class="alert"' not in text
    for line in verdict_view.detectable_lines(record):  # 4 rows can show nothing at all
        assert html.escape(line) in text and "cannot show any drop" in line


def test_intervals_of_one_seed_are_shown(pages, tiny_run):
    text = pages["run"].read_text(encoding="utf-8")
    record = load_run(tiny_run).statistics(1)
    heatmap = text[text.index('<table class="heatmap">'):text.index('id="metrics"')]
    assert "[0.15, 0.85]" in heatmap  # Wilson, 2 right of 4 (stance at the base), by hand
    cells = re.findall(r'<td class="heat"[^>]*>(.*?)</td>', heatmap)
    assert len(cells) == 6 and all('<span class="ci">[' in c for c in cells)
    assert "Wilson interval" in heatmap
    metrics = text[text.index('id="metrics"'):text.index('id="verdicts"')]
    found = verdict_view.interval_of(record, "base", "avg_all")
    assert f"[{verdict_view.number(found.low, 2)}, {verdict_view.number(found.high, 2)}]" in metrics
    overview = text[text.index('id="overview"'):text.index('id="matrix"')]
    bwt = verdict_view.interval_of(record, None, "bwt")
    assert f'<small class="ci">[{verdict_view.number(bwt.low, 2)}, {verdict_view.number(bwt.high, 2)}]</small>' \
        in overview and "bootstrap interval over test rows" in overview
    vs_base = verdict_view.interval_of(record, None, "final_avg_vs_base")
    assert (f'Final avg vs base</span><div class="v">{verdict_view.signed(vs_base.value)}</div><small class="ci">'
            f'[{verdict_view.signed(vs_base.low, 2)}, {verdict_view.signed(vs_base.high, 2)}]</small>') in overview
    drift = text[text.index('id="drift"'):text.index('id="monitor"')]
    kl = {row.checkpoint: row for row in record.drift}["sum"]
    assert f"[{verdict_view.number(kl.low, 4)}, {verdict_view.number(kl.high, 4)}]" in drift
    lines = verdict_view.drift_change_lines({1: record})
    assert lines and all(f"<li>{html.escape(line)}</li>" in drift for line in lines)


def test_several_seeds_show_the_interval_over_seeds(pages):
    text = pages["v0"].read_text(encoding="utf-8")
    overview = text[text.index('id="overview"'):text.index('id="matrix"')]
    assert "± " in overview and "t interval of the mean over the 2 seeds" in overview
    summary = load_run(pages["v0_dir"]).summary()["per_seed"]
    values = [summary[s]["final_avg_accuracy"] for s in ("1", "2")]
    mean, half = sum(values) / 2, 12.706 * abs(values[0] - values[1]) / 2  # t(0.975, 1 df) · sd / √2
    assert f"[{verdict_view.number(mean - half, 2)}, {verdict_view.number(mean + half, 2)}]" in overview
    assert "<h3>Seed 1</h3>" in text and "<h3>Seed 2</h3>" in text  # a verdict table per seed


def test_a_regression_is_marked(regressing):
    folder, page = regressing
    text = page.read_text(encoding="utf-8")
    seed1, seed2 = verdict_table(text, seed=1), verdict_table(text, seed=2)
    stance1, sum1, stance2, sum2 = seed1
    # seed 1, stage 1, stance: 20 of 40 rows lost, none gained: exact p = 2 · 0.5^20, Holm over 2 tasks doubles it
    assert "regressed" in stance1["classes"] and stance1["cells"][1] == "stance"
    for cells in (stance1["cells"][2:6], stance1["cells"][6:]):
        assert cells[0].startswith("−0.500 [") and cells[1:] == ["↓20 ↑0", "3.8e-06", "REGRESSED"]
    assert stance1["html"].count('class="verdict v-regressed"') == 2
    # stage 2 changes nothing on stance (against the previous checkpoint) but is still worse than the base
    assert stance2["cells"][5] == "–" and stance2["cells"][9] == "REGRESSED" and "regressed" in stance2["classes"]
    # 30 gained: p = 2 · 0.5^30, the smaller of the family's two, so Holm doubles it
    assert sum2["cells"][2:6][1:] == ["↓0 ↑30", verdict_view.p_text(4 * 0.5 ** 30), "improved"]
    assert 'class="verdict v-improved"' in sum2["html"] and "regressed" not in sum1["classes"]
    # seed 2 lost 3 rows: p = 2 · 0.5^3 = 0.25, Holm 0.5: no detectable change, nothing marked
    assert seed2[0]["cells"][2:6][1:] == ["↓3 ↑0", "0.500", "–"] and "regressed" not in seed2[0]["classes"]
    records = {seed: load_run(folder).statistics(seed) for seed in (1, 2)}
    lines = verdict_view.regression_lines(records)
    alert = re.search(r'<div class="alert">(.*?)</div>', text, re.S).group(1)
    assert len(lines) == 3 and "Regressions (3)" in alert
    assert [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", alert)] == lines
    assert "No regression detected" not in text
    # 40 rows, α 0.05 over 2 tasks: 7 negative flips (2 · 0.5^7 < 0.025 < 2 · 0.5^6) are the fewest that count
    detectable = verdict_view.detectable_lines(records[1])
    assert all(html.escape(line) in text for line in detectable) and "0.175 (7 right→wrong" in " ".join(detectable)


def test_flip_counts_link_to_those_examples(pages):
    text = pages["run"].read_text(encoding="utf-8")
    (blob,) = blobs(text).values()
    rows = verdict_table(text)
    # stance after stage 2: 1 → 2 lost row 2 and gained row 1; 0 → 2 lost rows 0 and 2 and gained 1 and 3
    assert rows[2]["links"] == [f"#examples?seed=1&a={a}&b=2&task=stance&dir={d}" for a in (1, 0) for d in (0, 1)]
    assert rows[1]["links"] == ["#examples?seed=1&a=0&b=1&task=sum&dir=1"] * 2  # a count of 0 has no link
    assert browser_link("", 1, 0, 2, "stance", "lost") == rows[2]["links"][2]
    for row in rows:
        counts = re.findall(r'<a class="xb-link[^"]*"[^>]*>[↓↑](\d+)</a>', row["html"])
        for link, count in zip(row["links"], counts, strict=True):
            section, want = selection(link)
            assert section == "examples" and want["seed"] == "1"
            flips = [f for f in flips_in(blob) if (f[1], f[2], f[3]) == (int(want["a"]), int(want["b"]), want["task"])
                     and f[5] == ("gained" if want["dir"] == "1" else "lost")]
            assert len(flips) == int(count), link  # the browser holds exactly the rows the count says
    study = pages["study"].read_text(encoding="utf-8")
    run2 = [link for row in verdict_table(study, "run2-", seed=2) for link in row["links"]]
    assert run2 and all(link.startswith("#run2-examples?seed=2&") for link in run2)


# --- in a real browser -------------------------------------------------------------------------------------------

WIDTHS = {"desktop": (1280, 900), "narrow": (390, 844)}
# Installed before any script of every page: records what goes wrong as it happens. The driver's logs say it
# too, but chromedriver receives them asynchronously; a loaded machine could read them too early.
PROBE = """
window.__problems = [];
const note = (what) => window.__problems.push(String(what));
const error = console.error;
console.error = function (...args) { note("console.error: " + args.join(" ")); return error.apply(this, args); };
window.addEventListener("error", (e) => note("error: " + (e.message || (e.target && (e.target.src || e.target.href))
                                                             || e.type)), true);  // capture: failed resources too
window.addEventListener("unhandledrejection", (e) => note("unhandled rejection: " + e.reason));
document.addEventListener("securitypolicyviolation", (e) => note("blocked by the page's policy: " + e.blockedURI));
"""


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(NEEDS_BROWSER)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium to drive the browser: .venv/bin/pip install selenium")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--host-resolver-rules=MAP * ~NOTFOUND"):  # no name resolves: nothing could leave anyway
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PROBE})
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, page: Path, width: str):
    w, h = WIDTHS[width]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": width == "narrow"})
    driver.get_log("browser"), driver.get_log("performance")  # drop what earlier pages logged
    driver.get(page.resolve().as_uri())
    return driver


def assert_clean(driver) -> None:
    """No error of any kind and no request but the file itself (and data: URLs)."""
    problems = driver.execute_script("return window.__problems || ['the probe did not run']")
    assert not problems, problems
    logs = {kind: driver.get_log(kind) for kind in ("browser", "performance")}
    time.sleep(0.3)  # whatever chromedriver has not received yet
    logs = {kind: entries + driver.get_log(kind) for kind, entries in logs.items()}
    errors = [e for e in logs["browser"] if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    urls = []
    for entry in logs["performance"]:
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    urls += driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(("file:", "data:", "about:")) for u in urls), urls
    assert driver.execute_script("return window.__pwned === undefined")
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"the page is {overflow}px wider than the window"


def choose(driver, root, name: str, label: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(root.find_element(By.CSS_SELECTOR, f"select[name={name}]")).select_by_visible_text(label)


def shown(root) -> list[dict]:
    """The cards rendered, as their data attributes (one script call: hundreds of round trips would be slow)."""
    return root.parent.execute_script(
        "return Array.from(arguments[0].querySelectorAll('.xb-card'), c => Object.assign({}, c.dataset))", root)


def count_line(root) -> int:
    from selenium.webdriver.common.by import By

    return int(root.find_element(By.CSS_SELECTOR, ".xb-count").text.split()[0])


@pytest.mark.parametrize("width", list(WIDTHS))
def test_run_page_in_browser(browser, pages, width):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, pages["run"], width)
    for selector in ("h1", "#overview .card", "table.heatmap", "#drift svg", "#monitor svg", "#costs table",
                     ".xb-filters select[name=task]", ".xb-card", ".xb-ref tbody tr"):
        assert driver.find_element(By.CSS_SELECTOR, selector).is_displayed(), selector
    root = driver.find_element(By.CSS_SELECTOR, ".xb")
    expected = expected_flips([1])
    assert count_line(root) == len(shown(root)) == len(expected)
    card = root.find_element(By.CSS_SELECTOR, ".xb-card")
    assert "Text 8: stance?" in card.text or "Question:" in card.text  # the prompt, read back from the data
    assert card.find_elements(By.CSS_SELECTOR, "del") or card.find_elements(By.CSS_SELECTOR, "ins")
    choose(driver, root, "task", "stance")
    assert {c["task"] for c in shown(root)} == {"stance"}
    assert len(shown(root)) == count_line(root) == sum(1 for e in expected if e[3] == "stance")
    choose(driver, root, "dir", "right → wrong (lost)")
    assert {(c["task"], c["dir"]) for c in shown(root)} == {("stance", "lost")}
    assert len(shown(root)) == sum(1 for e in expected if e[3] == "stance" and e[5] == "lost")
    choose(driver, root, "pair", "1 stance → 2 sum")
    assert len(shown(root)) == 1 and HOSTILE.split(">")[0] in root.text  # the hostile output, shown as text
    assert_clean(driver)


def test_old_run_without_data_in_browser(browser, pages):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, pages["v0"], "desktop")
    root = driver.find_element(By.CSS_SELECTOR, ".xb")
    assert count_line(root) == len(expected_flips([1, 2]))
    assert "prompt not available" in root.find_element(By.CSS_SELECTOR, ".xb-card").text
    choose(driver, root, "seed", "2")
    choose(driver, root, "task", "sum")
    assert {(c["seed"], c["task"]) for c in shown(root)} == {("2", "sum")}
    assert len(shown(root)) == sum(1 for e in expected_flips([2]) if e[3] == "sum")
    assert_clean(driver)


def test_thousands_of_flips_render_a_page_at_a_time(browser, pages):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, pages["big"], "desktop")
    root = driver.find_element(By.CSS_SELECTOR, ".xb")
    assert count_line(root) == 2400 and len(shown(root)) == 200  # 300 rows x 2 tasks x 2 pairs x 2 seeds
    more = root.find_element(By.CSS_SELECTOR, ".xb-more")
    more.click()
    assert len(shown(root)) == 400
    start = time.perf_counter()
    choose(driver, root, "dir", "wrong → right (gained)")
    assert time.perf_counter() - start < 2.0
    assert count_line(root) == 1200 and {c["dir"] for c in shown(root)} == {"gained"} and len(shown(root)) == 200
    assert_clean(driver)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_study_page_in_browser(browser, pages, width):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, pages["study"], width)
    for selector in ("#tables table", "#figure1 svg", "#figure2 svg", "#models svg", "#live svg", "#run2 > summary"):
        assert driver.find_element(By.CSS_SELECTOR, selector).is_displayed(), selector
    run = driver.find_element(By.ID, "run2")
    assert not run.find_element(By.CSS_SELECTOR, ".xb").is_displayed()  # collapsed until opened
    run.find_element(By.CSS_SELECTOR, "summary").click()
    root = run.find_element(By.CSS_SELECTOR, ".xb")
    assert root.is_displayed() and count_line(root) == len(expected_flips([1, 2]))
    choose(driver, root, "dir", "wrong → right (gained)")
    assert {c["dir"] for c in shown(root)} == {"gained"}
    assert_clean(driver)


def card_ids(root) -> set[str]:
    return set(root.parent.execute_script(
        "return Array.from(arguments[0].querySelectorAll('.xb-card .xb-meta'), m => m.textContent.split(' · ')[0])",
        root))


def test_a_flip_link_opens_the_browser_on_those_examples(browser, pages):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, pages["run"], "desktop")
    root = driver.find_element(By.CSS_SELECTOR, ".xb")
    choose(driver, root, "task", "sum")  # whatever the browser showed, the link sets every filter
    choose(driver, root, "dir", "wrong → right (gained)")
    link = driver.find_element(By.CSS_SELECTOR, '#verdicts a[href="#examples?seed=1&a=0&b=2&task=stance&dir=0"]')
    assert link.text == "↓2"
    link.click()
    pair = next(i for i, p in enumerate(blobs(pages["run"].read_text(encoding="utf-8"))["xb-data"]["pairs"])
                if (p["a"], p["b"]) == (0, 2))
    assert {(c["task"], c["dir"], c["pair"], c["seed"]) for c in shown(root)} == {("stance", "lost", str(pair), "1")}
    assert card_ids(root) == {"stance/test/0", "stance/test/2"} and count_line(root) == 2
    values = driver.execute_script("return Array.from(arguments[0].querySelectorAll('select'), s => s.value)", root)
    assert values == ["0", str(pair), "0"]  # task, pair, direction: the filters say what is shown
    top = driver.execute_script("return arguments[0].getBoundingClientRect().top", root)
    assert -2 < top < 60, top  # scrolled to the browser
    # the other direction, then the first link again although the page's address already names it
    driver.find_element(By.CSS_SELECTOR, '#verdicts a[href="#examples?seed=1&a=0&b=2&task=stance&dir=1"]').click()
    assert card_ids(root) == {"stance/test/1", "stance/test/3"}
    choose(driver, root, "task", "all tasks")
    driver.execute_script("window.scrollTo(0, 0)")
    driver.find_element(By.CSS_SELECTOR, '#verdicts a[href="#examples?seed=1&a=0&b=2&task=stance&dir=1"]').click()
    assert card_ids(root) == {"stance/test/1", "stance/test/3"}
    assert_clean(driver)


def test_a_flip_link_as_an_address_and_in_a_study(browser, pages):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, pages["run"], "desktop")
    driver.get("about:blank")
    driver.get(pages["run"].resolve().as_uri() + "#examples?seed=1&a=1&b=2&task=stance&dir=1")  # pasted, opened
    root = driver.find_element(By.CSS_SELECTOR, ".xb")
    assert card_ids(root) == {"stance/test/1"} and shown(root)[0]["dir"] == "gained"
    assert_clean(driver)

    driver = open_page(browser, pages["study"], "desktop")
    run = driver.find_element(By.ID, "run2")
    run.find_element(By.CSS_SELECTOR, "summary").click()
    links = run.find_elements(By.CSS_SELECTOR, '#run2-verdicts table[data-seed="2"] a.xb-link')
    assert links
    for link in (links[0], links[-1]):
        section, want = selection(link.get_dom_attribute("href"))
        assert section == "run2-examples"
        count = int(link.text[1:])
        link.click()
        root = run.find_element(By.CSS_SELECTOR, ".xb")
        cards = shown(root)
        assert len(cards) == count_line(root) == count and {c["seed"] for c in cards} == {"2"}
        assert {c["task"] for c in cards} == {want["task"]}
        assert {c["dir"] for c in cards} == {"gained" if want["dir"] == "1" else "lost"}
    # the other run's browser is left as it was
    other = driver.find_element(By.CSS_SELECTOR, "#run1 .xb")
    assert driver.execute_script("return arguments[0].querySelector('select[name=task]').value", other) == ""
    assert_clean(driver)


def test_browser_checks_catch_a_request_and_an_error(browser, pages, tmp_path):
    """The checks above are not vacuous: a remote image and a console error are both seen."""
    page = tmp_path / "leaky.html"
    page.write_text('<!doctype html><img src="http://example.invalid/x.png"><script>console.error("boom")</script>')
    driver = open_page(browser, page, "desktop")
    problems = driver.execute_script("return window.__problems")
    assert any("boom" in p for p in problems) and any("example.invalid" in p for p in problems), problems
    with pytest.raises(AssertionError, match="boom|example.invalid"):
        assert_clean(driver)
    # and in a page with lorawatch's policy, the browser itself refuses the request
    text = pages["run"].read_text(encoding="utf-8").replace("<main>", '<main><img src="https://example.invalid/y.png">')
    (tmp_path / "policed.html").write_text(text, encoding="utf-8")
    driver = open_page(browser, tmp_path / "policed.html", "desktop")
    problems = driver.execute_script("return window.__problems")
    assert any("policy: https://example.invalid/y.png" in p for p in problems), problems


@pytest.mark.skipif(os.environ.get("LORAWATCH_SCREENSHOTS") != "1", reason="set LORAWATCH_SCREENSHOTS=1")
def test_screenshots(browser, pages, tmp_path):
    run = os.environ.get("LORAWATCH_SCREENSHOT_RUN")
    page = write_run_html(Path(run), tmp_path / "shot.html") if run else pages["run"]
    (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        driver = open_page(browser, page, width)
        driver.save_screenshot(str(ROOT / "docs" / "images" / f"report-{width}.png"))
        assert_clean(driver)
