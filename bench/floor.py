"""The exact protocol's floor on this machine: what a workload costs even if decoding were free.

    python bench/floor.py                # W1 and the W0 study; reads bench/results/<workload>.json
    python bench/floor.py W1 --repeat 3

bench/run.py computes the same floor in its own invocation (floor_for), right after the fast run it uses.

Whatever an implementation does, every checkpoint must read every test and reference prompt once under its
own weights (a LoRA update changes every layer, so no prompt's hidden states carry over between checkpoints;
only a task's common prefix is shared within a checkpoint), and the adapter must be trained on every training
token. This script times that prompt pass for one checkpoint with lorawatch's own batching and prefix sharing
(`generate` with one new token), multiplies it by the workload's number of checkpoint evaluations, and adds the
training, model-load and process-start seconds measured by `bench/run.py` for the same workload. The sum is a
lower bound for any exact implementation with these kernels, before a single answer token is decoded; it is
compared with the time the speed-up target against the published implementation allows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import REFERENCE, SHARED_DATA, TARGET_SPEEDUP, WORKLOADS, prepare_data, workload_inputs  # noqa: E402


def checkpoint_evaluations(name: str, tasks: int) -> int:
    """Checkpoints one workload evaluates: the base once (cached across orders) plus one per task and seed."""
    seeds = sum(len(s.split(",")) for _, s in WORKLOADS[name]["runs"])
    return 1 + tasks * seeds


def prompt_pass(name: str, repeat: int) -> dict:
    from lorawatch.engine.generation import generate
    from lorawatch.rundir.schema import GenerationCounts
    from lorawatch.recipe.protocol import generate_by_task

    config, run_data, loaded, encoded = workload_inputs(name, "bench/floor.py")
    budget = config.eval.token_budget
    times = []
    for _ in range(repeat):
        counters = GenerationCounts()
        start = time.perf_counter()
        for task in run_data.tasks:
            generate(loaded.model, loaded.tokenizer, encoded.test[task.name], max_new_tokens=1, device="cpu",
                     token_budget=budget, counters=counters)
        generate_by_task(loaded.model, loaded.tokenizer, run_data.reference, encoded.reference, max_new_tokens=1,
                         device="cpu", token_budget=budget, first_logprobs=True, counters=counters)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "prompt_tokens": counters.prompt_tokens, "positions": counters.forward_tokens,
            "tasks": len(run_data.tasks)}


def floor_for(name: str, measured: dict, env: dict, repeat: int = 2) -> dict:
    """The floor of workload `name`, with the training, start and load seconds of `measured` (a bench/run.py
    result): every checkpoint's prompt pass timed here, in this process."""
    saved = os.environ.get("LORAWATCH_DATA")
    os.environ["LORAWATCH_DATA"] = env["LORAWATCH_DATA"]
    try:
        pass_ = prompt_pass(name, repeat)
    finally:
        if saved is None:
            os.environ.pop("LORAWATCH_DATA", None)
        else:
            os.environ["LORAWATCH_DATA"] = saved
    phases = measured["phase_s"]
    fixed = phases["process_start"] + phases["model_load"] + phases["training"] - phases.get("monitor", 0.0)
    checkpoints = checkpoint_evaluations(name, pass_["tasks"])
    prompts = checkpoints * pass_["seconds"]
    allowed = REFERENCE[name]["wall_s"] / TARGET_SPEEDUP[name]
    return {"workload": name, "checkpoints": checkpoints, "prompt_pass_s": round(pass_["seconds"], 2),
            "prompt_tokens": pass_["prompt_tokens"], "positions_after_prefix_sharing": pass_["positions"],
            "prompt_positions_per_s": round(pass_["positions"] / pass_["seconds"], 1),
            "all_prompt_passes_s": round(prompts, 1), "training_s": round(phases["training"], 1),
            "start_and_load_s": round(phases["process_start"] + phases["model_load"], 1),
            "floor_s": round(fixed + prompts, 1), "target_s": round(allowed, 1),
            "lorawatch_s": measured.get("runs_s", measured["wall_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", default=["W1", "W0-study"], choices=sorted(TARGET_SPEEDUP))
    parser.add_argument("--results", type=Path, default=HERE / "results", help="bench/run.py's JSON results")
    parser.add_argument("--source", type=Path, default=SHARED_DATA if SHARED_DATA.is_dir() else None,
                        help="local copy of the TRACE files (default: ../shared/data/trace-llm-cl-500 if present)")
    parser.add_argument("--repeat", type=int, default=2, help="time the prompt pass this many times, keep the best")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "floor.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorawatch-floor-") as tmp:
        env = prepare_data(args.source, Path(tmp) / "data")
        rows = []
        for name in args.workloads:
            measured_path = args.results / f"{name}.json"
            if not measured_path.is_file():
                sys.exit(f"bench/floor.py: {measured_path} is missing; run `python bench/run.py {name}` first")
            rows.append(floor_for(name, json.loads(measured_path.read_text()), env, args.repeat))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "workloads": rows}, indent=1) + "\n")
    print(f"{'workload':10} {'ckpts':>5} {'prompt pass':>11} {'positions':>9} {'pos/s':>6} {'all passes':>10} "
          f"{'training':>8} {'start+load':>10} {'floor':>7} {'target':>7} {'lorawatch':>9}")
    for r in rows:
        print(f"{r['workload']:10} {r['checkpoints']:5d} {r['prompt_pass_s']:10.1f}s {r['positions_after_prefix_sharing']:9d} "
              f"{r['prompt_positions_per_s']:6.0f} {r['all_prompt_passes_s']:9.1f}s {r['training_s']:7.1f}s "
              f"{r['start_and_load_s']:9.1f}s {r['floor_s']:6.1f}s {r['target_s']:6.1f}s {r['lorawatch_s']:8.1f}s")


if __name__ == "__main__":
    main()
