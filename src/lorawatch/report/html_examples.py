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
    browser_data orders its pairs. A fragment that names no element scrolls nowhere by itself, so browser.js
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
    """The example browser: filters built here, cards rendered by templates/browser.js from the blob."""
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



# Plain JS, no framework: the rows stay in the JSON blob; a filter change renders the first PAGE matches, and
# "show more" the next PAGE, so thousands of flips never become thousands of DOM nodes at once.
