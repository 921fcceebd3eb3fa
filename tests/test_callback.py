"""DriftMonitorCallback in a real transformers Trainer (and TRL's SFTTrainer) training the tiny random Llama with
LoRA: the series it logs and writes, `stop` (and the other actions) at a known step, and its numbers against
lorawatch's own measurement of the same adapter."""

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from lorawatch.rundir import schema, store
from lorawatch.integrations.callback import KEPT_ADAPTER, LOG_KEYS, DriftMonitorCallback
from lorawatch.engine.checkpoint_eval import drift_rows, generate_by_task
from lorawatch.errors import ConfigError, DataError, UserError
from lorawatch.data.inputs import RunData
from lorawatch.data.prompts import encode_prompt, encode_train_example
from lorawatch.engine.drift import answer_logprobs, summarize
from lorawatch.data.tasks.loading import load_examples
from tiny import write_task_files

STEPS, EVERY = 9, 2  # measurements at steps 2, 4, 6, 8 and at the last step, 9
ADAPTER_FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("callback")
    write_task_files(root / "data")
    return tiny_model_dir, root


def lora_model(model_dir, dtype=torch.float32):
    torch.manual_seed(0)  # LoRA's A matrices: every run starts from the same adapter
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                          LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM"))


def train_rows(tokenizer, data_dir):
    rows = json.loads((data_dir / "mc_train.json").read_text())
    rows += [json.loads(line) for line in (data_dir / "num_train.jsonl").read_text().splitlines()]
    encoded = [encode_train_example(tokenizer, r["prompt"], r["answer"], 128) for r in rows]
    return [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in encoded]


def collate(pad_id):
    def pad(batch):
        width = max(len(b["input_ids"]) for b in batch)
        fill = lambda row, value: row + [value] * (width - len(row))  # noqa: E731
        return {"input_ids": torch.tensor([fill(b["input_ids"], pad_id) for b in batch]),
                "labels": torch.tensor([fill(b["labels"], -100) for b in batch]),
                "attention_mask": torch.tensor([fill([1] * len(b["input_ids"]), 0) for b in batch])}
    return pad


class Reporter(TrainerCallback):
    """Stands where transformers puts the report_to integrations (right after DefaultFlowCallback): what it sees
    in each log is what TensorBoard, MLflow or W&B would receive. Also records the model's train/eval mode."""

    def __init__(self):
        self.logs, self.training = [], []

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})
        self.training.append(model.training)


def train(setup, name, *, every=EVERY, logging_steps=1000, dtype=torch.float32, **monitor):
    """A real Trainer run of STEPS steps (16 rows, batch 2) with the callback attached; (trainer, callback,
    reporter, output folder)."""
    model_dir, root = setup
    out = root / name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    callback = DriftMonitorCallback(tokenizer, root / "data" / "reference.json", every=every, **monitor)
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=2e-2,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=logging_steps, disable_tqdm=True, seed=0)
    trainer = Trainer(model=lora_model(model_dir, dtype), args=args, data_collator=collate(tokenizer.pad_token_id),
                      train_dataset=train_rows(tokenizer, root / "data"))
    reporter = Reporter()
    trainer.callback_handler.callbacks.insert(1, reporter)
    callback.attach(trainer)
    trainer.train()
    return trainer, callback, reporter, out


