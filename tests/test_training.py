"""The training loop pinned to the paper's published implementation: constant rate, each
micro-batch's mean loss over the accumulation count, and a last step on a short final window."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorawatch.data.prompts import encode_train_example
from lorawatch.recipe.training import TrainParams, _collate, train_stage

ANSWERS = ["A", "42", "The committee held rates", "B", "7 apples and 5 pears", "C", "100"]


def _setup(model_dir, rows: int):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    # answers of different lengths, so that the two loss weightings differ
    examples = [encode_train_example(tokenizer, f"Question {i}: what is it?", ANSWERS[i % len(ANSWERS)], 512)
                for i in range(rows)]
    return tokenizer, model, examples


def _params(**changes) -> TrainParams:
    values = dict(learning_rate=1e-3, batch_size=2, grad_accum=4, epochs=1, max_grad_norm=1.0, weight_decay=0.0)
    values.update(changes)
    return TrainParams(**values)


@pytest.mark.parametrize("scheduler, expected", [
    ("constant", [1e-3, 1e-3, 1e-3]),
    ("linear", [1e-3, 1e-3 * 2 / 3, 1e-3 / 3]),
])
def test_steps_and_learning_rates_for_an_uneven_row_count(tiny_model_dir, scheduler, expected):
    # 21 rows, batch 2 -> 11 micro-batches; accumulation 4 -> windows of 4, 4 and 3: the leftover gets a step
    tokenizer, model, examples = _setup(tiny_model_dir, 21)
    log = train_stage(model, examples, _params(lr_scheduler=scheduler), seed=5, pad_id=tokenizer.pad_token_id,
                      device="cpu")
    assert (log.optimizer_steps, log.micro_batches) == (3, 11)
    assert log.learning_rates == pytest.approx(expected, rel=1e-12)


def test_the_published_paper_size_gives_32_steps(tiny_model_dir):
    # The paper's size: 500 rows -> 250 micro-batches -> 32 steps (31 full windows and a leftover)
    tokenizer, model, examples = _setup(tiny_model_dir, 500)
    seen = []
    train_stage(model, examples[:500], _params(grad_accum=8, learning_rate=1e-9), seed=1,
                pad_id=tokenizer.pad_token_id, device="cpu",
                on_step=lambda step, total, loss: seen.append((step, total)) and False)
    assert seen[-1] == (32, 32) and len(seen) == 32


def _first_window(examples, params: TrainParams, seed: int):
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [[examples[i] for i in order[b:b + params.batch_size]] for b in range(0, len(order), params.batch_size)]
    return batches[:params.grad_accum]


@pytest.mark.parametrize("weighting", ["micro_batch", "tokens"])
def test_one_accumulation_window_weighted_both_ways(tiny_model_dir, weighting):
    tokenizer, model, examples = _setup(tiny_model_dir, 8)
    params = _params(loss_weighting=weighting, max_grad_norm=None)
    reference = copy.deepcopy(model)

    # The gradient and loss of the first window, computed here with the model's own (mean) loss.
    window = _first_window(examples, params, seed=9)
    reference.train()
    token_losses, means, counts = [], [], []
    for batch in window:
        inputs = _collate(batch, tokenizer.pad_token_id, "cpu")
        out = reference(**inputs)  # transformers' loss: the mean over this micro-batch's answer tokens
        count = int((inputs["labels"][:, 1:] != -100).sum())
        means.append(out.loss)
        counts.append(count)
        token_losses.append(out.loss * count)
    if weighting == "micro_batch":
        loss = sum(means) / params.grad_accum  # the published weighting
        logged = sum(m.item() for m in means) / len(means)
    else:
        loss = sum(token_losses) / sum(counts)
        logged = loss.item()
    loss.backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
    assert len(set(counts)) > 1  # micro-batches of different answer lengths: the weightings differ

    # The gradient train_stage accumulates over the same window (8 rows: its only one), before the step.
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(param):
            captured[name] = param.grad.clone()  # the last call holds the whole window's sum
        return record

    handles = [p.register_post_accumulate_grad_hook(hook(n)) for n, p in model.named_parameters() if p.requires_grad]
    log = train_stage(model, examples, params, seed=9, pad_id=tokenizer.pad_token_id, device="cpu")
    for handle in handles:
        handle.remove()
    assert log.optimizer_steps == 1
    assert log.step_losses[0] == pytest.approx(logged, rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-4, atol=1e-7)
