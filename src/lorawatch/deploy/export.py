"""`lorawatch export RUN --seed S --stage K --out DIR [--format hf|gguf] [--quant f16,q8_0,q4_k_m]`.

    plan     everything that can be refused without a model: the run folder, the seed, the stage, its adapter, the
             strategy, the output folder, the format and types, llama.cpp and its converter (one line each)
    load     the base model as the run loaded it (refused if its weights are not the run's)
    measure  the checkpoint (base + the stage's adapter, unmerged) on the run's reference set
    merge    the adapter merged into the weights; a safetensors Hugging Face folder with the tokenizer
    check    the folder read back by transformers, against the checkpoint (agreement.py's bar)
    gguf     with --format gguf: llama.cpp's converter, quantizer and runtime, each file checked the same way
    card     README.md: the run's measurements of the stage (card.py) and these checks

Everything is written into a folder beside DIR and renamed to DIR only when every hard bar holds: DIR never holds
an export that was not checked. Stage 0 exports the base model as the run loaded it (no adapter), so that the base
model's own deployment drift can be measured beside a checkpoint's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from rich.console import Console

from lorawatch.config import ExperimentConfig, build_config
from lorawatch.deploy import card, gguf, merge
from lorawatch.deploy.agreement import Agreement, agreement
from lorawatch.errors import UserError
from lorawatch.rundir import store
from lorawatch.rundir.layout import ADAPTER_WEIGHTS, RunFolder
from lorawatch.rundir.lifecycle import is_run_folder

FORMATS = ("hf", "gguf")
EXPORT_RECORD = "lorawatch-export.json"  # in the export folder: what was exported and how it was checked
GGUF_FOLDER = "gguf"


@dataclass(frozen=True)
class ExportPlan:
    run_dir: Path
    config: ExperimentConfig
    seed: int
    stage: int
    checkpoint: str
    adapter: Path | None  # None: stage 0, the base model
    out: Path
    format: str
    quants: list[str]
    weights: str | None  # the digest of the base weights the run recorded


def run_config(run_dir: Path) -> ExperimentConfig:
    """The config of a run folder; refused in one line when `run_dir` is not one."""
    folder = RunFolder(run_dir)
    if not run_dir.is_dir() or not is_run_folder(run_dir) or not folder.config.is_file():
        raise UserError(f"{run_dir}: not a lorawatch run folder")
    return build_config(store.read_run_file(folder.config), source=str(folder.config))


def recorded_weights(folder: RunFolder) -> str | None:
    """The digest of the base weights the run recorded (inputs.json), for merge.load_base to check."""
    inputs = folder.inputs.load() if folder.inputs.exists() else None
    return inputs.model.get("weights") if inputs is not None and inputs.model else None


def stage_adapter(folder: RunFolder, seed: int, stage: int) -> Path | None:
    """The cumulative adapter of a finished stage (None for stage 0, the base model); refused when it is missing."""
    if stage == 0:
        return None
    adapter = folder.stage(seed, stage).adapter
    record = folder.stage(seed, stage).record.load()
    if record.adapter:  # `lorawatch evaluate`: the adapter it loaded, kept where it was
        adapter = Path(record.adapter)
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"seed {seed} stage {stage}: its adapter {adapter} is missing")
    return adapter


def plan_export(run_dir: Path, seed: int, stage: int, out: Path, fmt: str = "hf", quant: str | None = None,
                overwrite: bool = False) -> ExportPlan:
    """Every refusal that needs no model, in one line each, before any work."""
    run_dir, out = Path(run_dir), Path(out)
    folder = RunFolder(run_dir)
    config = run_config(run_dir)
    if seed not in config.seeds:
        raise UserError(f"--seed {seed}: the run has seeds {', '.join(map(str, config.seeds))}")
    stages = [k for k in folder.seed(seed).stages_on_disk() if folder.stage(seed, k).finished()]
    if stage not in stages:
        raise UserError(f"--stage {stage}: seed {seed} has no finished stage {stage} (finished: "
                        f"{', '.join(map(str, stages)) or 'none'})")
    if config.strategy.one_adapter_per_task:
        raise UserError(f"strategy '{config.strategy.name}' keeps one adapter per task; export merges the one "
                        "cumulative adapter of a stage (strategies none, replay, ewc, ...)")
    adapter = stage_adapter(folder, seed, stage)
    if fmt not in FORMATS:
        raise UserError(f"--format: expected {' or '.join(FORMATS)}, got {fmt!r}")
    if fmt == "hf" and quant:
        raise UserError("--quant is for --format gguf; a Hugging Face folder keeps the run's dtype")
    quants = gguf.parse_quants(quant or "f16") if fmt == "gguf" else []
    if fmt == "gguf":
        gguf.llama_cpp_module()
        gguf.converter_folder()
    if out.exists() and not (out.is_dir() and (overwrite or not any(out.iterdir()))):
        raise UserError(f"--out {out}: exists and is not an empty folder (--overwrite replaces it)")
    weights = recorded_weights(folder)
    return ExportPlan(run_dir=run_dir, config=config, seed=seed, stage=stage,
                      checkpoint=folder.stage(seed, stage).record.load().checkpoint, adapter=adapter, out=out,
                      format=fmt, quants=quants, weights=weights)


def export(plan: ExportPlan, console: Console | None = None) -> list[Agreement]:
    """Write the export (see the module's docstring); the checks, in the order made."""
    console = console or Console(stderr=True)
    say = lambda text: console.print(f"lorawatch: export: {text}")  # noqa: E731
    loaded = merge.load_base(plan.config, plan.weights)
    if plan.format == "gguf":
        gguf.check_family(loaded.model.config, plan.config.model.spec)
    prompts = merge.reference_prompts(plan.config, loaded.tokenizer)
    model = loaded.model if plan.adapter is None else PeftModel.from_pretrained(loaded.model, str(plan.adapter))
    measured = merge.reference_logits(model, prompts, loaded.tokenizer)
    if plan.adapter is not None:
        model = model.merge_and_unload()
    work = plan.out.parent / f".{plan.out.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    try:
        merge.save(model, loaded.tokenizer, work)
        del model
        checks = [agreement("hf", measured, merge.reference_logits(merge.reload(work, loaded.model.dtype), prompts,
                                                                   loaded.tokenizer))]
        say(checks[-1].line())
        files = sorted(p.name for p in work.iterdir())
        if plan.format == "gguf":
            stem = f"seed{plan.seed}-stage{plan.stage}"
            written = gguf.write_gguf(work, work / GGUF_FOLDER, stem, plan.quants)
            for quant, path in written.items():
                checks.append(agreement(quant, measured, gguf.gguf_logits(path, prompts)))
                say(checks[-1].line())
                files.append(f"{GGUF_FOLDER}/{path.name}")
        failed = [c for c in checks if c.hard and not c.passes]
        if failed:
            raise UserError(f"export check failed, nothing written to {plan.out}: {failed[0].line()}")
        facts = card.stage_facts(plan.run_dir, plan.config, plan.seed, plan.stage)
        card.write_card(work / "README.md", name=f"{Path(plan.config.model.spec).name}-{plan.checkpoint}",
                        base_model=plan.config.model.spec, run_dir=plan.run_dir, seed=plan.seed, stage=plan.stage,
                        facts=facts, checks=checks, files=files)
        record = {"run": str(plan.run_dir), "seed": plan.seed, "stage": plan.stage, "checkpoint": plan.checkpoint,
                  "adapter": None if plan.adapter is None else str(plan.adapter), "format": plan.format,
                  "dtype": str(loaded.model.dtype).removeprefix("torch."), "checks": [c.to_dict() for c in checks],
                  "llama_cpp": gguf.runtime_version() if plan.format == "gguf" else None}
        (work / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if plan.out.exists():
            shutil.rmtree(plan.out)
        work.rename(plan.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for c in checks:
        if not c.passes:
            console.print(f"lorawatch: export: warning: {c.form} is below its advisory bar ({c.bar_text()})")
    say(f"written to {plan.out} (checked against seed {plan.seed} stage {plan.stage}, {plan.checkpoint})")
    return checks
