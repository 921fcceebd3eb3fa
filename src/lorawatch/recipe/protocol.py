"""The protocol as a recipe, read top to bottom in `Recipe.run`:

    setup      load the model, encode the data, resolve the evaluation fast path for this model and dtype
    base       stage 0: evaluate the base model on every task and the reference set (cached across runs)
    for each seed, for each task k in order:
      train    one cumulative LoRA adapter on task k (fresh AdamW; live drift monitor if configured)
      save     the adapter and the training log
      evaluate the checkpoint on every task, the reference set, and its drift from the base model
      finish   stage-k's summary files (stage.json last: the stage is complete)
    tables     accuracy matrix, CL metrics and stability per seed; mean/std over seeds

Every step writes its parts into the run folder (rundir/) as soon as they are done, and a rerun reads
finished parts back instead of recomputing them, so a resumed run gives the same files as an uninterrupted one.
The base stage does not depend on the seed (greedy decoding, no adapter): computed once, copied to every seed.
"""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import torch
from peft import get_peft_model
from rich.console import Console
from safetensors.torch import save as save_safetensors

from lorawatch.rundir import atomic, schema
from lorawatch.rundir.layout import RunFolder, Stage
from lorawatch.report import tables
from lorawatch.engine.base_cache import (
    base_stage_cache,
    base_stage_key,
    base_stage_lock,
    restore_base_stage,
    save_base_stage,
)
from lorawatch.engine.checkpoint_eval import EvalParams, TaskDriftInput, evaluate_checkpoint, generate_by_task
from lorawatch.engine.drift import adapter_check, answer_logprobs
from lorawatch.config import ExperimentConfig
from lorawatch.rundir.costs import Costs
from lorawatch.engine.generation import GENERATION_RULES_VERSION, FastPath, fast_path_for, merged_adapter
from lorawatch.analysis.signals import SPAN_SIGNALS, stage_signal_value
from lorawatch.engine.span_drift import measure_span_drift, span_tokens
from lorawatch.data.inputs import RunData, data_fingerprint, encode, load_data, weights_digest
from lorawatch.models.loading import LoadedModel, load_model
from lorawatch.recipe.monitor import MonitorParams, StageMonitor, measure_drift
from lorawatch.progress import RunProgress
from lorawatch.rundir.lifecycle import run_lock
from lorawatch.rundir.stage_files import (
    crash_point,
    finish_stage,
    load_adapter_weights,
    read_drafts,
    read_logprobs,
    save_adapter,
    stage_complete,
)
from lorawatch.data.tasks.scoring import SCORING_RULES_VERSION
from lorawatch.integrations.tracking import RunLogger
from lorawatch.recipe.strategies import build_strategy
from lorawatch.recipe.lora import check_lora_targets, lora_config
from lorawatch.recipe.training import TrainingDiverged, TrainParams, train_stage, use_gap_dropout

__all__ = ["Recipe", "data_inputs", "encode", "generate_by_task", "load_data", "run_lock"]


def data_inputs(data: RunData) -> dict:
    """The inputs known before the model is loaded: every row read, and the scoring and generation rules."""
    return {"data": data_fingerprint(data),
            "rules": {"scoring": SCORING_RULES_VERSION, "generation": GENERATION_RULES_VERSION}}


