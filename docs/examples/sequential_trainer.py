"""Sequential LoRA fine-tuning the way most people do it, with a plain transformers Trainer, watched by lorawatch:
its drift monitor while each task trains, then `lorawatch evaluate` on the adapters it saved.

SmolLM2-135M-Instruct on a CPU; the demo's three built-in tasks (stance -> science -> arithmetic, 40 training rows
each, seen twice); one cumulative LoRA adapter, saved after each task. See docs/own-finetune.md.

    .venv/bin/python docs/examples/sequential_trainer.py runs/sequential
    .venv/bin/lorawatch evaluate runs/sequential/stance runs/sequential/science runs/sequential/arithmetic \
        --preset demo --trained-on stance,science,arithmetic --seed 33 --out runs/sequential-evaluated
"""

import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from lorawatch.callback import DriftMonitorCallback
from lorawatch.inputs import load_data
from lorawatch.models import load_model
from lorawatch.presets import preset
from lorawatch.prompts import encode_train_example, user_message
from lorawatch.tasks.scoring import training_target

out = sys.argv[1] if len(sys.argv) > 1 else "runs/sequential"
tasks = load_data(preset("demo")).tasks  # your own data goes here: rows of a prompt and an answer, per task
loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
tokenizer = loaded.tokenizer
torch.manual_seed(33)  # LoRA's A matrices
model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))

for task in tasks:
    rows = [encode_train_example(tokenizer, user_message(task.instruction, e.prompt),
                                 training_target(task.kind, e.answer), 512) for e in task.train]
    train = [{"input_ids": list(r.input_ids), "labels": list(r.labels)} for r in rows]
    # KL to base on the built-in reference set every 5 steps; `warn` only reports (stop/revert/rollback act).
    monitor = DriftMonitorCallback(tokenizer, every=5, action="warn", threshold=0.5)
    args = TrainingArguments(output_dir=f"{out}/{task.name}", num_train_epochs=2, per_device_train_batch_size=4,
                             learning_rate=5e-4, lr_scheduler_type="constant", save_strategy="no", report_to="none",
                             logging_steps=5, use_cpu=True, disable_tqdm=True, seed=33)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    monitor.attach(trainer)
    trainer.train()
    trainer.save_model()  # the cumulative adapter after this task: <out>/<task>/adapter_model.safetensors
    series = " ".join(f"{p['step']}:{p['kl_mean']:.3f}" for p in monitor.stage_monitor.series)
    print(f"{task.name}: KL to base by step {series}")
