"""One stage of LoRA supervised fine-tuning: loss on answer tokens only, a fresh AdamW per stage.

The adapter is the one the model already carries (one cumulative adapter across the task sequence);
this module only updates its weights. Shuffling and dropout are seeded by the caller's `seed`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lorawatch.errors import UserError
from lorawatch.data.prompts import EncodedTrainExample
from lorawatch.rundir.schema import TrainingLog


class GapDropout(torch.nn.Module):
    """Dropout with the same law as torch's (each element zeroed independently with probability p, the rest
    scaled by 1/(1-p)), drawn cheaply: the dropped positions of a Bernoulli(p) sequence are sampled through
    their geometric gaps, about p*n random numbers instead of n. PEFT's LoRA dropout runs on the input of every
    adapted layer, and on a CPU torch's per-element draw took a quarter of a training step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n = x.numel()
        expected = n * self.p
        count = int(expected + 6 * math.sqrt(expected * (1 - self.p)) + 16)
        positions = torch.empty(count, dtype=torch.float64, device=x.device).geometric_(self.p).cumsum(0) - 1
        while positions[-1] < n:  # not enough gaps drawn (probability ~1e-9): draw more
            more = torch.empty(count, dtype=torch.float64, device=x.device).geometric_(self.p).cumsum(0)
            positions = torch.cat([positions, positions[-1] + more])
        positions = positions[positions < n].long()
        out = x * (1.0 / (1.0 - self.p))
        out.view(-1)[positions] = 0.0  # in place is safe: the product's backward does not read its output
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_gap_dropout(model: torch.nn.Module) -> int:
    """On a CPU, replace the LoRA layers' torch Dropout modules by GapDropout (same p); returns how many were
    replaced. Elsewhere torch's own dropout stays: GapDropout draws in float64 (which MPS lacks) and checks its
    draw on the host, a synchronisation per LoRA layer on a GPU, where torch's per-element draw is cheap anyway."""
    if next(model.parameters()).device.type != "cpu":
        return 0
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    dropouts[name] = GapDropout(dropout.p)
                    replaced += 1
    return replaced


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the settings make training numerically impossible."""


def training_seed(run_seed: int, stage: int) -> int:
    """The seed of a stage's shuffling and dropout (and of what a strategy draws for it)."""
    return run_seed * 1000 + stage


@dataclass(frozen=True)
class TrainParams:
    learning_rate: float
    batch_size: int
    grad_accum: int
    epochs: int
    max_grad_norm: float | None
    weight_decay: float
    lr_scheduler: str = "constant"  # "constant" (the published loop) | "linear" (decay to zero)
    loss_weighting: str = "micro_batch"  # "micro_batch" (the published loop) | "tokens"