def lorawatch_measure(model_dir, reference, adapter_dir, route="answer"):
    """lorawatch's own reading of an adapter saved to disk, on freshly loaded models: the base distributions
    from the base model itself (not the adapter switched off), by `drift.answer_logprobs` or by the
    generation's first pass (`checkpoint_eval.generate_by_task`)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_examples(reference, task="reference", split="reference", keep_task_field=True)
    prompts = [encode_prompt(tokenizer, e.id, e.prompt, 512) for e in rows]

    def logprobs(model):
        if route == "answer":
            return answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, device="cpu")[1]
        first = generate_by_task(model, tokenizer, rows, prompts, max_new_tokens=1, device="cpu",
                                 first_logprobs=True)
        return torch.stack([first[e.id].first_logprobs for e in rows])

    base = logprobs(AutoModelForCausalLM.from_pretrained(model_dir))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    return summarize(drift_rows(RunData([], rows), prompts, logprobs(adapted), base))


@pytest.fixture(scope="module")
def warned(setup):
    """Action warn without a threshold: the series alone, and the final adapter saved by the Trainer."""
    trainer, callback, reporter, out = train(setup, "warn")
    trainer.save_model(str(out / "final"))
    return trainer, callback, reporter, out


def test_series_is_logged_and_written_every_n_steps(warned):
    trainer, callback, reporter, out = warned
    steps = [2, 4, 6, 8, 9]
    series = store.read_rows(out / "monitor.jsonl", schema.MonitorPoint)
    assert [p.step for p in series] == steps
    assert callback.start_kl == 0.0  # a fresh adapter (B = 0) is the base model: KL 0 when training begins
    assert all(p.kl_mean > 0 and math.isfinite(p.entropy_mean) and p.margin_mean >= 0 for p in series)
    assert series[-1].kl_mean > series[0].kl_mean
    assert all(p.threshold is None and not p.above for p in series)
    # In the Trainer's own log, beside the loss of the same step (which the callback asked the Trainer for)...
    logged = [e for e in trainer.state.log_history if "drift/kl_to_base" in e]
    assert [e["step"] for e in logged] == steps and all("loss" in e for e in logged)
    for entry, point in zip(logged, series):
        assert {key: entry[key] for key in LOG_KEYS.values()} == \
            {key: getattr(point, name) for name, key in LOG_KEYS.items()}
        assert point.train_loss == pytest.approx(entry["loss"])  # logs only at measurements: the same window
    # ... and in what a report_to integration receives, with the model back in training mode after measuring.
    assert [e for e in reporter.logs if "drift/kl_to_base" in e] == logged
    assert len(reporter.training) == len(reporter.logs) > 0 and all(reporter.training)
    assert callback.intervention is None and not (out / KEPT_ADAPTER).exists()


def test_loss_of_a_measurement_spans_the_trainers_logs_since_the_last_one(setup):
    trainer, callback, reporter, out = train(setup, "log-every-step", every=3, logging_steps=1)
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(losses) == list(range(1, STEPS + 1))
    series = store.read_rows(out / "monitor.jsonl", schema.MonitorPoint)
    assert [p.step for p in series] == [3, 6, 9]
    for previous, point in zip([0, 3, 6], series):
        window = [losses[step] for step in range(previous + 1, point.step + 1)]
        assert point.train_loss == pytest.approx(sum(window) / len(window))


def test_bf16_model(setup):
    trainer, callback, reporter, out = train(setup, "bf16", dtype=torch.bfloat16)
    assert trainer.model.dtype == torch.bfloat16
    series = store.read_rows(out / "monitor.jsonl", schema.MonitorPoint)
    assert [p.step for p in series] == [2, 4, 6, 8, 9]
    assert callback.start_kl == 0.0 and all(p.kl_mean > 0 and math.isfinite(p.entropy_mean) for p in series)


def _crossing(points):
    """A threshold that the series first crosses early on, between a measurement and every one before it."""
    for k in range(1, len(points) - 2):
        if all(p.kl_mean < points[k].kl_mean for p in points[:k]):
            return (max(p.kl_mean for p in points[:k]) + points[k].kl_mean) / 2
    pytest.fail("the KL series never rose")


def _expected(points, threshold, action, patience):
    """What the action does on the warn run's series, worked out here: (step that acts, step kept)."""
    streak, below = 0, [(0, 0.0)]  # (step, train loss); step 0: the start of training
    for p in points:
        above = p.kl_mean > threshold
        streak = streak + 1 if above else 0
        if not above:
            below.append((p.step, p.train_loss))
        if above and (streak >= patience or p.step == STEPS) and action in ("stop", "revert"):
            return p.step, 0 if action == "revert" else below[-1][0]
    # rollback: the whole run, then the lowest loss among the measurements below (the start only if none)
    return STEPS, min(below[1:] or below, key=lambda b: (b[1], -b[0]))[0]


@pytest.mark.parametrize("action,patience", [("stop", 1), ("stop", 2), ("revert", 1), ("rollback", 1)])
def test_action_at_the_crossing_keeps_the_adapter_below_the_threshold(setup, warned, action, patience):
    model_dir, root = setup
    points = store.read_rows(warned[3] / "monitor.jsonl", schema.MonitorPoint)
    threshold = _crossing(points)
    acts_at, kept = _expected(points, threshold, action, patience)
    if patience == 2:
        assert acts_at > _expected(points, threshold, action, 1)[0]  # it waits for a second measurement above
    trainer, callback, _, out = train(setup, f"{action}-{patience}", action=action, threshold=threshold,
                                      patience=patience)
    assert trainer.state.global_step == acts_at
    series = store.read_rows(out / "monitor.jsonl", schema.MonitorPoint)
    # the same training up to the step that acts: the same series as the unwatched run
    assert [(p.step, p.kl_mean) for p in series] == [(p.step, p.kl_mean) for p in points if p.step <= acts_at]
    assert [p.above for p in series] == [p.kl_mean > threshold for p in series]
    assert [e["step"] for e in trainer.state.log_history if "drift/kl_to_base" in e] == [p.step for p in series]
    intervention = callback.intervention
    assert (intervention.action, intervention.kept_step, intervention.threshold) == (action, kept, threshold)
    kept_kl = 0.0 if kept == 0 else next(p.kl_mean for p in points if p.step == kept)
    assert intervention.kept_kl == kept_kl
    # The saved adapter is the kept one: re-measured from disk by lorawatch's own path it is below the threshold
    # at the value the series recorded, and it is what the model holds, so the Trainer's final save holds it.
    measured = lorawatch_measure(model_dir, root / "data" / "reference.json", out / KEPT_ADAPTER)
    assert measured["kl_mean"] < threshold
    assert measured["kl_mean"] == pytest.approx(kept_kl, abs=1e-5)
    trainer.save_model(str(out / "final"))
    saved, final = load_file(out / KEPT_ADAPTER / ADAPTER_FILE), load_file(out / "final" / ADAPTER_FILE)
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)


