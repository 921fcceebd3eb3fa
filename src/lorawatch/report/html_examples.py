"""The example browser's data: which test examples flipped between two checkpoints, and which reference rows
moved most in KL to base, as one compact JSON blob that report/html.py embeds and renders with JS.

A flip is an example whose correctness differs between checkpoints `a` and `b` of the same seed: "lost"
(right at `a`, wrong at `b`) or "gained" (wrong, then right). The pairs compared are every consecutive
pair (k-1 → k) and the base against every later checkpoint (0 → k, k ≥ 2; 0 → 1 is already consecutive).

Prediction rows hold no prompt: it is read back from the run's data files when they are still there and hold
the same rows as when the run was made (inputs.json's digests); otherwise the page shows ids only and says why.
"""

from __future__ import annotations

import difflib
import html
import json
import math
import re
import warnings
from pathlib import Path
from urllib.parse import quote

from lorawatch.rundir.files import RowsFile
from lorawatch.rundir.layout import INPUTS, RunFolder
from lorawatch.errors import UserError
from lorawatch.report.tables import RunResults

REFERENCE_MOVERS = 10  # reference rows kept per (seed, pair): those whose KL to base moved most
# Words, single punctuation marks and runs of whitespace: "(A)." against "(B)." highlights the letter alone.
_TOKENS = re.compile(r"\s+|\w+|[^\w\s]")
# C0 controls (but tab and newline) and DEL are invisible or break the layout: show their Unicode pictures.
_CONTROLS = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {127: 0x2421}


def visible(text: str) -> str:
    return text.translate(_CONTROLS)


def word_diff(before: str, after: str) -> tuple[str, str]:
    """HTML of both texts, escaped, with the words only `before` has in <del> and those only `after` has in <ins>."""
    a, b = _TOKENS.findall(visible(before)), _TOKENS.findall(visible(after))
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old, new = html.escape("".join(a[i1:i2])), html.escape("".join(b[j1:j2]))
        if op == "equal":
            left.append(old)
            right.append(new)
            continue
        if old:
            left.append(f"<del>{old}</del>")
        if new:
            right.append(f"<ins>{new}</ins>")
    return "".join(left), "".join(right)


def checkpoint_pairs(stages: list[int]) -> list[tuple[int, int]]:
    pairs = [(a, b) for a, b in zip(stages, stages[1:])]
    return pairs + [(stages[0], b) for b in stages[2:]]


def finished_stages(run_dir: Path, seed: int) -> list[int]:
    seed_folder = RunFolder(run_dir).seed(seed)
    return [k for k in seed_folder.stages_on_disk() if seed_folder.stage(k).finished()]


def _rows(rows: RowsFile) -> dict[str, object]:
    """A stage's rows by id; {} when the file is absent (a run folder from before it was written)."""
    return {r.id: r for r in rows.load()} if rows.exists() else {}


def flipped_examples(run_dir: Path, seed: int, a: int, b: int, task: str) -> list[dict]:
    """The examples of `task` whose correctness differs between stages `a` and `b`, in the order of stage b's
    file; examples present at only one of the stages are not compared."""
    run = RunFolder(run_dir)
    before = _rows(run.stage(seed, a).predictions(task))
    after = _rows(run.stage(seed, b).predictions(task))
    flips = []
    for example_id, new in after.items():
        old = before.get(example_id)
        if old is not None and old.correct != new.correct:
            flips.append({"id": example_id, "task": task, "direction": "gained" if new.correct else "lost",
                          "gold": new.gold, "before": old, "after": new})
    return flips


def reference_movers(run_dir: Path, seed: int, a: int, b: int, limit: int = REFERENCE_MOVERS) -> list[dict]:
    """The reference rows whose KL to base changed most (either way) from stage `a` to stage `b`."""
    run = RunFolder(run_dir)
    drift_a = _rows(run.stage(seed, a).drift)
    drift_b = _rows(run.stage(seed, b).drift)
    moved = [{"id": i, "task": d.task, "kl_before": drift_a[i].kl, "kl_after": d.kl}
             for i, d in drift_b.items() if i in drift_a and math.isfinite(d.kl) and math.isfinite(drift_a[i].kl)]
    moved.sort(key=lambda m: -abs(m["kl_after"] - m["kl_before"]))
    return moved[:limit]


