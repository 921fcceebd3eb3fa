"""What `eval.token_budget` buys: one checkpoint's evaluation at several budgets, its time, memory and outputs.

    python bench/token_budget.py                          # W1's base checkpoint at 8192, 16384 and 32768
    python bench/token_budget.py --budgets 8192,12288 --workload W0

The base checkpoint is the one evaluation without drafts (every answer token decoded), so it shows the
budget's effect on decoding most plainly. Each budget runs in a fresh process (its peak RSS is its own): the
test sets and the reference set generated in one call, as `lorawatch run` does. The script prints seconds,
forward passes, rows per forward pass, peak RSS and whether every row's output equals the first budget's
(JSON in bench/results/token_budget.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import SHARED_DATA, WORKLOADS, machine, workload_inputs  # noqa: E402


def one(workload: str, budget: int) -> dict:
    from lorawatch.rundir.costs import peak_rss_bytes
    from lorawatch.engine.generation import generate
    from lorawatch.rundir.schema import GenerationCounts

    config, run_data, loaded, encoded = workload_inputs(workload, str(SHARED_DATA))
    prompts = [p for task in run_data.tasks for p in encoded.test[task.name]] + list(encoded.reference)
    groups = {e.id: task.name for task in run_data.tasks for e in task.test}
    groups.update({e.id: e.task or "reference" for e in run_data.reference})
    counters = GenerationCounts()
    start = time.perf_counter()
    out = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=WORKLOADS[workload]["new"], device="cpu",
                   token_budget=budget, counters=counters, groups=groups,
                   first_logprobs=[e.id for e in run_data.reference])
    seconds = time.perf_counter() - start
    return {"budget": budget, "seconds": round(seconds, 1), "forward_passes": counters.forward_passes,
            "decode_steps": counters.decode_steps, "generated_tokens": counters.generated_tokens,
            "peak_rss_gb": round(peak_rss_bytes() / 2**30, 2),
            "outputs": {key: list(value.output_ids) for key, value in out.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W1", choices=["W0", "W1"])
    parser.add_argument("--budgets", default="8192,16384,32768")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "token_budget.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single budget, in this process
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"bench/token_budget.py: the TRACE data is not at {SHARED_DATA}")
    if args.one:
        print(json.dumps(one(args.workload, args.one)))
        return

    results = []
    for budget in (int(b) for b in args.budgets.split(",")):
        print(f"bench: {args.workload} base checkpoint at token budget {budget} ...", file=sys.stderr)
        done = subprocess.run([sys.executable, __file__, "--workload", args.workload, "--one", str(budget)],
                              check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = results[0]["outputs"]
    print(f"{args.workload} base checkpoint ({len(first)} rows), fp32, {machine()['cpus']} CPUs")
    print(f"{'budget':>7} {'seconds':>8} {'passes':>7} {'rows/pass':>9} {'peak RSS GB':>11} {'same outputs':>13}")
    for r in results:
        r["same_outputs"] = sum(r["outputs"][k] == first[k] for k in first)
        print(f"{r['budget']:>7} {r['seconds']:>8.1f} {r['forward_passes']:>7} "
              f"{r['decode_steps'] / r['forward_passes']:>9.1f} {r['peak_rss_gb']:>11.2f} "
              f"{r['same_outputs']:>6}/{len(first)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": args.workload, "machine": machine(),
                                    "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results]},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
