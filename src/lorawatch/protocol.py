"""The protocol, stage by stage: base evaluation, then for each task train -> save -> evaluate all.

    load data -> load model -> stage 0: evaluate base on every task + reference pass
    for each seed: fresh LoRA adapter; for task k in order: train on k, save adapter,
                   evaluate on every task, reference generation and drift vs base  -> stage k
    -> tables (accuracy matrix, CL metrics, stability) per seed and mean/std over seeds

The base stage does not depend on the seed (greedy decoding, no adapter), so it is computed once and
written into every seed's folder.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console

from lorawatch import store, tables
from lorawatch.config import ExperimentConfig, save_config
from lorawatch.errors import UserError
from lorawatch.evaluation import Prediction, accuracy, generate, score
from lorawatch.models import LoadedModel, load_model
from lorawatch.progress import RunProgress
from lorawatch.prompts import EncodedPrompt, EncodedTrainExample, encode_prompt, encode_train_example, user_message
from lorawatch.stability import answer_logprobs, per_example_drift, summarize
from lorawatch.tasks.base import Example, Task
from lorawatch.tasks.loading import load_reference, load_task
from lorawatch.tasks.scoring import training_target
from lorawatch.training import TrainParams, train_stage


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


@dataclass
class StageOutcome:
    scores: dict[str, float]
    predictions: dict[str, list[Prediction]]
    logprobs: torch.Tensor


def evaluate_checkpoint(model, tokenizer, data: RunData, encoded: Encoded, *, base_logprobs: torch.Tensor | None,
                        max_new_tokens: int, batch_size: int, device: str, progress: RunProgress,
                        label: str) -> tuple[StageOutcome, list, dict]:
    """Every task's test set, the reference set's accuracy, and its drift against the base distribution."""
    predictions: dict[str, list[Prediction]] = {}
    scores: dict[str, float] = {}
    for task in data.tasks:
        progress.phase(f"{label} · evaluate {task.name}")
        raw = generate(model, tokenizer, encoded.test[task.name], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, device=device, on_batch=progress.advance)
        predictions[task.name] = [score(e.id, task.name, task.kind, e.answer, raw[e.id]) for e in task.test]
        scores[task.name] = accuracy(predictions[task.name])

    progress.phase(f"{label} · reference set")
    kinds = {t.name: t.kind for t in data.tasks}
    raw = generate(model, tokenizer, encoded.reference, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   device=device, on_batch=progress.advance)
    predictions["reference"] = [score(e.id, e.task, kinds[e.task], e.answer, raw[e.id]) for e in data.reference]
    scores["reference"] = accuracy(predictions["reference"])
    ids, logprobs = answer_logprobs(model, encoded.reference, pad_id=tokenizer.pad_token_id, batch_size=batch_size,
                                    device=device)
    progress.advance(len(data.reference))
    drift = per_example_drift(ids, [e.task for e in data.reference], logprobs,
                              logprobs if base_logprobs is None else base_logprobs)
    return StageOutcome(scores, predictions, logprobs), drift, summarize(drift)


def write_stage(run_dir: Path, seed: int, stage: int, *, checkpoint: str, task: str | None, outcome: StageOutcome,
                drift: list, stats: dict, base_stats: dict, extra: dict) -> None:
    folder = store.stage_dir(run_dir, seed, stage)
    for name, rows in outcome.predictions.items():
        store.write_jsonl(folder / "predictions" / f"{name}.jsonl", (p.to_dict() for p in rows))
    store.write_jsonl(folder / "reference_drift.jsonl", (d.to_dict() for d in drift))
    deltas = {f"{key}_delta": value - base_stats[key] for key, value in stats.items()}
    store.write_json(folder / "reference_stats.json", {**stats, **deltas})
    store.write_json(folder / "scores.json", outcome.scores)
    store.write_json(folder / "stage.json", {"stage": stage, "checkpoint": checkpoint, "task": task, **extra})


def lora_config(config: ExperimentConfig) -> LoraConfig:
    return LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, bias=config.lora.bias, task_type="CAUSAL_LM")


def save_adapter(model, folder: Path) -> None:
    # Written beside the final name, then renamed: a crash never leaves a half-written adapter in place.
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _total_rows(config: ExperimentConfig, data: RunData) -> int:
    tests = sum(len(t.test) for t in data.tasks)
    per_checkpoint = tests + 2 * len(data.reference)
    trains = sum(len(t.train) for t in data.tasks) * config.train.epochs
    return per_checkpoint + len(config.seeds) * (trains + len(data.tasks) * per_checkpoint)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{run_dir}: run folder already exists and is not empty; "
                            "choose another --out or pass --overwrite")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write the run folder ({exc.strerror})") from None


def run_experiment(config: ExperimentConfig, run_dir: str | Path, *, console: Console | None = None,
                   overwrite: bool = False) -> Path:
    """Run the whole protocol into `run_dir` and return it. Data problems surface before any model work."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    data = load_data(config)
    prepare_run_dir(run_dir, overwrite)
    save_config(config, run_dir / "config.json")

    def fresh_model() -> LoadedModel:
        return load_model(config.model.spec, device=config.model.device, dtype=config.model.dtype,
                          cache_dir=Path(config.model.cache_dir) if config.model.cache_dir else None,
                          trust_remote_code=config.model.trust_remote_code)

    loaded = fresh_model()
    store.write_json(run_dir / "environment.json", environment(loaded))
    device = loaded.info.device
    console.print(f"lorawatch: {config.name} · model {loaded.info.spec} ({loaded.info.num_parameters / 1e6:.0f}M "
                  f"params, {device}, {loaded.info.dtype}) · tasks {' → '.join(t.name for t in data.tasks)} · "
                  f"seeds {', '.join(map(str, config.seeds))} · run folder {run_dir}")
    encoded = encode(data, loaded.tokenizer, config.train.max_length)
    params = TrainParams(learning_rate=config.train.learning_rate, batch_size=config.train.batch_size,
                         grad_accum=config.train.grad_accum, epochs=config.train.epochs,
                         max_grad_norm=config.train.max_grad_norm, weight_decay=config.train.weight_decay,
                         lr_scheduler=config.train.lr_scheduler)
    eval_args = dict(max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size, device=device)

    with RunProgress(_total_rows(config, data), console) as progress:
        started = time.perf_counter()
        base, base_drift, base_stats = evaluate_checkpoint(loaded.model, loaded.tokenizer, data, encoded,
                                                           base_logprobs=None, progress=progress,
                                                           label="base", **eval_args)
        base_seconds = time.perf_counter() - started
        progress.log("base: " + _scores_line(base.scores))
        for seed in config.seeds:
            write_stage(run_dir, seed, 0, checkpoint="base", task=None, outcome=base, drift=base_drift,
                        stats=base_stats, base_stats=base_stats, extra={"eval_seconds": round(base_seconds, 3)})

        for seed_index, seed in enumerate(config.seeds):
            if seed_index > 0:
                loaded = fresh_model()
            torch.manual_seed(seed)  # LoRA's A matrices are initialised randomly
            model = get_peft_model(loaded.model, lora_config(config))
            for stage, task in enumerate(data.tasks, start=1):
                label = f"seed {seed} · stage {stage}/{len(data.tasks)}"
                progress.phase(f"{label} · train {task.name}")
                log = train_stage(model, encoded.train[task.name], params, seed=seed * 1000 + stage,
                                  pad_id=loaded.tokenizer.pad_token_id, device=device,
                                  on_micro_batch=_advance_by_delta(progress))
                save_adapter(model, store.stage_dir(run_dir, seed, stage) / "adapter")
                eval_start = time.perf_counter()
                outcome, drift, stats = evaluate_checkpoint(model, loaded.tokenizer, data, encoded,
                                                            base_logprobs=base.logprobs, progress=progress,
                                                            label=label, **eval_args)
                write_stage(run_dir, seed, stage, checkpoint=task.name, task=task.name, outcome=outcome,
                            drift=drift, stats=stats, base_stats=base_stats,
                            extra={"training": log.to_dict(),
                                   "eval_seconds": round(time.perf_counter() - eval_start, 3)})
                progress.log(f"seed {seed} stage {stage} ({task.name}): {log.optimizer_steps} steps, loss "
                             f"{_fmt(log.step_losses[0] if log.step_losses else None)} → "
                             f"{_fmt(log.step_losses[-1] if log.step_losses else None)} · "
                             f"{_scores_line(outcome.scores)} · KL to base {stats['kl_mean']:.4f}")
            tables.write_seed_tables(run_dir, seed)
            del model
        tables.write_summary(run_dir)
    return run_dir


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