def _collate(batch: Sequence[EncodedTrainExample], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    # Right padding: training positions then start at 0 for every row, as in the model's pre-training.
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# An added loss term: (model, inputs, predicts, logits) -> a sum over the micro-batch's answer tokens, on the footing
# of the summed cross-entropy, so that the loss weighting treats it exactly as it treats the task loss. `predicts`
# marks the positions that predict an answer token, `logits` are those positions' logits ([answer tokens, vocab]).
ExtraLoss = Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def answer_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cross-entropy summed over a collated batch's answer tokens (`inputs` loses its labels), with the
    positions that predict an answer token and their logits."""
    labels = inputs.pop("labels")
    # Logits only where an answer token is predicted: the vocabulary projection of the prompt
    # positions (most of each row) would be computed and thrown away.
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    logits = model(**inputs, logits_to_keep=predicts).logits  # [answer tokens, vocab]
    loss_sum = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][predicts[:, :-1]], reduction="sum")
    return loss_sum, predicts, logits


def _answer_token_count(batch: Sequence[EncodedTrainExample]) -> int:
    # Labels are shifted by one inside the loss, so the first label of a row is never predicted.
    return sum(sum(1 for label in e.labels[1:] if label != -100) for e in batch)


def train_stage(
    model: torch.nn.Module,
    examples: Sequence[EncodedTrainExample],
    params: TrainParams,
    *,
    seed: int,
    pad_id: int,
    device: str,
    on_micro_batch: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, float], bool] | None = None,
    extra_loss: ExtraLoss | None = None,
) -> TrainingLog:
    """Train the model's trainable (LoRA) parameters on `examples` for `params.epochs` epochs.

    The published implementation's loop is the default: each micro-batch's mean answer-token loss
    divided by `grad_accum` (`loss_weighting="micro_batch"`), a constant learning rate, and a last clipped
    step on whatever a short final window accumulated (500 rows, batch 2, accumulation 8 -> 32 steps).
    `loss_weighting="tokens"` makes a step's loss the mean over all answer tokens of its window instead, so
    short and long answers weigh the same whichever micro-batch they land in.
    `on_micro_batch(done, total)` reports progress in examples. `on_step(step, total_steps, loss)` runs after
    every optimizer step; when it returns True the stage ends there (the drift monitor's stop).
    `extra_loss` (a strategy's added term) is weighted like the task loss; `step_losses` stay the task loss alone,
    the term's share of each step goes to `extra_losses`.
    """
    log = TrainingLog.begin(extra_losses=extra_loss is not None)
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks

    batches_per_epoch = math.ceil(len(examples) / params.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / params.grad_accum)
    total_steps = steps_per_epoch * params.epochs
    if params.lr_scheduler == "linear":
        schedule = lambda step: max(0.0, 1.0 - step / total_steps)  # noqa: E731
    else:
        schedule = lambda step: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    model.train()
    done = 0
    total = len(examples) * params.epochs
    for _ in range(params.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        batches = [[examples[i] for i in order[b:b + params.batch_size]]
                   for b in range(0, len(order), params.batch_size)]
        for window_start in range(0, len(batches), params.grad_accum):
            window = batches[window_start:window_start + params.grad_accum]
            window_tokens = sum(_answer_token_count(b) for b in window)
            if window_tokens == 0:
                continue  # every answer was truncated away; nothing to learn from this window
            window_loss = 0.0  # what is logged: the mean answer-token loss, as weighted for the gradient
            window_extra = 0.0
            for batch in window:
                inputs = _collate(batch, pad_id, device)
                loss_sum, predicts, logits = answer_loss(model, inputs)
                batch_tokens = _answer_token_count(batch)
                if params.loss_weighting == "tokens":
                    scale = window_tokens
                    loss = loss_sum / scale
                    window_loss += loss.item()
                elif batch_tokens:
                    # The published loop: this micro-batch's mean, over the full accumulation count (also in a
                    # short last window); the logged value is the mean of the window's micro-batch means.
                    scale = batch_tokens * params.grad_accum
                    loss = loss_sum / scale
                    window_loss += loss.item() * params.grad_accum / len(window)
                else:
                    loss = None  # no answer token left in this micro-batch: no loss, as in a mean over nothing
                if loss is not None:
                    if extra_loss is not None:
                        term = extra_loss(model, inputs, predicts, logits) / scale
                        window_extra += term.item()
                        loss = loss + term
                    loss.backward()
                log.micro_batches += 1
                log.total_tokens += int(inputs["attention_mask"].sum())
                done += len(batch)
                if on_micro_batch:
                    on_micro_batch(done, total)
            if params.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            # A non-finite loss or gradient would be stepped into the adapter and every later number: stop here,
            # before the step, so that nothing of the stage is saved as finished.
            if not (math.isfinite(window_loss) and math.isfinite(window_extra) and torch.isfinite(grad_norm)):
                what = "the loss" if not math.isfinite(window_loss) else (
                    "the strategy's added loss" if not math.isfinite(window_extra) else "the gradient norm")
                raise TrainingDiverged(f"training diverged at optimizer step {log.optimizer_steps + 1} of "
                                       f"{total_steps}: {what} is not finite (loss {window_loss:.4g}, gradient "
                                       f"norm {float(grad_norm):.4g}); lower train.learning_rate or the strategy's "
                                       "weight")
            log.learning_rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            log.optimizer_steps += 1
            log.answer_tokens += window_tokens
            log.step_losses.append(round(window_loss, 6))
            if log.extra_losses is not None:
                log.extra_losses.append(round(window_extra, 6))
            if on_step is not None and on_step(log.optimizer_steps, total_steps, window_loss):
                log.stopped_early = log.optimizer_steps < total_steps
                break
        if log.stopped_early:
            break
    model.eval()
    log.end(time.perf_counter() - start)
    return log
