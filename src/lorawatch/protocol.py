"""The protocol, stage by stage: base evaluation, then for each task train -> save -> evaluate all.

    load data -> load model -> stage 0: evaluate base on every task + reference pass
    for each seed: fresh LoRA adapter; for task k in order: train on k, save adapter,
                   evaluate on every task, reference generation and drift vs base  -> stage k
    -> tables (accuracy matrix, CL metrics, stability) per seed and mean/std over seeds

The base stage does not depend on the seed (greedy decoding, no adapter), so it is computed once and
written into every seed's folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from rich.console import Console
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as save_safetensors

from lorawatch import store, tables
from lorawatch.config import ExperimentConfig, build_config
from lorawatch.costs import Costs
from lorawatch.errors import ConfigError, UserError
from lorawatch.evaluation import (GENERATION_RULES_VERSION, FastPath, Generated, Prediction, accuracy, decode_text,
                                  fast_path_for, generate, merged_adapter, score)
from lorawatch.models import LoadedModel, default_cache_dir, load_model
from lorawatch.monitor import MonitorParams, StageMonitor, calibrated_threshold
from lorawatch.progress import RunProgress
from lorawatch.prompts import EncodedPrompt, EncodedTrainExample, encode_prompt, encode_train_example, user_message
from lorawatch.stability import ExampleDrift, answer_logprobs, per_example_drift, summarize
from lorawatch.tasks.base import Example, Task
from lorawatch.tasks.loading import load_reference, load_task
from lorawatch.tasks.scoring import SCORING_RULES_VERSION, training_target
from lorawatch.training import TrainParams, train_stage, use_gap_dropout


@dataclass(frozen=True)
class RunData:
    tasks: list[Task]  # in training order
    reference: tuple[Example, ...]


def load_data(config: ExperimentConfig) -> RunData:
    tasks = [load_task(t.name, t.kind, t.instruction, builtin=t.builtin, train=t.train, test=t.test,
                       max_train_rows=t.max_train_rows, max_test_rows=t.max_test_rows)
             for t in config.ordered_tasks()]
    builtin_names = {t.builtin: t.name for t in config.tasks if t.builtin is not None}
    if config.reference.builtin_per_task is not None and not builtin_names:
        raise UserError("reference.builtin_per_task needs built-in tasks; give reference.path for file-based tasks")
    reference = load_reference(tasks, path=config.reference.path, builtin_per_task=config.reference.builtin_per_task,
                               builtin_names=builtin_names, max_rows=config.reference.max_rows)
    return RunData(tasks, reference)


@dataclass(frozen=True)
class Encoded:
    test: dict[str, list[EncodedPrompt]]
    train: dict[str, list[EncodedTrainExample]]
    reference: list[EncodedPrompt]


def encode(data: RunData, tokenizer, max_length: int) -> Encoded:
    instruction = {t.name: t.instruction for t in data.tasks}
    return Encoded(
        test={t.name: [encode_prompt(tokenizer, e.id, user_message(t.instruction, e.prompt), max_length)
                       for e in t.test] for t in data.tasks},
        train={t.name: [encode_train_example(tokenizer, user_message(t.instruction, e.prompt),
                                             training_target(t.kind, e.answer), max_length)
                        for e in t.train] for t in data.tasks},
        reference=[encode_prompt(tokenizer, e.id, user_message(instruction[e.task], e.prompt), max_length)
                   for e in data.reference],
    )


def environment(loaded: LoadedModel) -> dict:
    versions = {}
    for package in ("lorawatch", "torch", "transformers", "peft", "numpy", "pandas"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": loaded.info.device,
        "dtype": loaded.info.dtype,
        "model": loaded.info.to_dict(),
    }


def crash_point(name: str) -> None:
    """Fault injection for the resume tests: SIGKILL this process when LORAWATCH_CRASH_AT names this point."""
    if os.environ.get("LORAWATCH_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _read_unit(path: Path, expected_ids: list[str], row_type: type) -> list | None:
    """A unit's saved rows (predictions or drift), or None when missing or damaged: then it is redone."""
    if not path.is_file():
        return None
    try:
        rows = [row_type(**row) for row in store.read_jsonl(path)]
    except (ValueError, TypeError, KeyError):
        warnings.warn(f"{path}: damaged, recomputing it", stacklevel=2)
        return None
    if [r.id for r in rows] != expected_ids:
        warnings.warn(f"{path}: does not match the data, recomputing it", stacklevel=2)
        return None
    return rows


