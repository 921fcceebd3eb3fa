import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorawatch.engine.passes import left_pad
from lorawatch.data.prompts import PLAIN_PROMPT, encode_prompt, encode_train_example, render_answer, render_prompt
from lorawatch.engine.drift import ExampleDrift, answer_logprobs, per_example_drift, summarize


def load(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer


def test_chat_template_rendering_and_answer_only_labels(tiny_model_dir):
    _, tokenizer = load(tiny_model_dir)
    prompt = render_prompt(tokenizer, "Question: 2+2?")
    assert prompt == "<|im_start|>user\nQuestion: 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_answer(tokenizer, "Question: 2+2?", "4") == "4<|im_end|>\n"
    encoded = encode_train_example(tokenizer, "Question: 2+2?", "4", max_length=512)
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert all(label == -100 for label in encoded.labels[:prompt_len])
    answer = [t for t in encoded.labels if t != -100]
    assert tokenizer.decode(answer) == "4<|im_end|>\n"
    assert list(encoded.input_ids[prompt_len:]) == answer


def test_plain_format_without_chat_template(tiny_plain_model_dir):
    _, tokenizer = load(tiny_plain_model_dir)
    assert render_prompt(tokenizer, "Q") == PLAIN_PROMPT.format(message="Q")
    assert render_answer(tokenizer, "Q", "B") == "B" + tokenizer.eos_token


def test_truncation_keeps_the_end(tiny_model_dir):
    _, tokenizer = load(tiny_model_dir)
    long_message = "word " * 400 + "Question: which?"
    encoded = encode_train_example(tokenizer, long_message, "A", max_length=64)
    assert len(encoded.input_ids) == 64 and encoded.labels[-2:] != (-100, -100)
    prompt = encode_prompt(tokenizer, "x", long_message, max_length=32)
    assert len(prompt.input_ids) == 32
    assert tokenizer.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")


def test_row_statistics_do_not_depend_on_the_batch(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    messages = ["A short one", "A much longer prompt with many more words in it to force padding " * 3,
                "Medium length prompt here", "x"]
    prompts = [encode_prompt(tokenizer, f"r{i}", m, 512) for i, m in enumerate(messages)]
    _, together = answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, token_budget=100000, device="cpu")
    for i, prompt in enumerate(prompts):
        _, alone = answer_logprobs(model, [prompt], pad_id=tokenizer.pad_token_id, token_budget=1, device="cpu")
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)
        # and it is the distribution after the row's own last token, computed without any padding
        direct = model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1].float().log_softmax(-1)
        torch.testing.assert_close(alone[0], direct, atol=1e-5, rtol=1e-5)
    # the published reading (index mask.sum - 1 of a left-padded batch) lands elsewhere for short rows
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    published_index = mask.sum(1) - 1
    assert (published_index < ids.shape[1] - 1).sum() == 3


def test_drift_statistics(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompts = [encode_prompt(tokenizer, f"r{i}", m, 512) for i, m in enumerate(["a b", "c d e", "f"])]
    ids, base = answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, token_budget=100000, device="cpu")
    same = per_example_drift(ids, [None] * 3, base, base)
    assert all(d.kl == 0.0 for d in same)
    shifted = torch.log_softmax(base * 2.0, dim=-1)  # a sharper distribution
    drift = per_example_drift(ids, [None] * 3, shifted, base)
    # the oracles are torch's own KL divergence and entropy, not a retyping of the formula
    expected_kl = torch.nn.functional.kl_div(base, shifted, log_target=True, reduction="none").sum(-1)
    expected_entropy = torch.distributions.Categorical(logits=shifted).entropy()
    for d, row, kl, entropy in zip(drift, shifted, expected_kl, expected_entropy, strict=True):
        assert d.kl == pytest.approx(float(kl), abs=1e-6) and d.kl > 0
        assert d.entropy == pytest.approx(float(entropy), abs=1e-5)
        top = row.topk(2).values
        assert abs(d.margin - float(top[0] - top[1])) < 1e-6


def test_drift_on_a_three_token_distribution_by_hand():
    """p = (1/2, 1/4, 1/4) against a uniform base: KL = ½ ln(3/2) + ½ ln(3/4) = ½ ln(9/8), entropy = (3/2) ln 2,
    margin = ln(1/2) − ln(1/4) = ln 2; the same row against itself drifts 0."""
    p = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]).log()
    uniform = torch.full((2, 3), 1 / 3).log()
    moved, still = per_example_drift(["a", "b"], ["t", None], p, torch.stack([uniform[0], p[1]]))
    assert moved.kl == pytest.approx(0.5 * math.log(9 / 8), abs=1e-7) and still.kl == pytest.approx(0.0, abs=1e-7)
    assert moved.entropy == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert moved.margin == pytest.approx(math.log(2), abs=1e-6) and moved.top1_token == 0
    assert (moved.id, moved.task, still.task) == ("a", "t", None)


def test_summary_is_mean_and_percentiles_over_the_rows():
    """Three rows with KL 0, 1 and 5: the mean 2; p10 and p95 by linear interpolation between the sorted rows
    (p10 at position 0.2: 0.2; p95 at position 1.9: 1 + 0.9 × 4 = 4.6), which here puts the mean inside."""
    rows = [ExampleDrift(f"r{i}", None, kl, 1.0, 0.5, 0) for i, kl in enumerate([5.0, 0.0, 1.0])]
    stats = summarize(rows)
    assert stats["kl_mean"] == pytest.approx(2.0)
    assert stats["kl_p10"] == pytest.approx(0.2) and stats["kl_p95"] == pytest.approx(4.6)
    assert stats["entropy_p10"] == stats["entropy_mean"] == stats["entropy_p95"] == 1.0
    assert stats["margin_mean"] == 0.5


def test_published_position_reading_differs_only_for_padded_rows(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    messages = ["short", "a much longer prompt with many more words in it", "mid length one", "x y"]
    prompts = [encode_prompt(tokenizer, f"r{i}", m, 512) for i, m in enumerate(messages)]
    _, correct = answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, token_budget=100000, device="cpu")
    _, published = answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, token_budget=100000, device="cpu",
                                   position="published")
    longest = max(range(4), key=lambda i: len(prompts[i].input_ids))
    torch.testing.assert_close(published[longest], correct[longest], atol=1e-5, rtol=1e-5)
    for i in set(range(4)) - {longest}:
        assert not torch.allclose(published[i], correct[i], atol=1e-3)
