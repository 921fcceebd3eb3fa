"""`lorawatch export`: a finished stage as the files a user ships, each checked against the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorawatch.cli.common import long_command


def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (`lorawatch run` or `evaluate`)")],
    seed: Annotated[int, typer.Option(help="the seed whose checkpoint to export")],
    stage: Annotated[int, typer.Option(help="the stage: its cumulative adapter is merged into the base model "
                                            "(0: the base model itself)")],
    out: Annotated[Path, typer.Option(help="the folder to write (must not exist, or be empty)")],
    fmt: Annotated[str, typer.Option("--format", help="hf: a safetensors Hugging Face folder; gguf: that folder "
                                                         "and GGUF files made by llama.cpp")] = "hf",
    quant: Annotated[Optional[str], typer.Option(help="GGUF types, comma-separated: f16, q8_0, q4_k_m, ... "
                                                      "(default f16)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
) -> None:
    """Merge a stage's LoRA adapter into the base model and write it (with a model card), checked against the
    checkpoint on the run's reference set before it is declared written (docs/deployment.md)."""
    with long_command():
        from lorawatch.deploy.export import export as run_export, plan_export

        plan = plan_export(run_dir, seed, stage, out, fmt, quant, overwrite)
        run_export(plan)
        print(out)
