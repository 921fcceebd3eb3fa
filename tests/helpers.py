"""Run folders built file by file for the tests of gate, compare and report: real files in the run folder's layout,
read back by the same code as a real run's, with every test row's right/wrong chosen by the test."""

from __future__ import annotations

from pathlib import Path

from lorawatch.rundir import schema, store
from lorawatch.config import build_config
from lorawatch.rundir.layout import RUN_MARKER, RunFolder
from lorawatch.report.tables import write_seed_tables, write_summary

TASKS = ["stance", "science"]
ROWS = 40
REFERENCE_ROWS = 20


def outcomes(right: int, flip_down: int = 0, flip_up: int = 0, before: int | None = None) -> list[bool]:
    """40 rows; `right` of them right. Built from `before` right rows by flipping the first `flip_down` right ones
    to wrong and the first `flip_up` wrong ones to right (so the pairing with the earlier checkpoint is known)."""
    if before is None:
        return [i < right for i in range(ROWS)]
    rows = [i < before for i in range(ROWS)]
    for i in range(flip_down):
        rows[i] = False
    for i in range(flip_up):
        rows[before + i] = True
    assert sum(rows) == right
    return rows


def reference_kl(mean: float, rows: int = REFERENCE_ROWS) -> list[float]:
    """Per-row KL to base whose mean is `mean`: the rows spread evenly from half to one and a half times it."""
    if rows == 1:
        return [mean]
    return [mean * (0.5 + i / (rows - 1)) for i in range(rows)]


def write_run(folder: Path, stages: list[dict[str, list[bool]]] | dict[int, list[dict[str, list[bool]]]],
              kl: list[float] | dict[int, list[float]], seeds=(1,), tasks: list[str] = TASKS,
              reference_ids: list[str] | None = None, **settings) -> Path:
    """A finished `lorawatch run` folder: stage k's predictions per task and KL to base per stage, the same for
    every seed or per seed (a dict keyed by seed). `settings` go into the config (model, strategy, monitor...);
    the reference set's per-row KL is written with ids `reference_ids` (default ref-0, ref-1, ...)."""
    config = build_config({"name": folder.name, "seeds": list(seeds),
                           "tasks": [{"name": t, "kind": "multiple_choice", "train": f"/nonexistent/{t}.json",
                                      "test": f"/nonexistent/{t}-test.json"} for t in tasks],
                           "reference": {"path": "/nonexistent/reference.json"}, **settings})
    folder.mkdir(parents=True)
    (folder / RUN_MARKER).write_text("")
    store.write_json(folder / "config.json", config.model_dump(mode="json"))
    ids = reference_ids or [f"ref-{i}" for i in range(REFERENCE_ROWS)]
    for seed in seeds:
        seed_stages = stages[seed] if isinstance(stages, dict) else stages
        seed_kl = kl[seed] if isinstance(kl, dict) else kl
        for k, rows in enumerate(seed_stages):
            d = RunFolder(folder).stage(seed, k).path
            for task, correct in rows.items():
                store.write_jsonl(d / "predictions" / f"{task}.jsonl", [
                    {"id": f"{task}-{i}", "task": task, "raw_output": "A", "prediction": "A", "gold": "A" if c else "B",
                     "correct": c, "output_ids": None} for i, c in enumerate(correct)])
            store.write_jsonl(d / "predictions" / "reference.jsonl", [
                {"id": i, "task": tasks[0], "raw_output": "A", "prediction": "A", "gold": "A", "correct": True,
                 "output_ids": None} for i in ids])
            store.write_jsonl(d / "reference_drift.jsonl", [
                {"id": i, "task": tasks[0], "kl": value, "entropy": 1.0, "margin": 1.0, "top1_token": 0}
                for i, value in zip(ids, reference_kl(seed_kl[k], len(ids)))])
            store.write_record(d / "scores.json", schema.Scores,
                               {**{t: sum(c) / len(c) for t, c in rows.items()}, "reference": 0.5})
            stats = {f"{name}_{p}": (seed_kl[k] if name == "kl" else 1.0) for name in ("kl", "entropy", "margin")
                     for p in ("mean", "p10", "p95")}
            store.write_record(d / "reference_stats.json", schema.ReferenceStats,
                               {**stats, **{f"{key}_delta": value - (0.0 if key.startswith("kl") else 1.0)
                                            for key, value in stats.items()}})
            store.write_record(d / "stage.json", schema.StageRecord,
                               {"stage": k, "checkpoint": "base" if k == 0 else tasks[k - 1],
                                "task": None if k == 0 else tasks[k - 1]})
        write_seed_tables(folder, seed, config.statistics)
    write_summary(folder)
    return folder