def load_prompts(results: RunResults) -> tuple[dict[str, dict[str, str]], dict[str, str], str | None]:
    """(test prompts by task and id, reference prompts by id, why some or all are missing, or None)."""
    from lorawatch.data.inputs import data_fingerprint, load_data

    try:
        with warnings.catch_warnings():  # the run reported its data's oddities when it read them; not again here
            warnings.simplefilter("ignore")
            data = load_data(results.config)
    except (UserError, OSError, ValueError) as exc:  # moved or deleted data: the results read without it
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        return {}, {}, f"the run's data files could not be read ({reason[:200]}), so examples show their ids only"
    prompts = {t.name: {e.id: e.prompt for e in t.test} for t in data.tasks}
    reference = {e.id: e.prompt for e in data.reference}
    inputs = results.folder.inputs
    if not inputs.exists():
        return prompts, reference, None
    # The files are there, but they may hold other rows than the run read: show a prompt only if unchanged.
    recorded = inputs.load().data
    now = data_fingerprint(data)
    changed = [name for name in prompts
               if name not in recorded.tasks or recorded.tasks[name].test != now["tasks"][name]["test"]]
    for name in changed:
        prompts.pop(name)
    if recorded.reference != now["reference"]:
        changed.append("reference set")
        reference = {}
    note = (f"the data of {', '.join(changed)} changed since the run ({INPUTS}), so those examples show their "
            "ids only") if changed else None
    return prompts, reference, note


def browser_data(results: RunResults) -> dict:
    """The example browser's blob. Rows are arrays to keep thousands of them small:
    rows: [seed, pair index, task index, id, 1 gained / 0 lost, gold, prediction before, prediction after,
           output before (HTML, <del>), output after (HTML, <ins>)]
    ref:  [seed, pair index, id, task, KL before, KL after, output before (HTML), output after (HTML)]
    Prompts are kept once per id, and only for the ids shown."""
    run_dir, tasks = results.path, results.tasks
    prompts, reference_prompts, prompt_note = load_prompts(results)
    pairs: list[tuple[int, int]] = []
    names: dict[int, str] = {}
    rows, ref, used, used_ref = [], [], {}, {}
    for seed in results.seeds:
        stages = finished_stages(run_dir, seed)
        for k in stages:
            names.setdefault(k, results.stage(seed, k).checkpoint)
        for a, b in checkpoint_pairs(stages):
            if (a, b) not in pairs:
                pairs.append((a, b))
            p = pairs.index((a, b))
            for t, task in enumerate(tasks):
                for flip in flipped_examples(run_dir, seed, a, b, task):
                    old, new = flip["before"], flip["after"]
                    rows.append([seed, p, t, flip["id"], int(flip["direction"] == "gained"), visible(flip["gold"]),
                                 visible(old.prediction), visible(new.prediction),
                                 *word_diff(old.raw_output, new.raw_output)])
                    if flip["id"] in prompts.get(task, {}):
                        used.setdefault(task, {})[flip["id"]] = prompts[task][flip["id"]]
            outputs = [_rows(RunFolder(run_dir).stage(seed, k).predictions("reference")) for k in (a, b)]
            for m in reference_movers(run_dir, seed, a, b):
                old, new = (o.get(m["id"]) for o in outputs)
                diff = word_diff(old.raw_output, new.raw_output) if old and new else ("", "")
                ref.append([seed, p, m["id"], m["task"], round(m["kl_before"], 5), round(m["kl_after"], 5), *diff])
                if m["id"] in reference_prompts:
                    used_ref[m["id"]] = reference_prompts[m["id"]]
    return {"tasks": tasks, "seeds": results.seeds,
            "pairs": [{"a": a, "b": b, "before": f"stage {a} ({names[a]})", "after": f"stage {b} ({names[b]})",
                       "label": f"{a} {names[a]} → {b} {names[b]}"} for a, b in pairs],
            "rows": rows, "ref": ref, "prompts": used, "refPrompts": used_ref, "promptNote": prompt_note}


