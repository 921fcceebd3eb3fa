"""Drift over the first answer tokens (engine/span_drift.py): which tokens are read, the teacher-forced pass against
an unpadded by-hand forward pass, the per-row averages against by-hand values on constructed distributions, and a
real (tiny) run's span_drift.jsonl against a by-hand recomputation through PEFT with the adapter on and off."""

import math

import pytest
import torch

from lorawatch.data.prompts import EncodedPrompt
from lorawatch.engine.span_drift import measure_span_drift, span_drift_rows, span_logprobs, span_tokens


def prompt(pid: str, ids: list[int], answer: list[int] | None) -> EncodedPrompt:
    return EncodedPrompt(id=pid, input_ids=ids, answer_ids=answer)


def test_the_answer_spans_come_first_cut_to_k_and_rows_without_tokens_are_left_out():
    prompts = [prompt("a", [1, 2], [7, 8, 9]), prompt("b", [3], None), prompt("c", [4, 5], [6])]
    rows = span_tokens(prompts, {"a": [11, 12, 13], "b": [], "c": [14]}, 2)
    assert [(span, p.id, tokens) for span, p, tokens in rows] == [
        ("answer", "a", [11, 12]), ("answer", "c", [14]), ("gold", "a", [7, 8]), ("gold", "c", [6])]
    assert span_tokens(prompts, {}, 2) == [r for r in rows if r[0] == "gold"]  # no base answers yet


def logprobs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def test_a_rows_statistics_are_the_means_over_its_positions():
    # two positions: at the first the models agree (a tie for second place, and a token neither gives mass); at
    # the second the checkpoint moved its top token and the teacher-forced token (2) lost probability
    ours = logprobs([0.6, 0.2, 0.2, 0.0], [0.7, 0.1, 0.2, 0.0])
    base = logprobs([0.6, 0.2, 0.2, 0.0], [0.2, 0.2, 0.6, 0.0])
    rows = [("gold", prompt("r", [1], [0, 2]), [0, 2])]
    [row] = span_drift_rows(rows, {"r": "stance"}, [ours], [base])
    kl_second = 0.7 * math.log(0.7 / 0.2) + 0.1 * math.log(0.1 / 0.2) + 0.2 * math.log(0.2 / 0.6)
    forward_second = 0.2 * math.log(0.2 / 0.7) + 0.2 * math.log(0.2 / 0.1) + 0.6 * math.log(0.6 / 0.2)
    assert (row.id, row.task, row.span, row.tokens) == ("r", "stance", "gold", 2)
    assert row.kl == pytest.approx(kl_second / 2, rel=1e-6)
    assert row.kl_forward == pytest.approx(forward_second / 2, rel=1e-6)
    assert row.same_top1 == 0.5  # agrees at the first position only
    assert row.dp_token == pytest.approx((0.0 + (0.2 - 0.6)) / 2, abs=1e-7)
    assert row.top5_overlap == 1.0  # a vocabulary of four: every token in both top-k sets
    # identical rows, with a near-zero probability: no drift at any position
    same = logprobs([1 - 1e-30, 1e-30, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25])
    [row] = span_drift_rows([("answer", prompt("s", [1], None), [0, 3])], {}, [same], [same.clone()])
    assert (row.kl, row.kl_forward, row.same_top1, row.top5_overlap, row.dp_token) == (0.0, 0.0, 1.0, 1.0, 0.0)
    assert row.task is None


