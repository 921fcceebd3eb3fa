"""`lorawatch evaluate`: the protocol's measurements on adapters trained elsewhere (transformers' Trainer, TRL,
LLaMA-Factory, Axolotl, Unsloth, or an earlier `lorawatch run`).

    setup      load the base model; find the adapters and check that each fits it (before any evaluation)
    base       stage 0: the base model on every task and the reference set (the same cached stage as `run`)
    for each adapter k, in the order given:
      load     its weights into one PEFT model (PEFT format: adapter_config.json + adapter_model.safetensors)
      evaluate every task, the reference set, and the drift from the base model (stage k)
    tables     the accuracy matrix and the metrics it supports

The run folder is the one `lorawatch run` writes, stage k holding the k-th adapter (stage.json names it), so
`show`, `metrics`, `report`, `compare` and `check` read it unchanged. Which task each adapter was trained on is
given with --trained-on; without it the matrix has one row per adapter and only the metrics that need no
training order are filled in (OP, BWT, FWT, gain and learning accuracy are left undefined, and said so).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import NoMatchingPeftModuleError
from transformers import AutoModelForCausalLM
from rich.console import Console
from safetensors import SafetensorError, safe_open

from lorawatch.rundir import schema, store
from lorawatch.config import ExperimentConfig, build_config
from lorawatch.errors import UserError
from lorawatch.data.inputs import load_data
from lorawatch.recipe.protocol import Recipe, data_inputs
from lorawatch.recipe.run import check_deploy_tools, deploy_finished_run, run_recipe
from lorawatch.rundir.lifecycle import plan_run_dir
from lorawatch.rundir.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lorawatch.rundir.stage_files import load_adapter_weights, stage_complete

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_(A|B)\.weight$")


@dataclass(frozen=True)
class Adapter:
    path: Path
    name: str  # the checkpoint's label in the tables when the task it was trained on is not known
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    base_model: str | None  # as the adapter's config records it (a hub id or a path where it was trained)
    digest: str  # of its weights file: a resume over other weights is refused


def find_adapters(paths: Sequence[Path]) -> list[Adapter]:
    """The adapters named, in order: PEFT adapter folders, or output folders holding checkpoint-N/ folders (as
    Trainer, TRL and LLaMA-Factory write them; taken in step order). Bad input is one line naming the folder."""
    folders: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            what = "a link that leads nowhere or in a circle" if path.is_symlink() else "not found"
            raise UserError(f"{path}: {what} (expected a PEFT adapter folder or a training output folder)")
        if not path.is_dir():
            raise UserError(f"{path}: not a folder (expected a PEFT adapter folder or a training output folder)")
        if (path / ADAPTER_CONFIG).is_file():
            folders.append(path)
            continue
        named = [(int(m.group(1)), p) for p in path.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))]
        for _, p in named:  # a checkpoint that cannot be read is refused, never dropped from the sequence
            if not p.is_dir():
                what = ("a link that leads nowhere or in a circle" if p.is_symlink() and not p.exists()
                        else "not a folder")
                raise UserError(f"{p}: {what}; every checkpoint-N of a training output folder must be a readable "
                                "adapter folder")
        steps = sorted(named)
        if not steps:
            what = "empty folder" if not any(path.iterdir()) else "no adapter here"
            raise UserError(f"{path}: {what}; expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT adapter) "
                            "or checkpoint-N/ folders holding them (a Trainer output folder)")
        folders += [p for _, p in steps]
    seen: dict[Path, Path] = {}
    for folder in folders:
        if folder.resolve() in seen:
            raise UserError(f"{folder}: given twice (also as {seen[folder.resolve()]})")
        seen[folder.resolve()] = folder
    adapters = [_read_adapter(folder) for folder in folders]
    first = adapters[0]
    for adapter in adapters[1:]:
        for field, label in (("rank", "LoRA rank"), ("targets", "target modules"), ("alpha", "lora_alpha")):
            if getattr(adapter, field) != getattr(first, field):
                raise UserError(f"{adapter.path}: {label} {_show(getattr(adapter, field))} differs from the first "
                                f"adapter's ({_show(getattr(first, field))}, {first.path}); the checkpoints of one "
                                "sequentially trained adapter share it")
    return adapters


def _show(value) -> str:
    return ", ".join(value) if isinstance(value, tuple) else str(value)


def _read_adapter(folder: Path) -> Adapter:
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise UserError(f"{folder}: no {ADAPTER_CONFIG}; a PEFT adapter folder holds it and {ADAPTER_WEIGHTS}")
    if not weights.is_file():
        found = " (only adapter_model.bin: save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise UserError(f"{folder}: no {ADAPTER_WEIGHTS}{found}; a PEFT adapter folder holds it and "
                        f"{ADAPTER_CONFIG}")
    try:
        config = store.read_json(config_path)
    except (OSError, ValueError):
        raise UserError(f"{config_path}: not readable JSON") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int):
        raise UserError(f"{config_path}: not a LoRA adapter config (expected peft_type LORA and an integer r)")
    targets = config.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    label = folder.name if _CHECKPOINT.fullmatch(folder.name) is None else f"{folder.parent.name}/{folder.name}"
    return Adapter(path=folder, name=label, rank=config["r"], alpha=float(config.get("lora_alpha", config["r"])),
                   dropout=float(config.get("lora_dropout", 0.0)), targets=targets,
                   base_model=config.get("base_model_name_or_path"),
                   digest=hashlib.sha256(weights.read_bytes()).hexdigest()[:20])


def check_fits(model, adapter: Adapter, spec: str) -> dict[str, tuple[int, ...]]:
    """Every LoRA matrix of the adapter has a layer of this model to sit on, of the right width: read from the
    weights file's header, before any evaluation. Returns the file's tensor shapes by name."""
    try:
        with safe_open(adapter.path / ADAPTER_WEIGHTS, framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{adapter.path / ADAPTER_WEIGHTS}: damaged ({exc})") from None
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        layer, which = match.groups()
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise UserError(f"{adapter.path}: has weights for layer '{layer}', which {spec} lacks (an adapter of "
                            f"another base model{_trained_on(adapter)}?)") from None
        width = getattr(module, "in_features", None) if which == "A" else getattr(module, "out_features", None)
        wanted = shape[1] if which == "A" else shape[0]
        if width is not None and width != wanted:
            side = "input" if which == "A" else "output"
            raise UserError(f"{adapter.path}: layer '{layer}' has {side} width {wanted} in the adapter but {width} in "
                            f"{spec} (an adapter of another base model{_trained_on(adapter)})")
    return shapes


def expected_adapter_tensors(model, adapter_path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors PEFT would load from an adapter with this adapter_config.json into this model, with their
    shapes: a weightless copy of the model (meta device) gets the adapter's layers, and its adapter state dict
    names them as the weights file must."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    try:
        peft_model = get_peft_model(skeleton, LoraConfig.from_pretrained(str(adapter_path)))
    except (NoMatchingPeftModuleError, ValueError) as exc:
        raise UserError(f"{adapter_path / ADAPTER_CONFIG}: its target modules do not fit this model "
                        f"({' '.join(str(exc).split())[:160]})") from None
    return {key: tuple(value.shape) for key, value in get_peft_model_state_dict(peft_model).items()}


def check_tensors(adapter_path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the weights file has its place in the adapter PEFT builds from adapter_config.json, with the
    shape the config's rank gives, and none is missing: PEFT itself only warns, and loads a mismatched adapter as
    nothing (every result would then be the base model's)."""
    weights = adapter_path / ADAPTER_WEIGHTS
    for key, shape in found.items():
        if key not in expected:
            raise UserError(f"{weights}: tensor '{key}' has no place in the adapter that {ADAPTER_CONFIG} builds on "
                            f"this model (its tensors are named like '{next(iter(expected))}'); PEFT would load "
                            "the adapter as nothing")
        if shape != expected[key]:
            raise UserError(f"{weights}: tensor '{key}' has shape {list(shape)}, but {ADAPTER_CONFIG} (r = "
                            f"{_config_rank(adapter_path)}) on this model gives {list(expected[key])}: the config "
                            "contradicts the weights")
    missing = [key for key in expected if key not in found]
    if missing:
        raise UserError(f"{weights}: lacks tensor '{missing[0]}'"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                        + f" that {ADAPTER_CONFIG}'s target modules put on this model")