@dataclass(frozen=True)
class EvalParams:
    max_new_tokens: int
    token_budget: int
    device: str
    reference_position: str  # "answer" | "published"
    fast: FastPath  # the evaluation shortcuts in use, already resolved for the model and dtype


def evaluate_checkpoint(model, tokenizer, data: RunData, encoded: Encoded, folder: Path, params: EvalParams, *,
                        base_logprobs: torch.Tensor | None, drafts: dict[str, list[int]] | None, costs: Costs,
                        progress: RunProgress, label: str, crash_prefix: str) -> tuple[dict, list[ExampleDrift],
                                                                                       torch.Tensor | None]:
    """Every task's test set, the reference set's accuracy and its drift against the base distribution.

    Each part is a unit written as soon as it is done and reused when the run is resumed. Returns the
    scores, the per-row drift, and the reference log-probabilities when they had to be computed.
    """
    scores: dict[str, float] = {}
    kinds = {t.name: t.kind for t in data.tasks}
    drift_path = folder / "reference_drift.jsonl"
    drift = _read_unit(drift_path, [e.id for e in data.reference], ExampleDrift)
    logprobs = None
    parts = [(t.name, t.test, encoded.test[t.name]) for t in data.tasks]
    parts.append(("reference", data.reference, encoded.reference))
    for name, examples, prompts in parts:
        path = folder / "predictions" / f"{name}.jsonl"
        rows = _read_unit(path, [e.id for e in examples], Prediction)
        if rows is None:
            is_reference = name == "reference"
            # The answer-position distribution falls out of the generation's first forward pass.
            first = is_reference and drift is None and params.reference_position == "answer" and \
                params.fast.reference_from_generation
            phase = "reference_generation" if is_reference else "task_eval"
            progress.phase(f"{label} · {'reference set' if is_reference else 'evaluate ' + name}")
            with costs.phase(phase):
                generated = generate_by_task(model, tokenizer, examples, prompts,
                                             max_new_tokens=params.max_new_tokens, device=params.device,
                                             token_budget=params.token_budget,
                                             drafts=drafts, first_logprobs=first, fast=params.fast,
                                             counters=costs.generation[phase], on_rows=progress.advance)
            rows = [score(e.id, e.task or name, kinds[e.task or name], e.answer,
                          decode_text(tokenizer, generated[e.id].output_ids), generated[e.id].output_ids)
                    for e in examples]
            if first:
                # The drift goes to disk before the predictions: a crash in between then leaves nothing that
                # would have to be recomputed by a different path (and so with different round-off).
                logprobs = torch.stack([generated[e.id].first_logprobs for e in data.reference])
                drift = _drift(data, logprobs, base_logprobs)
                store.write_jsonl(drift_path, (d.to_dict() for d in drift))
            store.write_jsonl(path, (r.to_dict() for r in rows))
            crash_point(f"{crash_prefix}:eval:{name}")
        else:
            progress.advance(len(rows))
        scores[name] = accuracy(rows)

    if drift is None:
        with costs.phase("reference_distribution"):
            if logprobs is None:
                progress.phase(f"{label} · reference drift")
                logprobs = answer_logprobs(model, encoded.reference, pad_id=tokenizer.pad_token_id,
                                           token_budget=params.token_budget, device=params.device,
                                           position=params.reference_position)[1]
            drift = _drift(data, logprobs, base_logprobs)
            store.write_jsonl(drift_path, (d.to_dict() for d in drift))
        crash_point(f"{crash_prefix}:drift")
    progress.advance(len(data.reference))
    return scores, drift, logprobs