def browser_link(prefix: str, seed: int, before: int, after: int, task: str, direction: str) -> str:
    """The in-page href that opens the example browser of the run under `prefix` on one seed's flips of `task`
    between stages `before` and `after` in one direction (lost: right -> wrong, gained: wrong -> right).

    Stages and the task travel by value, not as the blob's indices: the link does not depend on how
    browser_data orders its pairs. A fragment that names no element scrolls nowhere by itself, so BROWSER_JS
    reads it (on a click, on load and on hashchange): the same link works from the page and pasted as a URL."""
    query = f"seed={seed}&a={before}&b={after}&task={quote(task, safe='')}&dir={int(direction == 'gained')}"
    return f"#{prefix}examples?{query}"


def blob_script(data: dict, element_id: str) -> str:
    """The blob as an inert <script type="application/json">: ASCII only (no encoding surprises, lone
    surrogates survive) and with every '<' escaped, so no text in it can close the script element. NaN is
    refused here: JSON.parse would reject it and leave the browser empty."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def browser_section(results: RunResults, prefix: str, heading: str = "h2") -> str:
    """The example browser: filters built here, cards rendered by BROWSER_JS from the blob."""
    data = browser_data(results)
    esc = html.escape

    def options(pairs: list[tuple[str, str]], everything: str) -> str:
        return f'<option value="">{everything}</option>' + "".join(
            f'<option value="{esc(v)}">{esc(label)}</option>' for v, label in pairs)

    filters = [("task", "Task", options([(str(i), t) for i, t in enumerate(data["tasks"])], "all tasks")),
               ("pair", "Checkpoints", options([(str(i), p["label"]) for i, p in enumerate(data["pairs"])],
                                               "every pair")),
               ("dir", "Flip", options([("0", "right → wrong (lost)"), ("1", "wrong → right (gained)")],
                                       "both directions"))]
    if len(data["seeds"]) > 1:
        filters.append(("seed", "Seed", options([(str(s), str(s)) for s in data["seeds"]], "every seed")))
    selects = "".join(f'<label>{label} <select name="{name}">{opts}</select></label>' for name, label, opts in filters)
    note = f'<p class="note">{esc(data["promptNote"])}.</p>' if data["promptNote"] else ""
    blob_id = f"{prefix}xb-data"
    return (f'<section id="{prefix}examples"><{heading}>Example browser: what changed between checkpoints'
            f'</{heading}><p>Test examples whose correctness flipped between two checkpoints of the same seed '
            f'({len(data["rows"])} in all), with both outputs: <del>words only before</del>, <ins>words only '
            f'after</ins>. Below them, the reference rows whose KL to base moved most between the same '
            f'checkpoints.</p>{note}<div class="xb" data-blob="{blob_id}"><div class="xb-filters">{selects}</div>'
            '<p class="xb-count" aria-live="polite"></p><div class="xb-list"></div>'
            '<button type="button" class="xb-more" hidden>show more</button>'
            f'<{heading} class="sub">Reference rows whose KL to base moved most</{heading}>'
            '<div class="scroll"><table class="xb-ref"><thead><tr><th>Checkpoints</th><th>Seed</th><th>Row</th>'
            '<th>Prompt</th><th>KL before</th><th>KL after</th><th>Δ KL</th><th>Output before</th>'
            '<th>Output after</th></tr></thead><tbody></tbody></table></div></div>'
            f'{blob_script(data, blob_id)}</section>')


BROWSER_CSS = """
.xb-filters{display:flex;flex-wrap:wrap;gap:8px 16px;margin:8px 0} .xb-filters select{font:inherit;max-width:100%}
.xb-filters label{display:flex;gap:6px;align-items:center;max-width:100%}
.xb-card{border:1px solid var(--line);border-left:4px solid var(--bad);border-radius:6px;padding:8px 10px;margin:8px 0}
.xb-card.gained{border-left-color:var(--good)}
.xb-card header{display:flex;flex-wrap:wrap;gap:4px 10px;align-items:baseline}
.badge{font-size:.78rem;font-weight:600;padding:1px 7px;border-radius:10px;background:#fbe4e2;color:var(--bad)}
.gained .badge{background:#e1f3e6;color:var(--good)} .xb-meta{color:var(--mute);font-size:.85rem;overflow-wrap:anywhere}
.xb-prompt{white-space:pre-wrap;overflow-wrap:anywhere;margin:6px 0;font-size:.9rem;max-height:14em;overflow:auto}
.missing{color:var(--mute);font-style:italic} .xb-label{font-size:.8rem;color:var(--mute)}
.xb-outs{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:8px}
.diff{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0;max-height:260px}
td.diff{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8rem;min-width:180px}
td.prompt{min-width:220px;max-width:420px}
.xb .sub{margin-top:1.2em;font-size:1.05rem}
del{background:#fbd3d0;text-decoration:line-through} ins{background:#c9efd4;text-decoration:none}
.xb-more{font:inherit;padding:6px 14px;border:1px solid var(--accent);color:var(--accent);background:#fff;
  border-radius:6px;cursor:pointer}
"""

# Plain JS, no framework: the rows stay in the JSON blob; a filter change renders the first PAGE matches, and
# "show more" the next PAGE, so thousands of flips never become thousands of DOM nodes at once.
BROWSER_JS = r"""
(function () {
  "use strict";
  var PAGE = 200;
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function diffCell(tag, markup) {  // markup was escaped in Python: its only tags are <del> and <ins>
    var e = el(tag, "diff");
    e.innerHTML = markup;
    return e;
  }
  function init(root) {
    var data = JSON.parse(document.getElementById(root.getAttribute("data-blob")).textContent);
    var f = {};
    ["task", "pair", "dir", "seed"].forEach(function (n) { f[n] = root.querySelector("select[name=" + n + "]"); });
    var list = root.querySelector(".xb-list"), more = root.querySelector(".xb-more"),
        count = root.querySelector(".xb-count"), refBody = root.querySelector(".xb-ref tbody");
    var matches = [], shown = 0;
    function is(select, value) { return !select || select.value === "" || value === Number(select.value); }
    function keep(r) { return is(f.seed, r[0]) && is(f.pair, r[1]) && is(f.task, r[2]) && is(f.dir, r[4]); }
    function output(label, markup, parsed) {
      var box = el("div", "xb-out");
      box.appendChild(el("div", "xb-label", label + " · parsed: " + (parsed === "" ? "(nothing)" : parsed)));
      box.appendChild(diffCell("pre", markup));
      return box;
    }
    function card(r) {
      var task = data.tasks[r[2]], pair = data.pairs[r[1]], dir = r[4] ? "gained" : "lost";
      var c = el("article", "xb-card " + dir);
      c.setAttribute("data-task", task);
      c.setAttribute("data-dir", dir);
      c.setAttribute("data-pair", String(r[1]));
      c.setAttribute("data-seed", String(r[0]));
      var head = el("header");
      head.appendChild(el("span", "badge", r[4] ? "wrong → right" : "right → wrong"));
      head.appendChild(el("b", null, task));
      head.appendChild(el("span", "xb-meta", r[3] + " · seed " + r[0] + " · " + pair.label + " · gold: " + r[5]));
      c.appendChild(head);
      var prompt = (data.prompts[task] || {})[r[3]];
      c.appendChild(prompt === undefined ? el("p", "xb-prompt missing", "(prompt not available: id only)")
                                         : el("p", "xb-prompt", prompt));
      var outs = el("div", "xb-outs");
      outs.appendChild(output(pair.before, r[8], r[6]));
      outs.appendChild(output(pair.after, r[9], r[7]));
      c.appendChild(outs);
      return c;
    }
    function showMore() {
      var end = Math.min(matches.length, shown + PAGE), frag = document.createDocumentFragment();
      for (; shown < end; shown++) frag.appendChild(card(matches[shown]));
      list.appendChild(frag);
      count.textContent = matches.length + " flipped example" + (matches.length === 1 ? "" : "s") +
        (matches.length ? " (showing " + shown + ")" : " match these filters");
      more.hidden = shown >= matches.length;
      more.textContent = "show " + Math.min(PAGE, matches.length - shown) + " more";
    }
    function references() {
      var task = f.task.value === "" ? null : data.tasks[Number(f.task.value)];
      var rows = data.ref.filter(function (r) {
        return is(f.seed, r[0]) && is(f.pair, r[1]) && (task === null || r[3] === task);
      });
      rows.sort(function (x, y) { return Math.abs(y[5] - y[4]) - Math.abs(x[5] - x[4]); });
      refBody.textContent = "";
      rows.slice(0, 20).forEach(function (r) {
        var tr = el("tr"), prompt = data.refPrompts[r[2]];
        [data.pairs[r[1]].label, r[0], r[2] + (r[3] ? " (" + r[3] + ")" : ""),
         prompt === undefined ? "(not available)" : prompt, r[4].toFixed(4), r[5].toFixed(4),
         (r[5] - r[4] >= 0 ? "+" : "") + (r[5] - r[4]).toFixed(4)].forEach(function (v, i) {
          tr.appendChild(el("td", i === 3 ? "prompt" : (i >= 4 ? "num" : null), v));
        });
        tr.appendChild(diffCell("td", r[6]));
        tr.appendChild(diffCell("td", r[7]));
        refBody.appendChild(tr);
      });
      if (!rows.length) {
        var td = el("td", null, "no reference rows for these filters");
        td.colSpan = 9;
        refBody.appendChild(el("tr")).appendChild(td);
      }
    }
    function update() {
      matches = data.rows.filter(keep);
      shown = 0;
      list.textContent = "";
      showMore();
      references();
    }
    function select(want) {  // a browser_link's selection: every filter set to it, whatever it showed before
      var pair = data.pairs.findIndex(function (p) { return p.a === want.a && p.b === want.b; }),
          task = data.tasks.indexOf(want.task);
      if (f.seed) f.seed.value = String(want.seed);
      f.pair.value = pair < 0 ? "" : String(pair);
      f.task.value = task < 0 ? "" : String(task);
      f.dir.value = want.dir;
      update();
    }
    Object.keys(f).forEach(function (n) { if (f[n]) f[n].addEventListener("change", update); });
    more.addEventListener("click", showMore);
    root.addEventListener("xb-select", function (e) { select(e.detail); });
    update();
  }
  // A flip link (html_examples.browser_link): #<prefix>examples?seed=S&a=A&b=B&task=T&dir=0|1
  function follow(hash) {
    var m = /^#([^?]*examples)\?(.*)$/.exec(hash || "");
    var section = m && document.getElementById(decodeURIComponent(m[1]));
    var root = section && section.querySelector(".xb");
    if (!root) return false;
    var q = new URLSearchParams(m[2]);
    for (var p = section.parentElement; p; p = p.parentElement) if (p.tagName === "DETAILS") p.open = true;
    root.dispatchEvent(new CustomEvent("xb-select", {detail: {seed: Number(q.get("seed")), a: Number(q.get("a")),
      b: Number(q.get("b")), task: q.get("task"), dir: q.get("dir") === "1" ? "1" : "0"}}));
    root.scrollIntoView({block: "start"});
    return true;
  }
  Array.prototype.forEach.call(document.querySelectorAll(".xb"), init);
  // on the click itself too: following the link the page already shows changes no hash, so no hashchange
  document.addEventListener("click", function (e) {
    var a = e.target.closest ? e.target.closest("a.xb-link") : null;
    if (a) follow(a.getAttribute("href"));
  });
  window.addEventListener("hashchange", function () { follow(location.hash); });
  follow(location.hash);
})();
"""
