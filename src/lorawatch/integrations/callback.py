"""lorawatch's live drift monitor for a model trained with transformers' Trainer (or TRL's SFTTrainer).

    monitor = DriftMonitorCallback(tokenizer, every=10, action="stop", threshold=0.5)
    trainer = Trainer(model=peft_model, args=args, train_dataset=rows)
    monitor.attach(trainer)
    trainer.train()

The measurement is the one `lorawatch run` makes with a `monitor:` section (monitor.measure_drift):
every `every` optimizer steps and at the last step, one pass over the reference prompts that reads the
next-token distribution at the answer position, against the base model's distributions computed once when
training begins, with the PEFT adapter switched off (no second copy of the model). A span signal
(`signal="kl_answer"`, ...: analysis/signals.py) also reads the first `span_tokens` tokens of the base model's own
answers (generated greedily when training begins) and of the gold answers, with the adapter on and off at each
measurement. KL to base, entropy and
top-2 margin are averaged over the reference rows. The training run is the monitor's one stage, and
monitor.StageMonitor decides and applies the action exactly as in a lorawatch run (see monitor.py):

- warn      log a warning; change nothing.
- stop      end training at the measurement that acts; the adapter goes back to the last measurement below the
            threshold (the start of training when there was none).
- revert    end training there; the adapter goes back to the start of training.
- rollback  train to the end; then keep, among the measurements below the threshold, the one with the lowest
            training loss.

stop and revert restore the adapter in the step that acts, before the Trainer's own evaluation or checkpoint
of that step; rollback when training ends. The model then holds the kept adapter when `train()` returns (so
`trainer.save_model()` saves it), and it is also saved (PEFT `save_pretrained`) to `<output_dir>/kept-adapter/`.
Checkpoints the Trainer wrote before that step are left as they are.

Written and logged:
- `<output_dir>/monitor.jsonl` (default output_dir: the Trainer's `args.output_dir`): the series lorawatch
  writes, one `schema.MonitorPoint` per measurement, rewritten after each one.
- `drift/kl_to_base`, `drift/entropy`, `drift/margin` in the Trainer's log of each measurement step, beside its
  loss: in `trainer.state.log_history`, and sent to the `report_to` integrations (TensorBoard, MLflow, W&B).

When training ends, the adapter the model holds is checked against the base model on the reference set
(engine/drift.adapter_check, the check `lorawatch run` and `evaluate` make of every stage): an adapter that leaves
every reference distribution as the base model's (zero weights, or layers that change nothing) is logged as a
warning, and `monitor.adapter_check` holds the result either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError
from transformers import TrainerCallback

from lorawatch.rundir.layout import monitor_series
from lorawatch.rundir.schema import AdapterCheck, Intervention
from lorawatch.analysis.signals import SPAN_SIGNALS
from lorawatch.engine.checkpoint_eval import generate_by_task
from lorawatch.engine.drift import adapter_check_of
from lorawatch.engine.span_drift import span_tokens
from lorawatch.config import MonitorSettings, describe_error
from lorawatch.errors import ConfigError, UserError
from lorawatch.data.inputs import RunData, load_data
from lorawatch.recipe.monitor import MonitorParams, StageMonitor, measure_drift, reference_logprobs, resolve_threshold
from lorawatch.presets import preset
from lorawatch.data.prompts import EncodedPrompt, encode_prompt, user_message
from lorawatch.data.tasks.scoring import training_target
from lorawatch.data.tasks.loading import load_examples

log = logging.getLogger(__name__)

LOG_KEYS = {"kl_mean": "drift/kl_to_base", "entropy_mean": "drift/entropy", "margin_mean": "drift/margin"}
KEPT_ADAPTER = "kept-adapter"
MAX_PROMPT_TOKENS = 512  # lorawatch's train.max_length default: a longer prompt keeps its last 512 tokens


def reference_set(reference: str | Path | None, tokenizer) -> tuple[RunData, list[EncodedPrompt]]:
    """The reference rows and their token ids, rendered as lorawatch renders them (prompts.py).

    None: the built-in reference set of `lorawatch run --preset demo` (6 rows of each built-in task, each with
    its task's instruction). A path: a JSON/JSONL file of {prompt, answer} rows, read and checked by lorawatch's
    loader; each prompt is the user's message as it stands (there are no tasks here to take an instruction from).
    """
    if reference is None:
        data = load_data(preset("demo"))
    else:
        data = RunData(tasks=[], reference=load_examples(reference, task="reference", split="reference",
                                                         keep_task_field=True))
    instructions = {t.name: t.instruction for t in data.tasks}
    kinds = {t.name: t.kind for t in data.tasks}
    # A file's rows have no task kind: their gold is the answer's first line as written.
    prompts = [encode_prompt(tokenizer, e.id, user_message(instructions.get(e.task, ""), e.prompt), MAX_PROMPT_TOKENS,
                             answer=(training_target(kinds[e.task], e.answer) if e.task in kinds
                                     else e.answer.strip().split("\n", 1)[0].strip()) or None)
               for e in data.reference]
    return data, prompts


class DriftMonitorCallback(TrainerCallback):
    """KL to base, entropy and margin on a reference set every `every` optimizer steps, and an action when the KL
    crosses the threshold. The settings are those of lorawatch's `monitor:` config section (config.MonitorSettings);
    `relative` multiplies the KL of the adapter as it is when training begins (0 for a fresh adapter)."""

    def __init__(self, tokenizer, reference: str | Path | None = None, *, every: int = 10, action: str = "warn",
                 threshold: float | None = None, relative: float | None = None,
                 calibrate_from: str | Path | None = None, patience: int = 1, signal: str = "kl",
                 span_tokens: int = 8, output_dir: str | Path | None = None):
        try:
            settings = MonitorSettings(every=every, action=action, threshold=threshold, relative=relative,
                                       calibrate_from=None if calibrate_from is None else str(calibrate_from),
                                       patience=patience, signal=signal)
        except ValidationError as error:
            raise ConfigError(describe_error(error, "DriftMonitorCallback")) from None
        # as `lorawatch run` resolves it
        threshold = resolve_threshold(threshold, settings.calibrate_from, signal)[0]
        self.params = MonitorParams(every=every, action=action, threshold=threshold, relative=relative,
                                    patience=patience, **({} if signal == "kl" else {"signal": signal}))
        if signal in SPAN_SIGNALS and not (isinstance(span_tokens, int) and 0 < span_tokens <= 64):
            raise ConfigError(f"DriftMonitorCallback: signal '{signal}' reads the first span_tokens answer tokens; "
                              f"span_tokens must be an integer from 1 to 64, got {span_tokens!r}")
        self.span_tokens = span_tokens if signal in SPAN_SIGNALS else 0
        self._span: list | None = None  # the reference rows with the answers a span signal reads
        self.tokenizer = tokenizer
        self.data, self.prompts = reference_set(reference, tokenizer)
        self.output_dir = output_dir
        self.stage_monitor: StageMonitor | None = None  # one per train(): its series, seconds, threshold
        self.start_kl: float | None = None
        self.intervention: Intervention | None = None
        self.adapter_check: AdapterCheck | None = None  # of the adapter the model holds when training ends
        self._attached = False

    def attach(self, trainer) -> "DriftMonitorCallback":
        """Register with `trainer` ahead of its other callbacks. The Trainer hands each log to its callbacks in
        turn, the report_to integrations among the first: only values added before their turn reach them. (In
        `callbacks=[...]` this callback runs after them: it works the same, but report_to misses the drift.)"""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._attached = True
        return self

    # --- the measurement and the rule of when it is due: lorawatch's own (monitor.py) ---------------------------

    def _measure(self, model) -> dict:
        return measure_drift(model, self.tokenizer, self.data, self.prompts, self._base, span=self._span,
                             device=str(model.device))

    def _due(self, state) -> bool:
        return self.params.due(state.global_step, state.max_steps)

    # --- the Trainer's events ---------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not hasattr(model, "disable_adapter"):
            raise UserError("DriftMonitorCallback compares the model with its base by switching the PEFT adapter "
                            "off: train a PEFT model (peft.get_peft_model)")
        if args.report_to and not self._attached:
            log.warning("DriftMonitorCallback runs after the report_to callbacks: use monitor.attach(trainer) "
                        "instead of callbacks=[...] for them to receive the drift values")
        self.folder = Path(self.output_dir or args.output_dir)
        with model.disable_adapter():
            self._base = reference_logprobs(model, self.tokenizer, self.data.reference, self.prompts,
                                            device=str(model.device))
            if self.span_tokens:  # the base model's own first answer tokens, greedy, as `lorawatch run`'s stage 0
                was_training = model.training
                answers = generate_by_task(model, self.tokenizer, self.data.reference, self.prompts,
                                           max_new_tokens=self.span_tokens, device=str(model.device))
                model.train(was_training)
                self._span = span_tokens(self.prompts, {i: g.output_ids for i, g in answers.items()},
                                         self.span_tokens)
        start = self._measure(model)
        self.start_kl = start["kl_mean"]
        self.intervention = None
        self.stage_monitor = StageMonitor(model=model, measure=lambda: self._measure(model), params=self.params,
                                          stage=1, task="train", threshold=None, start_kl=self.start_kl)
        self.stage_monitor.threshold = self.params.stage_threshold(self.stage_monitor.value(start))
        self._finished = False
        self._loss_sum, self._loss_steps, self._logged_step = 0.0, 0, state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.stage_monitor is not None and not self._finished and self._due(state):
            # Ask for a log at this step: the measurement is made when the Trainer has put its loss in it.
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        watch = self.stage_monitor
        if watch is None or self._finished or "loss" not in (logs or {}):
            return control  # evaluation and end-of-training summaries carry no training loss
        # The Trainer's loss is the mean per step since its previous log; StageMonitor records the mean since the
        # previous measurement (rollback compares it), so the logs in between are weighted by their steps.
        steps = state.global_step - self._logged_step
        self._loss_sum += logs["loss"] * steps
        self._loss_steps += steps
        self._logged_step = state.global_step
        if not self._due(state):
            return control
        acts = watch.on_step(state.global_step, state.max_steps, self._loss_sum / max(self._loss_steps, 1))
        self._loss_sum, self._loss_steps = 0.0, 0
        point = watch.series[-1]
        values = {key: point[name] for name, key in LOG_KEYS.items()}
        if self.params.signal != "kl":
            values[f"drift/{self.params.signal}"] = point["signal_value"]
        logs.update(values)  # reaches the callbacks after this one: the reporters, when attached
        state.log_history[-1].update(values)  # the entry the Trainer appended for this log, before the callbacks
        if watch.trigger is point:
            what = (f"KL to base {point['kl_mean']:.4f}" if self.params.signal == "kl"
                    else f"{self.params.signal} {point['signal_value']:.4f}")
            log.warning(f"drift monitor: {what} > threshold {watch.threshold:.4f} at "
                        f"step {point['step']} -> {self.params.action}")
        if state.is_world_process_zero:
            self._write_series()
        if acts:  # stop or revert: the adapter is restored now, before this step's evaluation or checkpoint
            control.should_training_stop = True
            self._finish(state)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.stage_monitor is not None and not self._finished:
            self._finish(state)
        if self.stage_monitor is not None:
            self._check_adapter(model or self.stage_monitor.model)
        if self.stage_monitor is not None and state.is_world_process_zero:
            self._write_series()
        return control

    def _finish(self, state) -> None:
        self._finished = True
        self.intervention = self.stage_monitor.finish(state.global_step)
        if self.intervention is None or self.intervention.action == "warn":
            return
        i = self.intervention
        log.warning(f"drift monitor: {i.action} after step {i.steps_trained}: the model holds the adapter of step "
                    f"{i.kept_step} (KL to base {i.kept_kl:.4f}), also saved to {self.folder / KEPT_ADAPTER}")
        if state.is_world_process_zero:
            self.stage_monitor.model.save_pretrained(self.folder / KEPT_ADAPTER)

    def _check_adapter(self, model) -> None:
        """The adapter kept at the end (after the monitor's action) against the base distributions of the start."""
        was_training = model.training
        logprobs = reference_logprobs(model, self.tokenizer, self.data.reference, self.prompts,
                                      device=str(model.device))
        model.train(was_training)
        self.adapter_check = adapter_check_of(logprobs, self._base)
        if not self.adapter_check.active:
            log.warning(f"adapter check: {self.adapter_check.summary()}")

    def _write_series(self) -> None:
        monitor_series(self.folder).write(self.stage_monitor.series)