def generate_by_task(model, tokenizer, examples: Sequence[Example], prompts: Sequence[EncodedPrompt],
                     **options) -> dict[str, Generated]:
    """`generate`, one call per task: a task's rows share their prompts' long prefix (see evaluation.py)."""
    groups: dict[str | None, list[EncodedPrompt]] = {}
    for example, prompt in zip(examples, prompts):
        groups.setdefault(example.task, []).append(prompt)
    generated: dict[str, Generated] = {}
    for group in groups.values():
        generated.update(generate(model, tokenizer, group, **options))
    return generated


def _drift(data: RunData, logprobs: torch.Tensor, base_logprobs: torch.Tensor | None) -> list[ExampleDrift]:
    return per_example_drift([e.id for e in data.reference], [e.task for e in data.reference], logprobs,
                             logprobs if base_logprobs is None else base_logprobs)


def read_drafts(folder: Path) -> dict[str, list[int]]:
    """A finished checkpoint's generated tokens by example id: the next checkpoint's drafts."""
    drafts: dict[str, list[int]] = {}
    for path in sorted((folder / "predictions").glob("*.jsonl")):
        try:
            rows = store.read_jsonl(path)
        except (OSError, ValueError):
            continue  # a draft is only a speed-up; a damaged file just means no drafts
        drafts.update({r["id"]: r["output_ids"] for r in rows if isinstance(r, dict) and r.get("output_ids")})
    return drafts


