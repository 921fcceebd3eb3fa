"""lorawatch's drift monitor in a plain transformers Trainer run: SmolLM2-135M-Instruct, LoRA, 40 rows of the
built-in arithmetic task, on a CPU. See docs/own-finetune-callback.md."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from lorawatch.callback import DriftMonitorCallback
from lorawatch.models import load_model
from lorawatch.prompts import encode_train_example, user_message
from lorawatch.tasks.builtin import builtin_task
from lorawatch.tasks.scoring import training_target

loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
tokenizer = loaded.tokenizer
torch.manual_seed(0)  # LoRA's A matrices
model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))

# Your data goes here: rows of input_ids and labels (-100 on the prompt). These are chat turns of a built-in task.
task = builtin_task("arithmetic", 40, 0)
rows = [encode_train_example(tokenizer, user_message(task.instruction, e.prompt), training_target(task.kind, e.answer),
                             256) for e in task.train]
train = [{"input_ids": list(r.input_ids), "labels": list(r.labels)} for r in rows]

# The built-in reference set (24 rows), measured every 2 steps; stop once KL to base is above 0.5.
monitor = DriftMonitorCallback(tokenizer, every=2, action="stop", threshold=0.5)
args = TrainingArguments(output_dir="runs/trainer-callback", max_steps=16, per_device_train_batch_size=4,
                         learning_rate=2e-4, lr_scheduler_type="constant", save_strategy="no", report_to="none",
                         use_cpu=True, disable_tqdm=True, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=train,
                  data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
monitor.attach(trainer)  # ahead of the report_to callbacks, so that they receive drift/* too
trainer.train()
trainer.save_model()  # after a stop: the adapter of the last measurement below the threshold

watch = monitor.stage_monitor
print(f"KL to base at the start {monitor.start_kl:.4f}; threshold {watch.threshold}; {len(watch.series)} "
      f"measurements took {watch.seconds:.1f} s")
for p in watch.series:
    print(f"step {p['step']:>2}  KL {p['kl_mean']:.4f}  entropy {p['entropy_mean']:.3f}  margin {p['margin_mean']:.3f}"
          f"  loss {p['train_loss']:.3f}" + ("  above" if p["above"] else ""))
print(monitor.intervention)