class Recipe:
    """One run of the protocol. The state every step needs (model, data, parameters, costs, progress) lives
    here, so that each step takes only what varies: the seed and the stage."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, data: RunData, console: Console, resuming: bool,
                 monitor: MonitorParams | None):
        self.config, self.run_dir, self.data, self.console = config, run_dir, data, console
        self.folder = RunFolder(run_dir)
        self.resuming, self.monitor = resuming, monitor
        self.costs = Costs()
        self.costs.notes["resumed"] = resuming
        self.tracker: RunLogger | None = None  # logs each finished stage, then the tables (reads the folder)

    def run(self) -> None:
        """Everything after `setup`, which the caller runs first (the run folder is started in between)."""
        with RunProgress(self.total_rows(), self.console) as self.progress:
            self.base_stage()
            for seed_index, seed in enumerate(self.config.seeds):
                self.run_seed(seed, fresh_model=seed_index > 0)
                with self.costs.phase("tables"):
                    tables.write_seed_tables(self.run_dir, seed, self.config.statistics)
            with self.costs.phase("tables"):
                tables.write_summary(self.run_dir)
        self.folder.costs.write(self.costs.to_dict())
        if self.tracker is not None:
            self.tracker.finish()

    # --- setup -----------------------------------------------------------------------------------------

    def load_model(self) -> LoadedModel:
        model = self.config.model
        with self.costs.phase("model_load"):
            return load_model(model.spec, device=model.device, dtype=model.dtype,
                              cache_dir=Path(model.cache_dir) if model.cache_dir else None,
                              trust_remote_code=model.trust_remote_code)

    def setup(self) -> None:
        config, data = self.config, self.data
        self.loaded = self.load_model()
        self.check_model()
        self.weights = weights_digest(self.loaded.model)
        info = self.loaded.info
        self.console.print(f"lorawatch: {config.name} · model {info.spec} ({info.num_parameters / 1e6:.0f}M "
                           f"params, {info.device}, {info.dtype}) · tasks {' → '.join(t.name for t in data.tasks)} · "
                           f"seeds {', '.join(map(str, config.seeds))} · run folder {self.run_dir}"
                           + (" · resuming" if self.resuming else ""))
        self.encoded = encode(data, self.loaded.tokenizer, config.train.max_length)
        train = config.train
        self.train_params = TrainParams(learning_rate=train.learning_rate, batch_size=train.batch_size,
                                        grad_accum=train.grad_accum, epochs=train.epochs,
                                        max_grad_norm=train.max_grad_norm, weight_decay=train.weight_decay,
                                        lr_scheduler=train.lr_scheduler, loss_weighting=train.loss_weighting)
        requested = FastPath.requested_by(config.eval)
        fast, switched_off = fast_path_for(self.loaded.model, self.loaded.model.dtype, requested)
        for part, why in switched_off.items():
            self.console.print(f"lorawatch: fast path: {part} off for this model ({why})")
        self.costs.notes["fast_path"] = {"used": fast.to_dict(), "switched_off": switched_off}
        self.eval_params = EvalParams(max_new_tokens=config.eval.max_new_tokens, token_budget=config.eval.token_budget,
                                      batch_rows=config.eval.batch_rows, device=info.device,
                                      reference_position=config.reference.position, fast=fast)
        self.strategy = build_strategy(config.strategy, {t.name: self.encoded.train[t.name] for t in data.tasks},
                                       pad_id=self.loaded.tokenizer.pad_token_id, device=info.device)

    def check_model(self) -> None:
        """What must hold of the loaded model before anything is printed or computed."""
        check_lora_targets(self.loaded.model, lora_config(self.config))

    def fingerprint(self) -> dict:
        """What this run's results are computed from; a resume with other inputs is refused."""
        return {**data_inputs(self.data), "model": {"weights": self.weights}}

    # --- stage 0 ---------------------------------------------------------------------------------------

    def base_stage(self) -> None:
        """Evaluate the base model once (or reuse a cached evaluation), then copy it into every seed's folder."""
        config, data, progress = self.config, self.data, self.progress
        base = self.folder.stage(config.seeds[0], 0)
        lp_path = self.folder.base_logprobs
        key = base_stage_key(self.loaded, self.weights, data, self.encoded, self.eval_params)
        cache = base_stage_cache(key) if config.eval.reuse_base_stage else None
        self.base_logprobs = read_logprobs(lp_path, len(data.reference))
        if self.base_logprobs is None or not stage_complete(base, data, adapter=False):
            def waiting() -> None:
                progress.log(f"base: another run is computing this base stage; waiting to reuse it ({cache})")

            with base_stage_lock(cache, on_wait=waiting):
                self.compute_base_stage(base, lp_path, key, cache)
        else:
            progress.advance(self.checkpoint_rows())
        self.costs.notes["base_stage_key"] = key
        self.base_stats = base.reference_stats.read().statistics()
        for seed in config.seeds[1:]:
            copy = self.folder.stage(seed, 0)
            if not stage_complete(copy, data, adapter=False):
                atomic.copy_folder(base.path, copy.path)

    def compute_base_stage(self, base: Stage, lp_path: Path, key: str, cache: Path | None) -> None:
        """Stage 0's parts: restored from the cache when it holds them, else computed (and then cached)."""
        data, progress = self.data, self.progress
        reused = cache is not None and restore_base_stage(cache, base, lp_path)
        if reused:
            self.base_logprobs = read_logprobs(lp_path, len(data.reference))
            progress.log(f"base: reusing the base evaluation cached under {cache}")
        started = time.perf_counter()
        if self.base_logprobs is None:
            base.drift.path.unlink(missing_ok=True)
        scores, drift, computed = evaluate_checkpoint(
            self.loaded.model, self.loaded.tokenizer, data, self.encoded, base, self.eval_params,
            base_logprobs=None, drafts=None, costs=self.costs, progress=progress, label="base", crash_prefix="base")
        if computed is not None:
            atomic.write_bytes(lp_path, save_safetensors({"logprobs": computed.contiguous()}))
            self.base_logprobs = computed
        finish_stage(base, index=0, checkpoint="base", task=None, scores=scores, drift=drift, base_stats=None,
                     extra={"eval_seconds": round(time.perf_counter() - started, 3), "base_stage_key": key,
                            "reused_from_cache": reused, "fast_path": self.eval_params.fast.to_dict()})
        if cache is not None and not reused:
            save_base_stage(cache, base, lp_path)
        progress.log("base: " + _scores_line(scores))

    # --- one seed ----------------------------------------------------------------------------------------

    def run_seed(self, seed: int, *, fresh_model: bool) -> None:
        """The seed's stages from the first one not complete: each trains on the adapter the one before left."""
        stages = [self.folder.stage(seed, k) for k in range(len(self.data.tasks) + 1)]
        first = next((k for k in range(1, len(stages)) if not stage_complete(stages[k], self.data, adapter=True)),
                     None)
        if first is None:
            self.progress.advance(self.seed_rows())
        else:
            if fresh_model:  # the previous seed's adapter wrappers live in the model it was given
                self.loaded = self.load_model()
            torch.manual_seed(seed)  # LoRA's A matrices are initialised randomly
            model = get_peft_model(self.loaded.model, lora_config(self.config))
            use_gap_dropout(model)
            # resume from the last stage whose adapter is intact (redo it too if it is damaged), and whatever its
            # strategy kept for later stages (checked first: a stage to redo must not start from its own adapter)
            while first > 1 and not (self.strategy.intact(stages[first - 1], first - 1)
                                     and load_adapter_weights(model, stages[first - 1].adapter)):
                first -= 1
            self.run_stages(model, seed, range(first, len(stages)))
            del model

    def run_stages(self, model, seed: int, stages: Iterable[int]) -> None:
        """Each stage in turn: its checkpoint (`train`), its evaluation, its files and its line in the log."""
        for stage in stages:
            log = self.train(model, seed, stage)
            scores, drift, seconds = self.evaluate(model, seed, stage)
            self.finish(seed, stage, log, scores, drift, seconds)
            if self.tracker is not None:
                self.tracker.stage(seed, stage)

    def train(self, model, seed: int, stage: int) -> schema.TrainingLog:
        """Train stage `stage`'s task into the adapter and save it, or read back a stage trained before."""
        task = self.data.tasks[stage - 1]
        folder = self.folder.stage(seed, stage)
        # Also for a stage read back: a strategy shapes the model for the stage here (O-LoRA adds the earlier
        # tasks' adapters), and the stage's own adapter is loaded into that shape.
        plan = self.strategy.plan(model, stage, seed, [self.folder.stage(seed, k) for k in range(stage)])
        trained = folder.training.intact()
        if (trained is not None and self.strategy.intact(folder, stage)
                and load_adapter_weights(model, folder.adapter)):
            self.progress.advance(len(task.train) * self.train_params.epochs)
            return schema.TrainingLog.model_validate(trained.body())
        # whatever this stage evaluated before belonged to another adapter
        shutil.rmtree(folder.path, ignore_errors=True)
        label = self.stage_label(seed, stage)
        self.progress.phase(f"{label} · train {task.name}")
        advance = _advance_by_delta(self.progress)

        def on_micro_batch(done: int, total: int) -> None:
            advance(done * len(task.train) // len(plan.rows), total)  # progress counts the task's own rows
            crash_point(f"{seed}:{stage}:train:{done}")

        watch = None if self.monitor is None else self.stage_monitor(model, seed, stage)
        with self.costs.phase("training"):
            try:
                log = train_stage(model, plan.rows, self.train_params, seed=plan.seed,
                                  pad_id=self.loaded.tokenizer.pad_token_id, device=self.eval_params.device,
                                  on_micro_batch=on_micro_batch, on_step=None if watch is None else watch.on_step,
                                  extra_loss=plan.extra_loss)
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"seed {seed}, stage {stage} ({task.name}): {exc}; finished stages are kept, "
                                       "this one is not recorded") from None
            if watch is not None:
                log.monitor = self.finish_monitor(watch, log, folder, seed, stage)
            strategy_log = self.strategy.finish(model, plan, log.optimizer_steps, folder)
            if strategy_log is not None:
                log.strategy = strategy_log
            save_adapter(model, folder.adapter)
            folder.training.write(log)
        crash_point(f"{seed}:{stage}:trained")
        return log

    def evaluate(self, model, seed: int, stage: int) -> tuple[dict, list, float]:
        """The checkpoint on every task and the reference set, with the previous checkpoint's outputs as drafts."""
        started = time.perf_counter()
        task_drift = self.task_drift_input(model, seed, stage)  # before the merge: it switches the adapter off
        self.span_drift(model, seed, stage)  # before the merge too
        with merged_adapter(model) if self.eval_params.fast.merge_adapter else nullcontext():
            scores, drift, _ = evaluate_checkpoint(
                model, self.loaded.tokenizer, self.data, self.encoded, self.folder.stage(seed, stage),
                self.eval_params, base_logprobs=self.base_logprobs,
                drafts=read_drafts(self.folder.stage(seed, stage - 1)), costs=self.costs,
                progress=self.progress, label=self.stage_label(seed, stage), crash_prefix=f"{seed}:{stage}",
                task_drift=task_drift)
        return scores, drift, time.perf_counter() - started

    def task_drift_input(self, model, seed: int, stage: int) -> TaskDriftInput | None:
        """The base model's distributions on the trained task's test prompts, read through the same model with its
        adapter switched off (one prompt pass, no second copy of the model); None when already on disk, or when
        the checkpoint was not trained on one of the run's tasks."""
        task = next((t for t in self.data.tasks if t.name == self.checkpoint_of(stage)[1]), None)
        stage_folder = self.folder.stage(seed, stage)
        if (task is None or not hasattr(model, "disable_adapter")
                or stage_folder.task_drift.intact_rows([e.id for e in task.test]) is not None):
            return None
        params = self.eval_params
        with self.costs.phase("task_drift"), model.disable_adapter():
            base = answer_logprobs(model, self.encoded.test[task.name], pad_id=self.loaded.tokenizer.pad_token_id,
                                   token_budget=params.token_budget, batch_rows=params.batch_rows,
                                   device=params.device)[1]
        return TaskDriftInput(task.name, base)

    def span_rows(self, seed: int) -> list:
        """The reference rows with their first `reference.span_tokens` answer tokens: the base model's own (stage 0's
        reference predictions) and the gold ones (engine/span_drift.span_tokens)."""
        answers = {r.id: r.output_ids for r in self.folder.stage(seed, 0).predictions("reference").read()}
        return span_tokens(self.encoded.reference, answers, self.config.reference.span_tokens)

    def span_drift(self, model, seed: int, stage: int) -> None:
        """The stage's drift over the first `reference.span_tokens` tokens of the reference answers (the base
        model's own, from stage 0's predictions, and the gold ones), written to span_drift.jsonl; skipped when
        already there, when span_tokens is 0, and for a model without a switchable adapter."""
        k = self.config.reference.span_tokens
        if k == 0 or not hasattr(model, "disable_adapter"):
            return
        rows = self.span_rows(seed)
        folder = self.folder.stage(seed, stage)
        if not rows or folder.span_drift.intact_rows([p.id for _, p, _ in rows]) is not None:
            return
        self.progress.phase(f"{self.stage_label(seed, stage)} · drift over the first {k} answer tokens")
        params = self.eval_params
        with self.costs.phase("span_drift"):
            drift = measure_span_drift(model, rows, {e.id: e.task for e in self.data.reference},
                                       pad_id=self.loaded.tokenizer.pad_token_id, device=params.device,
                                       token_budget=params.token_budget, batch_rows=params.batch_rows)
        folder.span_drift.write(r.to_dict() for r in drift)
        crash_point(f"{seed}:{stage}:span_drift")

    def finish(self, seed: int, stage: int, log: schema.TrainingLog | None, scores: dict, drift: list,
               eval_seconds: float) -> None:
        """The stage's summary files (stage.json last: the stage is complete), and its line in the log."""
        checkpoint, task = self.checkpoint_of(stage)
        intervention = None if log is None or log.monitor is None else log.monitor.intervention
        # Trained here or loaded (`lorawatch evaluate`): an adapter that leaves the base model's distributions as
        # they were makes every number of this stage the base model's, so it is flagged, not silently measured.
        check = adapter_check(drift, self.base_logprobs.argmax(-1).tolist())
        stats = finish_stage(self.folder.stage(seed, stage), index=stage, checkpoint=checkpoint,
                             task=task, scores=scores, drift=drift, base_stats=self.base_stats,
                             extra={"training": None if log is None else log.body(),
                                    "intervention": None if intervention is None else intervention.body(),
                                    "fast_path": self.eval_params.fast.to_dict(),
                                    "eval_seconds": round(eval_seconds, 3), "adapter_check": check.body(),
                                    **self.stage_extra(stage)})
        crash_point(f"{seed}:{stage}:done")
        self.progress.log(f"{self.stage_heading(seed, stage, log)}{_scores_line(scores)} · KL to base "
                          f"{stats['kl_mean']:.4f}")
        if not check.active and intervention is not None and intervention.kept_step == 0:
            self.progress.log(f"adapter check: seed {seed} stage {stage} ({checkpoint}): the base model's "
                              f"distributions, as the monitor's {intervention.action} left it")
        elif not check.active:
            self.progress.log(f"[bold red]adapter check[/bold red]: seed {seed} stage {stage} ({checkpoint}): "
                              f"{check.summary()}")

    def checkpoint_of(self, stage: int) -> tuple[str, str | None]:
        """The stage's checkpoint name in the tables, and the task it was trained on (None: not known)."""
        task = self.data.tasks[stage - 1].name
        return task, task

    def stage_extra(self, stage: int) -> dict:
        """What stage.json records of the stage besides the recipe's fields."""
        return {}

    def stage_heading(self, seed: int, stage: int, log: schema.TrainingLog | None) -> str:
        """The stage's line in the log up to its scores."""
        losses = log.step_losses
        return (f"seed {seed} stage {stage} ({self.data.tasks[stage - 1].name}): {log.optimizer_steps} steps, "
                f"loss {_fmt(losses[0] if losses else None)} → {_fmt(losses[-1] if losses else None)} · ")

    # --- the live drift monitor ----------------------------------------------------------------------------

    def stage_monitor(self, model, seed: int, stage: int) -> StageMonitor:
        task, data, loaded = self.data.tasks[stage - 1], self.data, self.loaded
        previous = self.folder.stage(seed, stage - 1)
        previous_kl = previous.reference_stats.read().kl_mean if stage > 1 else 0.0
        signal = self.monitor.signal
        # Every signal is 0 at the base model, where the first stage starts.
        previous_value = previous_kl if signal == "kl" or stage == 1 else stage_signal_value(previous, signal)
        threshold = self.monitor.stage_threshold(previous_value)
        label = self.stage_label(seed, stage)

        span = self.span_rows(seed) if signal in SPAN_SIGNALS else None

        def measure() -> dict:
            # against the base distributions computed once for the run (a span signal's: read again each time)
            return measure_drift(model, loaded.tokenizer, data, self.encoded.reference, self.base_logprobs,
                                 span=span, device=self.eval_params.device,
                                 token_budget=self.eval_params.token_budget,
                                 batch_rows=self.eval_params.batch_rows, fast=self.eval_params.fast)

        def show(point: dict) -> None:
            limit = "" if threshold is None else f" (threshold {threshold:.4f})"
            watched = "" if signal == "kl" else f" · {signal} {point['signal_value']:.4f}"
            self.progress.phase(f"{label} · train {task.name} · step {point['step']} KL {point['kl_mean']:.4f}"
                                f"{watched}{limit}")

        return StageMonitor(model=model, measure=measure, params=self.monitor, stage=stage, task=task.name,
                            threshold=threshold, start_kl=previous_kl, on_point=show)

    def finish_monitor(self, watch: StageMonitor, log: schema.TrainingLog, folder: Stage, seed: int,
                       stage: int) -> schema.MonitorLog:
        """Apply the monitor's action at the stage's end; its record for the training log."""
        intervention = watch.finish(log.optimizer_steps)
        monitor = self.monitor
        self.costs.seconds["monitor"] += watch.seconds
        folder.monitor_series.write(watch.series)
        if intervention is not None:
            self.progress.log(f"[bold]monitor[/bold]: seed {seed} stage {stage} ({self.data.tasks[stage - 1].name}): "
                              + (f"KL to base {intervention.kl:.4f}" if intervention.signal == "kl"
                                 else f"{intervention.signal} {intervention.value:.4f}")
                              + f" > {intervention.threshold:.4f} at step "
                              f"{intervention.step} → {intervention.action}"
                              + ("" if intervention.action == "warn" else f", keeping step {intervention.kept_step}"))
        return schema.MonitorLog(threshold=watch.threshold, action=monitor.action, every=monitor.every,
                                 patience=monitor.patience, measurements=len(watch.series),
                                 seconds=round(watch.seconds, 3), intervention=intervention)

    # --- progress arithmetic ------------------------------------------------------------------------------

    def stage_label(self, seed: int, stage: int) -> str:
        return f"seed {seed} · stage {stage}/{len(self.data.tasks)}"

    def checkpoint_rows(self) -> int:
        """Progress rows of one checkpoint's evaluation: every test row, and the reference set twice."""
        return sum(len(t.test) for t in self.data.tasks) + 2 * len(self.data.reference)

    def seed_rows(self) -> int:
        """Progress rows of one seed after the base stage: all training passes and every checkpoint's evaluation."""
        trains = sum(len(t.train) for t in self.data.tasks) * self.config.train.epochs
        return trains + len(self.data.tasks) * self.checkpoint_rows()

    def total_rows(self) -> int:
        return self.checkpoint_rows() + len(self.config.seeds) * self.seed_rows()


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