def base_stage_key(loaded: LoadedModel, data: RunData, encoded: Encoded, params: EvalParams) -> str:
    """What the base checkpoint's evaluation depends on, to the byte: the model, the exact token ids of every
    prompt, the answers, the generation settings (the token budget too: batching changes float round-off) and
    the software. Task order and seeds do not enter."""
    versions = {p: importlib.metadata.version(p) for p in ("lorawatch", "torch", "transformers")}
    info = loaded.info
    tasks = sorted((t.name, t.kind, [(e.id, e.answer) for e in t.test],
                    [list(p.input_ids) for p in encoded.test[t.name]]) for t in data.tasks)
    reference = [(e.id, e.task, e.answer, list(p.input_ids)) for e, p in zip(data.reference, encoded.reference)]
    versions["scoring_rules"] = SCORING_RULES_VERSION
    versions["generation_rules"] = GENERATION_RULES_VERSION
    payload = json.dumps({"model": [info.spec, info.path, info.dtype, info.device, info.num_parameters],
                          "versions": versions, "tasks": tasks, "reference": reference,
                          "max_new_tokens": params.max_new_tokens, "token_budget": params.token_budget,
                          "position": params.reference_position, "fast_path": params.fast.to_dict()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def base_stage_cache(key: str) -> Path:
    """$LORAWATCH_BASE_STAGE_CACHE/<key> if set, else beside the model cache:
    $LORAWATCH_CACHE/base-stages/<key> or ~/.cache/lorawatch/base-stages/<key>."""
    root = os.environ.get("LORAWATCH_BASE_STAGE_CACHE")
    return (Path(root).expanduser() if root else default_cache_dir().parent / "base-stages") / key


BASE_UNITS = ("predictions", "reference_drift.jsonl")  # what the cache holds, beside the base log-probs


def _restore_base_stage(cache: Path, base_dir: Path, base_lp_path: Path) -> bool:
    """Put a cached base evaluation's units into this run; the usual resume path then reads them back."""
    if not (cache / "complete").is_file():
        return False
    try:
        base_dir.mkdir(parents=True, exist_ok=True)
        for unit in BASE_UNITS:
            source, target = cache / unit, base_dir / unit
            if source.is_dir():
                store.atomic_copytree(source, target)
            else:
                store.atomic_write_bytes(target, source.read_bytes())
        store.atomic_write_bytes(base_lp_path, (cache / BASE_LOGPROBS).read_bytes())
    except OSError:
        warnings.warn(f"{cache}: cached base stage unreadable, computing it", stacklevel=2)
        return False
    return True


def _save_base_stage(cache: Path, base_dir: Path, base_lp_path: Path) -> None:
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for unit in BASE_UNITS:
            source = base_dir / unit
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp / unit)
        shutil.copy2(base_lp_path, tmp / BASE_LOGPROBS)
        (tmp / "complete").write_text("")
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    except OSError as exc:  # a cache is optional: a full or read-only disk must not fail the run
        warnings.warn(f"{cache}: could not cache the base stage ({exc.strerror or exc})", stacklevel=2)


def finish_stage(folder: Path, *, stage: int, checkpoint: str, task: str | None, scores: dict, drift: list,
                 base_stats: dict | None, extra: dict) -> dict:
    """Write the stage's summary files; stage.json goes last and marks the stage complete."""
    stats = summarize(drift)
    base_stats = base_stats or stats
    deltas = {f"{key}_delta": value - base_stats[key] for key, value in stats.items()}
    store.write_json(folder / "reference_stats.json", {**stats, **deltas})
    store.write_json(folder / "scores.json", scores)
    store.write_json(folder / "stage.json", {"stage": stage, "checkpoint": checkpoint, "task": task, **extra})
    return stats


def stage_complete(folder: Path, data: RunData, *, adapter: bool) -> bool:
    """A stage is complete when every file it wrote is intact; damaged ones are reported and redone."""
    try:
        if not all(isinstance(store.read_json(folder / name), dict)
                   for name in ("stage.json", "scores.json", "reference_stats.json")):
            return False
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        warnings.warn(f"{folder}: damaged summary file, redoing that stage's missing parts", stacklevel=2)
        return False
    parts = [(t.name, [e.id for e in t.test]) for t in data.tasks] + [("reference", [e.id for e in data.reference])]
    if any(_read_unit(folder / "predictions" / f"{name}.jsonl", ids, Prediction) is None for name, ids in parts):
        return False
    if _read_unit(folder / "reference_drift.jsonl", [e.id for e in data.reference], ExampleDrift) is None:
        return False
    return not adapter or _adapter_intact(folder / "adapter")


def _adapter_intact(folder: Path) -> bool:
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return False
    try:
        load_safetensors(folder / ADAPTER_WEIGHTS)
        return _readable_json(folder / "adapter_config.json")
    except Exception:  # safetensors raises its own error types for damaged files
        warnings.warn(f"{folder}: damaged adapter, redoing that stage", stacklevel=2)
        return False


def lora_config(config: ExperimentConfig) -> LoraConfig:
    return LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, bias=config.lora.bias, task_type="CAUSAL_LM")


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model, folder: Path) -> None:
    # Written beside the final name, then renamed: a crash never leaves a half-written adapter in place.
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_adapter_weights(model, folder: Path) -> bool:
    """Put a saved adapter's weights into the model's adapter; False (with a warning) if it is damaged."""
    try:
        state = load_safetensors(folder / ADAPTER_WEIGHTS)
        result = set_peft_model_state_dict(model, state)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        if (folder / ADAPTER_WEIGHTS).exists():
            warnings.warn(f"{folder}: damaged adapter ({exc.__class__.__name__}), redoing that stage", stacklevel=2)
        return False
    if getattr(result, "unexpected_keys", None):
        warnings.warn(f"{folder}: adapter does not fit this model, redoing that stage", stacklevel=2)
        return False
    return True


def _checkpoint_rows(data: RunData) -> int:
    """Progress rows of one checkpoint's evaluation: every test row, and the reference set twice."""
    return sum(len(t.test) for t in data.tasks) + 2 * len(data.reference)