def _config_rank(adapter_path: Path):
    try:
        return store.read_json(adapter_path / ADAPTER_CONFIG).get("r")
    except (OSError, ValueError, AttributeError):
        return "?"


def _trained_on(adapter: Adapter) -> str:
    return f": it was trained on {adapter.base_model}" if adapter.base_model else ""


def adapter_records(adapters: list[Adapter], trained_on: list[str] | None) -> list[dict]:
    """What inputs.json records of the adapters: a resume over other adapters, or other weights, is refused."""
    tasks = trained_on or [None] * len(adapters)
    return [{"path": str(a.path.resolve()), "digest": a.digest, "trained_on": t} for a, t in zip(adapters, tasks)]


def evaluation_config(config: ExperimentConfig, adapters: list[Adapter], trained_on: list[str] | None,
                      seed: int | None) -> ExperimentConfig:
    """The run's config: the tasks in training order when known, one seed (a label: nothing is drawn), and the
    adapters' own LoRA settings, so that config.json describes what was evaluated."""
    names = [t.name for t in config.tasks]
    if trained_on is not None:
        unknown = [t for t in trained_on if t not in names]
        if unknown:
            raise UserError(f"--trained-on: no task named {', '.join(map(repr, unknown))} in the config (its tasks: "
                            f"{', '.join(names)})")
        if len(trained_on) != len(adapters):
            raise UserError(f"--trained-on names {len(trained_on)} task(s) for {len(adapters)} adapter(s); give one "
                            "task per adapter, in the same order")
        if sorted(trained_on) != sorted(names):
            raise UserError(f"--trained-on must name every task of the config once ({', '.join(names)}), got "
                            f"{', '.join(trained_on)}; leave it out when the training order is unknown")
    data = config.model_dump(mode="json")
    first = adapters[0]
    data.update(seeds=[config.seeds[0] if seed is None else seed], monitor=None,
                order=list(trained_on) if trained_on is not None else "original",
                lora={**data["lora"], "r": first.rank, "alpha": first.alpha, "dropout": first.dropout,
                      "target_modules": list(first.targets)})
    return build_config(data, source="lorawatch evaluate")