def test_the_teacher_forced_pass_does_not_depend_on_its_batch(tiny_model_dir):
    """Rows of different lengths in one left-padded batch give each row's distributions of an unpadded pass of its
    own: prompt + answer[:-1], the last len(answer) positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [("answer", prompt("a", [5, 6, 7, 8, 9, 10], None), [11, 12, 13]),
            ("gold", prompt("b", [5, 6], None), [14]),
            ("gold", prompt("c", [20, 21, 22], None), [23, 24])]
    batched = span_logprobs(model, rows, pad_id=0, device="cpu", token_budget=10_000)
    for (_, p, tokens), got in zip(rows, batched):
        ids = torch.tensor([p.input_ids + tokens[:-1]])
        alone = torch.log_softmax(model(input_ids=ids).logits[0, -len(tokens):].float(), dim=-1)
        assert got.shape == alone.shape
        assert torch.allclose(got, alone, atol=1e-5)


def test_a_run_records_the_span_drift_of_every_trained_stage(tiny_trained_run, tiny_model_dir):
    """The span rows of a real run: the base model's own first answer tokens (stage 0's predictions) and the gold
    ones, each row's KL the mean over its positions of a by-hand KL between the checkpoint and the base (the PEFT
    adapter switched off), each unpadded; none at stage 0; k = 1 reads the headline's answer position."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorawatch.data.inputs import encode, load_data
    from lorawatch.rundir.layout import RunFolder

    folder, _, config = tiny_trained_run
    k = config.reference.span_tokens
    assert k == 8  # the default
    run = RunFolder(folder)
    seed = config.seeds[0]
    assert not run.stage(seed, 0).span_drift.exists()
    data = load_data(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = {p.id: p for p in encode(data, tokenizer, config.train.max_length).reference}
    base_answers = {r.id: r.output_ids for r in run.stage(seed, 0).predictions("reference").read()}
    for stage in (1, 2):
        rows = run.stage(seed, stage).span_drift.read()
        assert [r.span for r in rows] == ["answer"] * len(data.reference) + ["gold"] * len(data.reference)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          run.stage(seed, stage).adapter).eval()
        for row in rows:
            p = encoded[row.id]
            tokens = list(base_answers[row.id] if row.span == "answer" else p.answer_ids)[:k]
            assert row.tokens == len(tokens) and row.task == next(e.task for e in data.reference if e.id == row.id)
            ids = torch.tensor([list(p.input_ids) + tokens[:-1]])
            with torch.no_grad():
                ours = torch.log_softmax(model(input_ids=ids).logits[0, -len(tokens):].double(), dim=-1)
                with model.disable_adapter():
                    base = torch.log_softmax(model(input_ids=ids).logits[0, -len(tokens):].double(), dim=-1)
            kl = (ours.exp() * (ours - base)).sum(-1)
            picked = torch.tensor(tokens)
            dp = ours.exp()[torch.arange(len(tokens)), picked] - base.exp()[torch.arange(len(tokens)), picked]
            assert row.kl == pytest.approx(float(kl.mean()), abs=1e-5)
            assert row.dp_token == pytest.approx(float(dp.mean()), abs=1e-6)
            assert row.same_top1 == pytest.approx(float((ours.argmax(-1) == base.argmax(-1)).double().mean()))
        assert sum(r.kl for r in rows) > 0
        # k = 1: the answer span's only position is the headline's answer position
        first = measure_span_drift(model, span_tokens(list(encoded.values()), base_answers, 1),
                                   {e.id: e.task for e in data.reference}, pad_id=tokenizer.pad_token_id,
                                   device="cpu", token_budget=8192)
        headline = {r.id: r.kl for r in run.stage(seed, stage).drift.read()}
        answers = [row for row in first if row.span == "answer"]
        assert len(answers) == len(headline)
        for row in answers:
            assert row.kl == pytest.approx(headline[row.id], abs=1e-5)


def test_span_tokens_zero_turns_it_off_and_a_span_signal_then_is_refused(tiny_model_dir, tmp_path):
    from tiny import tiny_config, write_task_files

    from lorawatch.config import ExperimentConfig
    from lorawatch.recipe.run import run_experiment
    from lorawatch.rundir.layout import RunFolder

    write_task_files(tmp_path / "data")
    config = tiny_config(tiny_model_dir, tmp_path / "data", seeds=(3,))
    off = ExperimentConfig.model_validate({**config.model_dump(mode="json"),
                                           "reference": {**config.reference.model_dump(), "span_tokens": 0}})
    folder = run_experiment(off, tmp_path / "run")
    assert RunFolder(folder).stage(3, 1).drift.exists() and not RunFolder(folder).stage(3, 1).span_drift.exists()
    with pytest.raises(ValueError, match="monitor.signal 'kl_answer' reads the drift over the first answer tokens"):
        ExperimentConfig.model_validate({**off.model_dump(mode="json"),
                                         "monitor": {"signal": "kl_answer", "threshold": 1.0}})