def _seed_rows(config: ExperimentConfig, data: RunData) -> int:
    """Progress rows of one seed after the base stage: all training passes and every checkpoint's evaluation."""
    trains = sum(len(t.train) for t in data.tasks) * config.train.epochs
    return trains + len(data.tasks) * _checkpoint_rows(data)


def _total_rows(config: ExperimentConfig, data: RunData) -> int:
    return _checkpoint_rows(data) + len(config.seeds) * _seed_rows(config, data)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    fields = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            fields += config_differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b:
            fields += config_differences(dict(enumerate(a)), dict(enumerate(b)), f"{prefix}{key}.")
        elif a != b:
            fields.append(f"{prefix}{key}")
    return fields


def prepare_run_dir(run_dir: Path, config: ExperimentConfig, *, overwrite: bool, force: bool) -> bool:
    """Create the run folder, or check that an existing one belongs to this config. True when resuming."""
    config_path = run_dir / "config.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        if not config_path.is_file():
            raise UserError(f"{run_dir}: folder is not empty and is not a lorawatch run; choose another --out")
        try:
            recorded = store.read_json(config_path)
        except (OSError, ValueError):
            raise UserError(f"{config_path}: damaged; pass --overwrite to start this run again") from None
        try:  # read through today's schema, so that a field added since (with its default) is no difference
            recorded = build_config(recorded, source=str(config_path)).model_dump(mode="json")
        except ConfigError:
            pass  # an older or hand-edited config: compare what is there
        changed = config_differences(recorded, config.model_dump(mode="json"))
        if changed and not force:
            raise UserError(f"{run_dir}: the run was started with a different config (changed: {', '.join(changed)}); "
                            "use another --out for a new run, --overwrite to start again, or --force to continue")
        return True
    try:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
    return False