class AdapterRecipe(Recipe):
    """The protocol's recipe with the training replaced by loading the k-th adapter."""

    def __init__(self, *args, adapters: list[Adapter], trained_on: list[str] | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapters, self.trained_on = adapters, trained_on

    def check_model(self) -> None:
        expected = None  # the adapters share rank and targets (find_adapters): one skeleton serves them all
        for adapter in self.adapters:
            found = check_fits(self.loaded.model, adapter, self.config.model.spec)
            expected = expected or expected_adapter_tensors(self.loaded.model, adapter.path)
            check_tensors(adapter.path, found, expected)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "adapters": adapter_records(self.adapters, self.trained_on)}

    def run_seed(self, seed: int, *, fresh_model: bool) -> None:
        """Every adapter whose stage is not complete: each is evaluated on its own, so a finished one is kept."""
        todo = []
        for stage in range(1, len(self.adapters) + 1):
            if stage_complete(self.folder.stage(seed, stage), self.data, adapter=False):
                self.progress.advance(self.checkpoint_rows())
            else:
                todo.append(stage)
        if todo:  # one PEFT model, made with the first adapter to evaluate; `train` puts each one's weights in it
            model = PeftModel.from_pretrained(self.loaded.model, self.adapters[todo[0] - 1].path)
            self.run_stages(model, seed, todo)

    def train(self, model, seed: int, stage: int) -> None:
        """The k-th adapter's weights in place of training; stage.json then records no training."""
        adapter = self.adapters[stage - 1]
        if not load_adapter_weights(model, adapter.path):
            raise UserError(f"{adapter.path}: its weights could not be loaded into the first adapter's layers")

    def checkpoint_of(self, stage: int) -> tuple[str, str | None]:
        task = None if self.trained_on is None else self.trained_on[stage - 1]
        return task or self.adapters[stage - 1].name, task

    def stage_extra(self, stage: int) -> dict:
        return {"adapter": str(self.adapters[stage - 1].path)}

    def stage_heading(self, seed: int, stage: int, log: schema.TrainingLog | None) -> str:
        return f"stage {stage} ({self.adapters[stage - 1].path}): "

    def stage_label(self, seed: int, stage: int) -> str:
        return f"adapter {stage}/{len(self.adapters)}"

    def seed_rows(self) -> int:
        return len(self.adapters) * self.checkpoint_rows()


def evaluate_adapters(config: ExperimentConfig, adapter_paths: Sequence[Path], run_dir: str | Path, *,
                      trained_on: list[str] | None = None, seed: int | None = None, console: Console | None = None,
                      overwrite: bool = False, force: bool = False) -> Path:
    """Evaluate the base model and each adapter into `run_dir` (resumed like `run` when it holds this job)."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    adapters = find_adapters(adapter_paths)
    config = evaluation_config(config, adapters, trained_on, seed)
    if config.deploy is not None:
        check_deploy_tools()
    data = load_data(config)
    plan = plan_run_dir(run_dir, config, {**data_inputs(data), "adapters": adapter_records(adapters, trained_on)},
                        overwrite=overwrite, force=force)
    started = time.perf_counter()
    recipe = AdapterRecipe(config, run_dir, data, console, plan.mode == "resume", None, adapters=adapters,
                           trained_on=trained_on)

    def explain() -> None:
        names = {Path(a.base_model).name.lower() for a in adapters if a.base_model}
        ours = {Path(config.model.spec).name.lower(), Path(recipe.loaded.info.path or "").name.lower()}
        if names and not names & ours:
            console.print(f"lorawatch: note: the adapters were trained on {', '.join(sorted(names))}; evaluating "
                          f"them on {config.model.spec} (their layers fit it)")
        if trained_on is None:
            console.print("lorawatch: which task each adapter was trained on is not known (--trained-on): OP, "
                          "BWT, FWT, gain and learning accuracy need it and are left undefined")

    run_recipe(recipe, plan, after_start=explain)
    console.print(f"lorawatch: evaluated {len(adapters)} adapter(s) in {time.perf_counter() - started:.1f}s")
    deploy_finished_run(recipe, config, console)
    return run_dir
