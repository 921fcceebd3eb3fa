"""`lorawatch export`: a finished stage as the files a user ships, each checked against the checkpoint; `lorawatch
deploy`: every checkpoint of a finished run evaluated as it ships, through llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lorawatch.cli.common import long_command
from lorawatch.errors import UserError


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


def deploy(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder (`lorawatch run` or `evaluate`)")],
    formats: Annotated[Optional[str], typer.Option(help="GGUF types, comma-separated (default: the run's "
                                                        "deploy.formats, else f16,q8_0,q4_k_m)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="only this seed (default: every seed)")] = None,
    stages: Annotated[Optional[str], typer.Option(help="only these stages, comma-separated (default: every finished "
                                                       "stage); stage 0, the base model, is always added")] = None,
) -> None:
    """Evaluate each checkpoint as it ships: merged, converted to GGUF in each format and run by llama.cpp on every
    task's test rows and the reference set; its accuracy, its drift from the PyTorch checkpoint and the base model's
    own drift in the same format are recorded in the run folder (stage-K/deployed/FORMAT/) and shown by `show`,
    `report` and `gate --max-deploy-kl`. Finished formats are not redone (docs/deployment.md)."""
    with long_command():
        from lorawatch.analysis.deployed import seed_results
        from lorawatch.deploy.deployed import evaluate_deployed, plan_deployed
        from lorawatch.deploy.formats import split_formats

        stage_list = None
        if stages is not None:
            try:
                stage_list = [int(s) for s in stages.split(",") if s.strip()]
            except ValueError:
                raise UserError(f"--stages: expected comma-separated stage numbers, got {stages!r}") from None
        plan = plan_deployed(run_dir, None if formats is None else split_formats(formats),
                             None if seed is None else [seed], stage_list)
        evaluate_deployed(plan, Console(stderr=True))
        for s in [seed] if seed is not None else plan.config.seeds:
            for result in seed_results(run_dir, s, plan.config.statistics):
                if stage_list is None or result.stage in {0, *stage_list}:
                    if result.format in plan.formats:
                        print(result_line(result))


def result_line(result) -> str:
    """One deployed form against its checkpoint, for the terminal."""
    tasks = "; ".join(f"{t.task} {t.accuracy_after:.3f} (PyTorch {t.accuracy_before:.3f}, "
                      f"{t.verdict}{'' if t.verdict != 'regressed' else f', p {t.p_adjusted:.3g}'})"
                      for t in result.tasks)
    ref = result.record.reference
    base = "" if result.base is None else f"; base model in {result.format}: {result.base.reference.kl_reverse_mean:.2e}"
    return (f"seed {result.seed} stage {result.stage} ({result.checkpoint}) {result.format}: {tasks}; KL(checkpoint ‖ "
            f"deployed) {ref.kl_reverse_mean:.2e}{base}; same top-1 {ref.same_top1:.1%}")
