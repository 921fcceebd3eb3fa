"""lorawatch benchmark: the protocol's cost on the real TRACE data, phase by phase.

    python bench/run.py W1 W0-study     # the full comparison: fast path, plain baseline, floor, training loop
    python bench/run.py W0 --guard      # W0, then the faithfulness guard against a one-row-at-a-time path
    python bench/run.py W0 --dtypes float32,bfloat16   # both dtypes in one invocation, on one machine

For every workload with a target (W1, W0-study) the same invocation also measures, on the same machine:
    plain     the straightforward path (`--plain`: no drafts, unmerged adapter, no shared prefixes, no pooled
              decoding, a separate reference pass, batches of at most 4 rows), W1 only (--baseline-for)
    floor     every checkpoint's prompt pass (bench/floor.py) plus the fast run's training, start and load
    training  lorawatch's stage against a plain PEFT loop on the same rows in this process (bench/train_loop.py)
and prints fast/plain and fast/floor.

Workloads (SmolLM2-135M-Instruct, fp32, the 48-row reference set, seed 33 unless stated):
    W0        first 16 train / 20 test rows per task, 64 new tokens
    W1        64 train / 40 test rows per task, 256 new tokens (the paper's generation length)
    W0-study  W0 with seeds 33, 42, 123 x task orders original and reversed (two runs, one per order)
    monitor   80 train / 5 test rows per task with the live drift monitor at its default interval: its overhead

Every run is the real command line (`lorawatch run`, then `lorawatch report`) in a subprocess, with a fresh
base-stage cache per workload, so nothing is reused from an earlier benchmark. The phase times, token
counts and peak memory come from each run's costs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "trace-llm-cl-500"

# The published implementation on the 2-core Intel Xeon of docs/performance.md: wall seconds and peak RSS of one run.
REFERENCE = {"W0": {"wall_s": 533.0, "peak_rss_gb": 3.3}, "W1": {"wall_s": 1411.0, "peak_rss_gb": 3.4},
             "W0-study": {"wall_s": 6 * 533.0, "peak_rss_gb": 3.3}}
TARGET_SPEEDUP = {"W1": 5.0, "W0-study": 10.0}

WORKLOADS = {
    "W0": {"runs": [("original", "33")], "train": 16, "test": 20, "new": 64},
    "W1": {"runs": [("original", "33")], "train": 64, "test": 40, "new": 256},
    "W0-study": {"runs": [("original", "33,42,123"), ("reversed", "33,42,123")], "train": 16, "test": 20, "new": 64},
    # The live drift monitor's cost at its default interval (10 steps): 5 optimizer steps per stage, so each
    # stage pays one measurement per 5 steps (its last step), twice the default's steady-state rate.
    "monitor": {"runs": [("original", "33")], "train": 80, "test": 5, "new": 8, "args": ["--monitor", "warn"]},
}
PHASES = ("model_load", "training", "evaluation", "reference_distribution", "tables")
COUNTERS = ("rows", "prompt_tokens", "generated_tokens", "decode_steps", "draft_tokens", "accepted_draft_tokens",
            "forward_tokens", "forward_passes", "lookup_tokens", "accepted_lookup_tokens")


def workload_inputs(name: str, source: str):
    """A workload's config (paper-qwen with SmolLM2 in fp32 at its row limits), data, model and token ids, loaded
    in this process (bench/floor.py and bench/train_loop.py time pieces of the protocol with them)."""
    from lorawatch.config import build_config
    from lorawatch.data.inputs import encode, load_data
    from lorawatch.models.loading import load_model
    from lorawatch.presets import preset

    spec = WORKLOADS[name]
    data = preset("paper-qwen").model_dump(mode="json")
    data["model"].update(spec="smollm2-135m-instruct", dtype="float32", device="cpu")
    for task in data["tasks"]:
        task.update(max_train_rows=spec["train"], max_test_rows=spec["test"])
    config = build_config(data, source=source)
    run_data = load_data(config)
    loaded = load_model(config.model.spec, device="cpu", dtype="float32")
    return config, run_data, loaded, encode(run_data, loaded.tokenizer, config.train.max_length)


def lorawatch(*args: str, env: dict) -> None:
    cmd = [sys.executable, "-m", "lorawatch", *args]
    result = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"bench: `{' '.join(cmd[2:])}` failed:\n{result.stderr[-2000:]}")


def prepare_data(source: Path | None, root: Path) -> dict:
    """The paper's data through lorawatch's own verified download (from a local copy when there is one)."""
    env = dict(os.environ, LORAWATCH_DATA=str(root))
    args = ["data", "fetch", "trace-500"]
    if source is not None:
        args += ["--source", str(source)]
    lorawatch(*args, env=env)
    return env


# The straightforward path the fast one is measured against: every fast-path switch off, batches of 4 rows.
PLAIN = ["--plain", "--set", "eval.batch_rows=4"]


def run_workload(name: str, env: dict, work: Path, extra: list[str], dtype: str = "float32") -> dict:
    spec = WORKLOADS[name]
    tag = (name if dtype == "float32" else f"{name}-{dtype}") + ("-plain" if "--plain" in extra else "")
    env = dict(env, LORAWATCH_BASE_STAGE_CACHE=str(work / f"{tag}-base-cache"))
    shutil.rmtree(env["LORAWATCH_BASE_STAGE_CACHE"], ignore_errors=True)
    phases = {p: 0.0 for p in (*PHASES, "monitor", "report", "process_start")}
    counters: dict[str, dict[str, int]] = {}
    peak = 0
    runs = []
    started = time.perf_counter()
    for order, seeds in spec["runs"]:
        out = work / f"{tag}-{order}"
        run_start = time.perf_counter()
        lorawatch("run", "--preset", "paper-qwen", "--model", "smollm2-135m-instruct", "--dtype", dtype,
                  "--device", "cpu", "--order", order, "--seeds", seeds, "--max-train-rows", str(spec["train"]),
                  "--max-test-rows", str(spec["test"]), "--max-new-tokens", str(spec["new"]), "--out", str(out),
                  "--overwrite", *spec.get("args", []), *extra, env=env)
        run_wall = time.perf_counter() - run_start
        report_start = time.perf_counter()
        lorawatch("report", str(out), "--out", str(out / "report"), env=env)
        phases["report"] += time.perf_counter() - report_start
        costs = json.loads((out / "costs.json").read_text())
        for phase, seconds in costs["phase_seconds"].items():
            phases[phase] = phases.get(phase, 0.0) + seconds
        phases["process_start"] += run_wall - costs["wall_seconds"]  # interpreter and imports
        for part, values in costs["generation"].items():
            total = counters.setdefault(part, {c: 0 for c in COUNTERS})
            for c in COUNTERS:
                total[c] += values.get(c, 0)
        peak = max(peak, costs["peak_rss_bytes"])
        runs.append({"order": order, "seeds": seeds, "run_dir": str(out), "wall_s": round(run_wall, 2),
                     "base_stage_reused": json.loads((out / f"seed-{seeds.split(',')[0]}" / "stage-0" /
                                                      "stage.json").read_text()).get("reused_from_cache")})
    wall = time.perf_counter() - started
    runs_s = sum(r["wall_s"] for r in runs)  # the `lorawatch run` commands alone, without the reports
    monitor_s = phases.get("monitor", 0.0)
    generated = sum(c["generated_tokens"] for c in counters.values())
    generation_seconds = phases["evaluation"]
    result = {
        "workload": name, "dtype": dtype, "rows": {"train": spec["train"], "test": spec["test"], "reference": 48},
        "max_new_tokens": spec["new"], "wall_s": round(wall, 2), "runs_s": round(runs_s, 2),
        "phase_s": {k: round(v, 2) for k, v in phases.items()},
        "generation": counters,
        "generated_tokens": generated,
        "decode_steps_needed": generated,
        "decode_steps_computed": sum(c["decode_steps"] for c in counters.values()),
        "draft_positions_checked": sum(c["draft_tokens"] for c in counters.values()),
        "generated_tokens_per_s": round(generated / generation_seconds, 1) if generation_seconds else None,
        "forward_tokens_per_s": round(sum(c["forward_tokens"] for c in counters.values()) / generation_seconds, 1)
        if generation_seconds else None,
        "peak_rss_gb": round(peak / 2**30, 2),
        "monitor_overhead": round(monitor_s / (phases["training"] - monitor_s), 4) if monitor_s else None,
        "runs": runs,
        "reference": REFERENCE.get(name),
        "speedup": round(REFERENCE[name]["wall_s"] / wall, 2) if name in REFERENCE else None,
        "target_speedup": TARGET_SPEEDUP.get(name),
    }
    return result


def machine() -> dict:
    import torch
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def print_table(results: list[dict]) -> None:
    head = ["phase (s)"] + [r["workload"] + ("" if r["dtype"] == "float32" else f" {r['dtype']}") +
                            ("" if r["fast_path"] else " plain") for r in results]
    rows = [[p] + [f"{r['phase_s'].get(p, 0):.1f}" for r in results]
            for p in ("process_start", *PHASES, "monitor", "report")]
    rows.append(["wall"] + [f"{r['wall_s']:.1f}" for r in results])
    rows.append(["published wall"] + [f"{r['reference']['wall_s']:.0f}" if r["reference"] else "—" for r in results])
    rows.append(["speed-up"] + [f"{r['speedup']:.1f}x" if r["speedup"] else "—" for r in results])
    rows.append(["monitor overhead"] + [f"{100 * r['monitor_overhead']:.1f}%" if r["monitor_overhead"] else "—"
                                        for r in results])
    rows.append(["generated tokens"] + [str(r["generated_tokens"]) for r in results])
    rows.append(["decode steps computed"] + [str(r["decode_steps_computed"]) for r in results])
    rows.append(["draft positions checked"] + [str(r["draft_positions_checked"]) for r in results])
    rows.append(["generated tok/s"] + [str(r["generated_tokens_per_s"]) for r in results])
    rows.append(["lookup tokens accepted"] + [str(sum(c.get("accepted_lookup_tokens", 0)
                                                       for c in r["generation"].values())) for r in results])
    rows.append(["peak RSS (GB)"] + [f"{r['peak_rss_gb']:.2f}" for r in results])
    rows.append(["runs alone, no report (s)"] + [f"{r['runs_s']:.1f}" for r in results])
    rows.append(["plain baseline, same (s)"] + [f"{r['plain']['runs_s']:.1f}" if r.get("plain") else "—"
                                                for r in results])
    rows.append(["fast / plain"] + [f"{r['fast_over_plain']:.3f}" if r.get("plain") else "—" for r in results])
    rows.append(["floor (s)"] + [f"{r['floor']['floor_s']:.1f}" if r.get("floor") else "—" for r in results])
    rows.append(["fast / floor"] + [f"{r['fast_over_floor']:.2f}" if r.get("floor") else "—" for r in results])
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--source", type=Path, default=SHARED_DATA if SHARED_DATA.is_dir() else None,
                        help="local copy of the TRACE files (default: ../shared/data/trace-llm-cl-500 if present, "
                             "else the authors' repository)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON results go")
    parser.add_argument("--guard", action="store_true", help="after W0, check it against a one-row-at-a-time path")
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated model dtypes, each workload run in each (e.g. float32,bfloat16: "
                             "the ratio measured in one invocation, on one machine)")
    parser.add_argument("--plain", action="store_true",
                        help="run only the plain path (every fast-path switch off, batches of 4 rows)")
    parser.add_argument("--baseline-for", default="W1",
                        help="comma-separated workloads that also run the plain baseline (default W1; '' for none)")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor and the training-loop comparison")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="lorawatch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = prepare_data(args.source, work / "data")
    extra = PLAIN if args.plain else []
    baselines = {w for w in args.baseline_for.split(",") if w}
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    training = None
    for name in args.workloads:
        for dtype in args.dtypes.split(","):
            print(f"bench: {name} {dtype} ...", file=sys.stderr, flush=True)
            result = run_workload(name, env, work, extra, dtype)
            result["machine"] = machine()
            result["fast_path"] = not args.plain
            if args.guard and name == "W0":
                from guard import check_run  # bench/guard.py
                result["guard"] = check_run(Path(result["runs"][0]["run_dir"]))
            if not args.plain and name in baselines:
                print(f"bench: {name} {dtype} plain baseline ...", file=sys.stderr, flush=True)
                plain = run_workload(name, env, work, PLAIN, dtype)
                result["plain"] = plain
                result["fast_over_plain"] = round(result["runs_s"] / plain["runs_s"], 4)
            if not args.plain and not args.no_floor and name in TARGET_SPEEDUP and dtype == "float32":
                from floor import floor_for  # bench/floor.py
                from train_loop import compare as compare_training  # bench/train_loop.py
                print(f"bench: {name} floor ...", file=sys.stderr, flush=True)
                result["floor"] = floor_for(name, result, env)
                result["fast_over_floor"] = round(result["runs_s"] / result["floor"]["floor_s"], 3)
                if training is None:
                    print("bench: training against a plain PEFT loop ...", file=sys.stderr, flush=True)
                    training = compare_training("W1", repeat=2, profile=False)
                    training.pop("profiles")
                result["training_vs_plain_loop"] = training
            suffix = ("" if dtype == "float32" else f"-{dtype}") + ("-plain" if args.plain else "")
            (args.out / f"{name}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
            results.append(result)
            versus = f" ({result['speedup']:.1f}x the published implementation)" if result["speedup"] else ""
            print(f"bench: {name} {dtype} {result['wall_s']:.1f} s{versus}", file=sys.stderr, flush=True)
    print_table(results)
    if training is not None:
        print(f"training, {training['rows']} rows of W1's first task in one process: lorawatch "
              f"{training['best_s']['lorawatch']:.1f} s, a plain PEFT loop {training['best_s']['plain']:.1f} s "
              f"({training['lorawatch_over_plain']:.3f}x)")


if __name__ == "__main__":
    main()
