"""The tables docs/deployment.md quotes: each run's deployed forms (`lorawatch deploy`) as the report shows them, and
PyTorch's own generation throughput beside llama.cpp's.

    python study/deployment_table.py RUN_DIR...

Every number comes from the run folders: the deployed records (stage-K/deployed/FORMAT/) through the report's own
section (report/deployed_view.py), and PyTorch's tokens per second from costs.json (tokens generated over the
evaluation phase's seconds, every checkpoint, pooled batched decoding: a throughput, where llama.cpp's is one
prompt at a time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorawatch.report.deployed_view import deployed_section, run_frame
from lorawatch.report.tables import load_run_config
from lorawatch.rundir.layout import RunFolder


def pytorch_throughput(run_dir: Path) -> str:
    costs = RunFolder(run_dir).costs.read()
    generated = costs.generation["evaluation"].generated_tokens
    seconds = costs.phase_seconds["evaluation"]
    return f"{generated / seconds:.1f} tokens/s ({generated} tokens in {seconds:.0f} s of evaluation)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    for run_dir in args.runs:
        config = load_run_config(run_dir)
        print(f"# {run_dir.name}\n")
        print(f"PyTorch ({config.model.dtype}, batched): {pytorch_throughput(run_dir)}\n")
        frame = run_frame(run_dir, list(config.seeds), config.statistics)
        frame["model"], frame["order"] = config.model.spec, str(config.order)  # the report's group keys
        print(deployed_section(frame))


if __name__ == "__main__":
    main()