@contextmanager
def run_lock(run_dir: Path):
    """One writer per run folder. The OS drops the lock when its holder dies, so a crash never leaves it stuck."""
    handle = open(run_dir / ".lock", "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{run_dir}: already being written by {holder}; wait for it to finish or use another --out")
        handle.seek(0)
        handle.truncate()
        handle.write(f"lorawatch pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()


BASE_LOGPROBS = "base_reference_logprobs.safetensors"


def run_experiment(config: ExperimentConfig, run_dir: str | Path, *, console: Console | None = None,
                   overwrite: bool = False, force: bool = False) -> Path:
    """Run (or resume) the whole protocol into `run_dir` and return it.

    Data problems surface before any model work. A run folder that already holds this config is resumed:
    finished units (a stage's training, a task's evaluation, a reference pass) are read back, the rest is
    computed, and the results are identical to an uninterrupted run.
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    data = load_data(config)
    monitor = resolve_monitor(config)
    resuming = prepare_run_dir(run_dir, config, overwrite=overwrite, force=force)
    with run_lock(run_dir):
        if not resuming:
            store.write_json(run_dir / "config.json", config.model_dump(mode="json"))
        if monitor is not None:
            store.write_json(run_dir / "monitor.json", monitor)
        _run_locked(config, run_dir, data, console, resuming,
                    None if monitor is None else MonitorParams(**monitor["params"]))
    return run_dir


def resolve_monitor(config: ExperimentConfig) -> dict | None:
    """The monitor's settings with any calibrated threshold worked out (before any model work)."""
    if config.monitor is None:
        return None
    settings = config.monitor
    threshold, calibration = settings.threshold, None
    if settings.calibrate_from is not None:
        value, how = calibrated_threshold(settings.calibrate_from)
        calibration = {"threshold": value, "from": how}
        threshold = max(threshold or 0.0, value)
    return {"params": {"every": settings.every, "action": settings.action, "threshold": threshold,
                       "relative": settings.relative, "patience": settings.patience}, "calibration": calibration}


def _run_locked(config: ExperimentConfig, run_dir: Path, data: RunData, console: Console, resuming: bool,
                monitor: MonitorParams | None) -> None:
    costs = Costs()
    costs.notes["resumed"] = resuming

    def fresh_model() -> LoadedModel:
        with costs.phase("model_load"):
            return load_model(config.model.spec, device=config.model.device, dtype=config.model.dtype,
                              cache_dir=Path(config.model.cache_dir) if config.model.cache_dir else None,
                              trust_remote_code=config.model.trust_remote_code)

    loaded = fresh_model()
    store.write_json(run_dir / "environment.json", environment(loaded))
    device = loaded.info.device
    console.print(f"lorawatch: {config.name} · model {loaded.info.spec} ({loaded.info.num_parameters / 1e6:.0f}M "
                  f"params, {device}, {loaded.info.dtype}) · tasks {' → '.join(t.name for t in data.tasks)} · "
                  f"seeds {', '.join(map(str, config.seeds))} · run folder {run_dir}"
                  + (" · resuming" if resuming else ""))
    encoded = encode(data, loaded.tokenizer, config.train.max_length)
    params = TrainParams(learning_rate=config.train.learning_rate, batch_size=config.train.batch_size,
                         grad_accum=config.train.grad_accum, epochs=config.train.epochs,
                         max_grad_norm=config.train.max_grad_norm, weight_decay=config.train.weight_decay,
                         lr_scheduler=config.train.lr_scheduler, loss_weighting=config.train.loss_weighting)
    requested = FastPath(**{part: getattr(config.eval, part) for part in FastPath.__dataclass_fields__})
    fast, switched_off = fast_path_for(loaded.model, loaded.model.dtype, requested)
    for part, why in switched_off.items():
        console.print(f"lorawatch: fast path: {part} off for this model ({why})")
    costs.notes["fast_path"] = {"used": fast.to_dict(), "switched_off": switched_off}
    eval_params = EvalParams(max_new_tokens=config.eval.max_new_tokens, token_budget=config.eval.token_budget,
                             device=device, reference_position=config.reference.position, fast=fast)

    with RunProgress(_total_rows(config, data), console) as progress:
        # Stage 0 does not depend on the seed or the task order: computed once per model, data and settings
        # (cached across runs), written into the first seed's folder, then copied.
        base_dir = store.stage_dir(run_dir, config.seeds[0], 0)
        base_lp_path = run_dir / BASE_LOGPROBS
        key = base_stage_key(loaded, data, encoded, eval_params)
        cache = base_stage_cache(key) if config.eval.reuse_base_stage else None
        base_logprobs = _read_logprobs(base_lp_path, len(data.reference))
        if base_logprobs is None or not stage_complete(base_dir, data, adapter=False):
            reused = cache is not None and _restore_base_stage(cache, base_dir, base_lp_path)
            if reused:
                base_logprobs = _read_logprobs(base_lp_path, len(data.reference))
                progress.log(f"base: reusing the base evaluation cached under {cache}")
            started = time.perf_counter()
            if base_logprobs is None:
                (base_dir / "reference_drift.jsonl").unlink(missing_ok=True)
            scores, drift, computed = evaluate_checkpoint(
                loaded.model, loaded.tokenizer, data, encoded, base_dir, eval_params, base_logprobs=None,
                drafts=None, costs=costs, progress=progress, label="base", crash_prefix="base")
            if computed is not None:
                store.atomic_write_bytes(base_lp_path, save_safetensors({"logprobs": computed.contiguous()}))
                base_logprobs = computed
            finish_stage(base_dir, stage=0, checkpoint="base", task=None, scores=scores, drift=drift,
                         base_stats=None, extra={"eval_seconds": round(time.perf_counter() - started, 3),
                                                 "base_stage_key": key, "reused_from_cache": reused,
                                                 "fast_path": fast.to_dict()})
            if cache is not None and not reused:
                _save_base_stage(cache, base_dir, base_lp_path)
            progress.log("base: " + _scores_line(scores))
        else:
            progress.advance(_checkpoint_rows(data))
        costs.notes["base_stage_key"] = key
        base_stats = {k: v for k, v in store.read_json(base_dir / "reference_stats.json").items()
                      if not k.endswith("_delta")}
        for seed in config.seeds[1:]:
            copy_dir = store.stage_dir(run_dir, seed, 0)
            if not stage_complete(copy_dir, data, adapter=False):
                store.atomic_copytree(base_dir, copy_dir)

        for seed_index, seed in enumerate(config.seeds):
            stages = [store.stage_dir(run_dir, seed, k) for k in range(len(data.tasks) + 1)]
            first = next((k for k in range(1, len(stages)) if not stage_complete(stages[k], data, adapter=True)), None)
            if first is not None:
                if seed_index > 0:
                    loaded = fresh_model()
                torch.manual_seed(seed)  # LoRA's A matrices are initialised randomly
                model = get_peft_model(loaded.model, lora_config(config))
                use_gap_dropout(model)
                # resume from the last stage whose adapter is intact (redo it too if it is damaged)
                while first > 1 and not load_adapter_weights(model, stages[first - 1] / "adapter"):
                    first -= 1
                for stage in range(first, len(stages)):
                    _run_stage(model, loaded, data, encoded, params, eval_params, run_dir, seed, stage,
                               base_logprobs, base_stats, progress, costs, monitor=monitor)
                del model
            else:
                progress.advance(_seed_rows(config, data))
            with costs.phase("tables"):
                tables.write_seed_tables(run_dir, seed)
        with costs.phase("tables"):
            tables.write_summary(run_dir)
    store.write_json(run_dir / "costs.json", costs.to_dict())


def _run_stage(model, loaded: LoadedModel, data: RunData, encoded: Encoded, params: TrainParams,
               eval_params: EvalParams, run_dir: Path, seed: int, stage: int, base_logprobs: torch.Tensor,
               base_stats: dict, progress: RunProgress, costs: Costs, *, monitor: MonitorParams | None) -> None:
    task = data.tasks[stage - 1]
    folder = store.stage_dir(run_dir, seed, stage)
    label = f"seed {seed} · stage {stage}/{len(data.tasks)}"
    prefix = f"{seed}:{stage}"
    log_path = folder / "training.json"
    trained = log_path.is_file() and _readable_json(log_path) and load_adapter_weights(model, folder / "adapter")
    if trained:
        log = store.read_json(log_path)
        progress.advance(len(task.train) * params.epochs)
    else:
        # Whatever this stage evaluated before belonged to a different adapter.
        shutil.rmtree(folder, ignore_errors=True)
        progress.phase(f"{label} · train {task.name}")
        advance = _advance_by_delta(progress)

        def on_micro_batch(done: int, total: int) -> None:
            advance(done, total)
            crash_point(f"{prefix}:train:{done}")

        watch = None
        if monitor is not None:
            watch = _stage_monitor(model, loaded, data, encoded, eval_params, run_dir, seed, stage, monitor,
                                   base_logprobs, progress, label)
        with costs.phase("training"):
            log = train_stage(model, encoded.train[task.name], params, seed=seed * 1000 + stage,
                              pad_id=loaded.tokenizer.pad_token_id, device=eval_params.device,
                              on_micro_batch=on_micro_batch, on_step=None if watch is None else watch.on_step
                              ).to_dict()
            if watch is not None:
                intervention = watch.finish(log["optimizer_steps"])
                log["monitor"] = {"threshold": watch.threshold, "action": monitor.action, "every": monitor.every,
                                  "patience": monitor.patience,
                                  "measurements": len(watch.series), "seconds": round(watch.seconds, 3),
                                  "intervention": None if intervention is None else intervention.to_dict()}
                costs.seconds["monitor"] += watch.seconds
                store.write_jsonl(folder / "monitor.jsonl", watch.series)
                if intervention is not None:
                    progress.log(f"[bold]monitor[/bold]: seed {seed} stage {stage} ({task.name}): KL to base "
                                 f"{intervention.kl:.4f} > {intervention.threshold:.4f} at step {intervention.step} → "
                                 f"{intervention.action}" + ("" if intervention.action == "warn" else
                                                             f", keeping step {intervention.kept_step}"))
            save_adapter(model, folder / "adapter")
            store.write_json(log_path, log)
        crash_point(f"{prefix}:trained")
    eval_start = time.perf_counter()
    with merged_adapter(model) if eval_params.fast.merge_adapter else nullcontext():
        scores, drift, _ = evaluate_checkpoint(model, loaded.tokenizer, data, encoded, folder, eval_params,
                                               base_logprobs=base_logprobs,
                                               drafts=read_drafts(store.stage_dir(run_dir, seed, stage - 1)),
                                               costs=costs, progress=progress, label=label, crash_prefix=prefix)
    stats = finish_stage(folder, stage=stage, checkpoint=task.name, task=task.name, scores=scores, drift=drift,
                         base_stats=base_stats, extra={"training": log,
                                                       "intervention": (log.get("monitor") or {}).get("intervention"),
                                                       "fast_path": eval_params.fast.to_dict(),
                                                       "eval_seconds": round(time.perf_counter() - eval_start, 3)})
    crash_point(f"{prefix}:done")
    losses = log["step_losses"]
    progress.log(f"seed {seed} stage {stage} ({task.name}): {log['optimizer_steps']} steps, loss "
                 f"{_fmt(losses[0] if losses else None)} → {_fmt(losses[-1] if losses else None)} · "
                 f"{_scores_line(scores)} · KL to base {stats['kl_mean']:.4f}")


def _stage_monitor(model, loaded: LoadedModel, data: RunData, encoded: Encoded, eval_params: EvalParams,
                   run_dir: Path, seed: int, stage: int, monitor: MonitorParams, base_logprobs: torch.Tensor,
                   progress: RunProgress, label: str) -> StageMonitor:
    task = data.tasks[stage - 1]
    previous = store.stage_dir(run_dir, seed, stage - 1) / "reference_stats.json"
    previous_kl = float(store.read_json(previous).get("kl_mean", 0.0)) if stage > 1 else 0.0
    threshold = monitor.stage_threshold(previous_kl)

    def measure() -> dict:
        # The answer-position logits only, against the base distributions computed once for the run.
        was_training = model.training
        first = generate_by_task(model, loaded.tokenizer, data.reference, encoded.reference, max_new_tokens=1,
                                 device=eval_params.device, token_budget=eval_params.token_budget,
                                 first_logprobs=True, fast=eval_params.fast)
        model.train(was_training)
        logprobs = torch.stack([first[e.id].first_logprobs for e in data.reference])
        return summarize(_drift(data, logprobs, base_logprobs))

    def show(point: dict) -> None:
        limit = "" if threshold is None else f" (threshold {threshold:.4f})"
        progress.phase(f"{label} · train {task.name} · step {point['step']} KL {point['kl_mean']:.4f}{limit}")

    return StageMonitor(model=model, measure=measure, params=monitor, stage=stage, task=task.name,
                        threshold=threshold, start_kl=previous_kl, on_point=show)


def _readable_json(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        store.read_json(path)
        return True
    except (OSError, ValueError):
        warnings.warn(f"{path}: damaged, redoing that unit", stacklevel=2)
        return False


def _read_logprobs(path: Path, rows: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        tensor = load_safetensors(path)["logprobs"]
    except Exception:  # a damaged file: recompute
        warnings.warn(f"{path}: damaged, recomputing the base reference pass", stacklevel=2)
        return None
    return tensor if tensor.shape[0] == rows else None


def _advance_by_delta(progress: RunProgress):
    last = [0]

    def callback(done: int, total: int) -> None:
        progress.advance(done - last[0])
        last[0] = done

    return callback


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _scores_line(scores: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.2f}" for name, value in scores.items())