@pytest.mark.parametrize("route", ["answer", "generation"])
def test_drift_equals_lorawatch_measurement_of_the_same_adapter(setup, warned, route):
    model_dir, root = setup
    last = store.read_rows(warned[3] / "monitor.jsonl", schema.MonitorPoint)[-1]
    measured = lorawatch_measure(model_dir, root / "data" / "reference.json", warned[3] / "final", route)
    for name in ("kl_mean", "entropy_mean", "margin_mean"):
        assert getattr(last, name) == pytest.approx(measured[name], abs=1e-5), name


def test_trl_sft_trainer(setup):
    trl = pytest.importorskip("trl", reason="TRL is an optional extra: pip install lorawatch[trl]")
    from datasets import Dataset

    model_dir, root = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = json.loads((root / "data" / "mc_train.json").read_text())
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["answer"]} for r in rows])
    callback = DriftMonitorCallback(tokenizer, root / "data" / "reference.json", every=2)
    args = trl.SFTConfig(output_dir=str(root / "trl"), max_steps=4, per_device_train_batch_size=2, learning_rate=2e-2,
                         use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, max_length=128)
    trainer = trl.SFTTrainer(model=lora_model(model_dir), args=args, train_dataset=dataset, processing_class=tokenizer)
    callback.attach(trainer)
    trainer.train()
    series = store.read_rows(root / "trl" / "monitor.jsonl", schema.MonitorPoint)
    assert [p.step for p in series] == [2, 4] and all(p.kl_mean > 0 for p in series)
    assert [e["step"] for e in trainer.state.log_history if "drift/kl_to_base" in e] == [2, 4]


def test_bad_settings_and_models_are_refused(setup):
    model_dir, root = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(ConfigError, match="action 'stop' needs a threshold"):
        DriftMonitorCallback(tokenizer, every=2, action="stop")
    with pytest.raises(ConfigError, match="field 'every'"):
        DriftMonitorCallback(tokenizer, every=0)
    (root / "bad.json").write_text(json.dumps([{"prompt": "no answer"}]))
    with pytest.raises(DataError, match="row 1: missing 'answer'"):
        DriftMonitorCallback(tokenizer, root / "bad.json")
    callback = DriftMonitorCallback(tokenizer, root / "data" / "reference.json")
    args = TrainingArguments(output_dir=str(root / "plain"), max_steps=1, use_cpu=True, report_to=[],
                             save_strategy="no")
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                      train_dataset=train_rows(tokenizer, root / "data"), data_collator=collate(0),
                      callbacks=[callback])
    with pytest.raises(UserError, match="train a PEFT model"):
        trainer.train()


def test_callback_watches_another_signal(setup):
    """signal='kl_forward': the forward KL is measured, logged and recorded beside the KL, and the threshold
    applies to it: a threshold under its first measurement sets `stop` off there."""
    trainer, callback, reporter, out = train(setup, "forward", signal="kl_forward")
    series = store.read_rows(out / "monitor.jsonl", schema.MonitorPoint)
    assert all(p.signal_value is not None and p.signal_value > 0 for p in series)
    assert [e["drift/kl_forward"] for e in trainer.state.log_history if "drift/kl_forward" in e] == \
        [p.signal_value for p in series]
    first = series[0].signal_value
    trainer, callback, reporter, out = train(setup, "forward-stop", signal="kl_forward", action="stop",
                                             threshold=first / 2)
    assert callback.intervention.signal == "kl_forward" and callback.intervention.step == series[0].step
    assert callback.intervention.value == pytest.approx(first, rel=1e-4)


def test_callback_watches_a_span_signal(setup):
    """signal='answer_drop': the base model's own first answer tokens are generated when training begins, and the
    fall of their probability is measured at each step (with the adapter on and off); the threshold applies to it.
    A span length outside 1..64 is refused in one line."""
    trainer, callback, reporter, out = train(setup, "answer", signal="answer_drop", span_tokens=3)
    assert callback._span and all(0 < len(tokens) <= 3 for _, _, tokens in callback._span)
    assert {span for span, _, _ in callback._span} == {"answer", "gold"}
    series = store.read_rows(out / "monitor.jsonl", schema.MonitorPoint)
    assert all(p.signal_value is not None for p in series)
    assert all(p.signals["kl_answer"] > 0 for p in series)  # the adapter moved the answers' distributions
    moved = max(series, key=lambda p: p.signal_value)
    trainer, callback, reporter, out = train(setup, "answer-stop", signal="answer_drop", span_tokens=3,
                                             action="stop", threshold=moved.signal_value / 2)
    assert callback.intervention.signal == "answer_drop"
    assert callback.intervention.value > moved.signal_value / 2
    with pytest.raises(ConfigError, match="span_tokens must be an integer from 1 to 64"):
        DriftMonitorCallback(AutoTokenizer.from_pretrained(setup[0]), signal="kl_gold", span_tokens=0)
