"""The fast generation path gives greedy decoding's results: vs transformers' own generate one row at a time,
with good, wrong and partial drafts, and with the adapter merged for evaluation."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorawatch.engine.generation import FastPath, generate, merged_adapter, stop_token_ids
from lorawatch.engine.passes import budget_batches, prefill, shared_prefix_length
from lorawatch.rundir.schema import GenerationCounts
from lorawatch.data.prompts import encode_prompt
from lorawatch.engine.drift import answer_logprobs

MESSAGES = ["Question: 1?", "A longer question about stance and text?", "B", "Solve 3+4", "x y z w",
            "Which option: A, B or C?", "short", "the model keeps going here for a while"]


def load(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer


def prompts_for(tokenizer):
    return [encode_prompt(tokenizer, f"r{i}", m, 512) for i, m in enumerate(MESSAGES)]


def reference_one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    """transformers' generate, one unpadded row at a time: the plain path the fast one must match."""
    stops = stop_token_ids(tokenizer, model)
    out = {}
    for p in prompts:
        ids = torch.tensor([p.input_ids])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        tokens = new.tolist()
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        out[p.id] = tuple(tokens if cut is None else tokens[:cut + 1])
    return out


def add_stop_token(model, tokenizer, prompts, max_new_tokens):
    """The random tiny model never says EOS; make a token it produces mid-output a stop token so that rows
    finish at different steps."""
    outputs = reference_one_at_a_time(model, tokenizer, prompts, max_new_tokens).values()
    counts = {}
    for out in outputs:
        for t in set(out[1:-1]):
            counts[t] = counts.get(t, 0) + 1
    token = max(counts, key=lambda t: (0 < counts[t] < len(prompts), counts[t]))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, token]


def test_fast_generation_matches_one_row_at_a_time(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompts = prompts_for(tokenizer)
    add_stop_token(model, tokenizer, prompts, 10)
    expected = reference_one_at_a_time(model, tokenizer, prompts, 10)
    for budget in (64, 100000):  # one row per batch, and everything in one batch
        counters = GenerationCounts()
        got = generate(model, tokenizer, prompts, max_new_tokens=10, device="cpu", token_budget=budget,
                       counters=counters)
        assert {k: v.output_ids for k, v in got.items()} == expected
        assert counters.generated_tokens == sum(len(v) for v in expected.values())
        # finished rows leave the batch: never more row-steps than tokens needed
        assert counters.decode_steps == counters.generated_tokens
    lengths = {len(v) for v in expected.values()}
    assert len(lengths) > 1 and min(lengths) < 10  # rows did finish at different steps


def test_drafts_change_the_cost_never_the_result(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompts = prompts_for(tokenizer)
    add_stop_token(model, tokenizer, prompts, 12)
    expected = reference_one_at_a_time(model, tokenizer, prompts, 12)
    exact = {k: list(v) for k, v in expected.items()}
    wrong = {k: [(t + 7) % 50 + 3 for t in v] for k, v in expected.items()}
    partial = {k: list(v[:len(v) // 2]) + [5, 6, 7] for k, v in expected.items()}
    longer = {k: list(v) + [9] * 20 for k, v in expected.items()}
    for drafts in (exact, wrong, partial, longer):
        counters = GenerationCounts()
        got = generate(model, tokenizer, prompts, max_new_tokens=12, device="cpu", drafts=drafts, counters=counters)
        assert {k: v.output_ids for k, v in got.items()} == expected
    counters = GenerationCounts()
    generate(model, tokenizer, prompts, max_new_tokens=12, device="cpu", drafts=exact, counters=counters)
    assert counters.decode_steps == 0  # an exact draft needs no decoding step at all
    assert counters.accepted_draft_tokens >= counters.generated_tokens - len(prompts)


def test_first_logprobs_are_the_answer_position_distribution(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompts = prompts_for(tokenizer)
    _, reference = answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, token_budget=1, device="cpu")
    expected = reference_one_at_a_time(model, tokenizer, prompts, 6)
    for drafts in (None, {k: list(v) for k, v in expected.items()}):
        got = generate(model, tokenizer, prompts, max_new_tokens=6, device="cpu", drafts=drafts, first_logprobs=True)
        stacked = torch.stack([got[p.id].first_logprobs for p in prompts])
        torch.testing.assert_close(stacked, reference, atol=1e-4, rtol=1e-4)


def test_merged_adapter_evaluates_the_same_and_restores_the_weights(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # a trained-looking adapter, not the zero init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = prompts_for(tokenizer)
    plain = reference_one_at_a_time(model, tokenizer, prompts, 8)
    _, unmerged_lp = answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, token_budget=100000, device="cpu")
    with merged_adapter(model):
        got = generate(model, tokenizer, prompts, max_new_tokens=8, device="cpu", first_logprobs=True)
    assert {k: v.output_ids for k, v in got.items()} == plain
    torch.testing.assert_close(torch.stack([got[p.id].first_logprobs for p in prompts]), unmerged_lp,
                               atol=1e-4, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_budget_batches_respect_both_limits():
    lengths = [5, 50, 7, 30, 31, 6, 100]
    batches = budget_batches(lengths, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 64
    assert [len(b) for b in budget_batches([10] * 10, 1000, row_cost=lambda _: 30, cost_budget=90)] == [3, 3, 3, 1]
    assert [len(b) for b in budget_batches([10] * 10, 1000, max_rows=4)] == [4, 4, 2]


def test_batches_of_a_fixed_size_give_the_same_outputs(tiny_model_dir):
    """`batch_rows` (the plain baseline's batches of 4) caps every batch, pooled or not; outputs stay greedy's."""
    model, tokenizer = load(tiny_model_dir)
    prompts = prompts_for(tokenizer)
    add_stop_token(model, tokenizer, prompts, 10)
    expected = reference_one_at_a_time(model, tokenizer, prompts, 10)
    partial = {k: list(v[:3]) for k, v in expected.items()}
    rows_per_pass = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: rows_per_pass.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    for fast in (FastPath(), FastPath.plain()):
        rows_per_pass.clear()
        got = generate(model, tokenizer, prompts, max_new_tokens=10, device="cpu", batch_rows=3, drafts=partial,
                       fast=fast)
        assert {k: v.output_ids for k, v in got.items()} == expected
        assert max(rows_per_pass) == 3
    hook.remove()


def test_rows_share_their_common_prefix(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    preamble = "Please show your choice in the answer field with only the choice letter. Text follows:\n\n"
    prompts = [encode_prompt(tokenizer, f"r{i}", preamble + m, 512) for i, m in enumerate(MESSAGES)]
    assert shared_prefix_length([p.input_ids for p in prompts]) >= 15
    add_stop_token(model, tokenizer, prompts, 10)
    expected = reference_one_at_a_time(model, tokenizer, prompts, 10)
    shared, alone = GenerationCounts(), GenerationCounts()
    got = generate(model, tokenizer, prompts, max_new_tokens=10, device="cpu", counters=shared, first_logprobs=True)
    assert {k: v.output_ids for k, v in got.items()} == expected
    generate(model, tokenizer, prompts, max_new_tokens=10, device="cpu", token_budget=64, counters=alone)
    assert shared.forward_tokens < alone.forward_tokens  # the prefix was computed once, not per row
    _, reference = answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, token_budget=1, device="cpu")
    torch.testing.assert_close(torch.stack([got[p.id].first_logprobs for p in prompts]), reference,
                               atol=1e-4, rtol=1e-4)
    drafts = {k: list(v[:3]) for k, v in expected.items()}
    with_drafts = generate(model, tokenizer, prompts, max_new_tokens=10, device="cpu", drafts=drafts)
    assert {k: v.output_ids for k, v in with_drafts.items()} == expected


def test_duplicate_and_near_duplicate_prompts_in_one_batch(tiny_model_dir):
    # Rows that repeat a whole prompt (nothing forbids it; length-sorting puts them side by side) must not let the
    # shared prefix run into their drafts: the first token and the reference distribution are read after the prompt.
    model, tokenizer = load(tiny_model_dir)
    preamble = "Please show your choice in the answer field with only the choice letter. Text follows:\n\n"
    same = preamble + MESSAGES[1]
    messages = [same, same, same, same + "?", same + "!"]
    prompts = [encode_prompt(tokenizer, f"d{i}", m, 512) for i, m in enumerate(messages)]
    add_stop_token(model, tokenizer, prompts, 10)
    expected = reference_one_at_a_time(model, tokenizer, prompts, 10)
    _, reference = answer_logprobs(model, prompts, pad_id=tokenizer.pad_token_id, token_budget=1, device="cpu")
    for drafts in (None, {k: list(v) for k, v in expected.items()}, {k: list(v[:4]) for k, v in expected.items()}):
        for group in (prompts[:3], prompts):  # the exact duplicates alone in their batch, and with the near ones
            got = generate(model, tokenizer, group, max_new_tokens=10, device="cpu", drafts=drafts,
                           first_logprobs=True)
            assert {p.id: got[p.id].output_ids for p in group} == {p.id: expected[p.id] for p in group}
            torch.testing.assert_close(torch.stack([got[p.id].first_logprobs for p in group]),
                                       reference[:len(group)], atol=1e-4, rtol=1e-4)


def test_pooled_decoding_resynchronises_edited_drafts_exactly(tiny_model_dir):
    """Long outputs whose drafts were edited in the middle (a token changed, one inserted, one dropped), as a
    trained checkpoint's outputs differ from the previous one's: the pooled decoder continues each row from the
    draft pass's cache, looks its last tokens up in the draft after the edit, and checks what followed. Every
    output stays transformers' own, with the pool refilled through tight budgets and with everything at once,
    and with rows that have no draft in the same call."""
    model, tokenizer = load(tiny_model_dir)
    prompts = prompts_for(tokenizer)
    expected = reference_one_at_a_time(model, tokenizer, prompts, 40)
    edited = {}
    for i, (k, v) in enumerate(expected.items()):
        v, cut = list(v), 5 + i % 7
        edited[k] = (v[:cut] + [(v[cut] + 1) % 50 + 3] + v[cut + 1:] if i % 3 == 0 else
                     v[:cut] + [7] + v[cut:] if i % 3 == 1 else v[:cut] + v[cut + 1:])
    one_undrafted = {k: v for k, v in edited.items() if k != prompts[0].id}  # prefilled into the same pool
    for budget in (150, 600, 100000):
        for lookup in (True, False):
            got = generate(model, tokenizer, prompts, max_new_tokens=40, device="cpu", token_budget=budget,
                           drafts=one_undrafted, fast=FastPath(lookup=lookup))
            assert {k: v.output_ids for k, v in got.items()} == expected, (budget, lookup)
    costs = {}
    for lookup in (True, False):
        costs[lookup] = GenerationCounts()
        got = generate(model, tokenizer, prompts, max_new_tokens=40, device="cpu", token_budget=100000,
                       drafts=edited, counters=costs[lookup], fast=FastPath(lookup=lookup))
        assert {k: v.output_ids for k, v in got.items()} == expected
    with_lookup, without = costs[True], costs[False]
    assert with_lookup.accepted_lookup_tokens > 0 and without.lookup_tokens == 0
    # each accepted lookup token is a decoding step not taken, and the batch finishes in far fewer passes
    assert with_lookup.decode_steps + with_lookup.accepted_lookup_tokens == without.decode_steps
    assert with_lookup.forward_passes * 2 < without.forward_passes
    # continuing from the draft pass's cache: no row's prompt is computed twice (the old path recomputes
    # prompt + accepted draft of every diverged row)
    old = GenerationCounts()
    generate(model, tokenizer, prompts, max_new_tokens=40, device="cpu", token_budget=100000, drafts=edited,
             counters=old, fast=FastPath(pooled_decoding=False, lookup=False))
    assert without.forward_tokens < old.forward_tokens


def test_pool_compaction_keeps_every_row_exact(tiny_model_dir):
    """Rows with holes in their columns (unconfirmed proposals, masked draft tails) are moved to the right end
    of the cache and their empty columns dropped; the next step computes the same logits as before."""
    model, tokenizer = load(tiny_model_dir)
    prompts = prompts_for(tokenizer)[:4]
    seqs = [list(p.input_ids) for p in prompts]
    from lorawatch.engine import decode_pool

    def block():
        _, cache, mask, last = prefill(model, seqs, prompts, pad_id=tokenizer.pad_token_id, device="cpu", keep=1,
                                       use_cache=True, counters=GenerationCounts(), share_prefix=True,
                                       in_place=True)
        mask[0, -3:-1] = 0  # holes inside the first row's own columns
        return decode_pool.Block([], cache, mask, last + 1)

    def next_logits(b):
        ids = torch.tensor([[5], [6], [7], [8]])
        mask = torch.cat([b.mask, torch.ones((4, 1), dtype=torch.long)], dim=1)
        return model(input_ids=ids, attention_mask=mask, position_ids=b.pos[:, None], cache=b.cache,
                     use_cache=True).logits[:, -1]

    loose, tight = block(), block()
    wide = torch.cat([torch.zeros((4, 40), dtype=torch.long), tight.mask], dim=1)  # 40 columns nobody uses
    for layer in tight.cache.layers:
        layer.keys = decode_pool._pad_left(layer.keys, wide.shape[1])
        layer.values = decode_pool._pad_left(layer.values, wide.shape[1])
    tight.mask = wide
    tight.compact()
    assert tight.width == int(loose.mask.sum(1).max())
    assert torch.equal(tight.mask.sum(1), loose.mask.sum(1))
    torch.testing.assert_close(next_logits(tight), next_logits(loose), atol=1e-5, rtol=1e-5)


def test_a_prefill_batch_stays_within_its_group(tiny_model_dir):
    """Rows of one group (task) share a long prefix: a pooled call over two groups computes exactly the positions
    of one call per group (a prefill batch spanning both would share only what the groups have in common)."""
    model, tokenizer = load(tiny_model_dir)
    preambles = ["Please show your choice in the answer field with only the choice letter. Text follows:\n\n",
                 "Solve the arithmetic problem and give only the number at the end of your answer:\n\n"]
    prompts = [encode_prompt(tokenizer, f"g{g}-{i}", preambles[g] + m, 512)
               for g in range(2) for i, m in enumerate(MESSAGES)]
    groups = {p.id: p.id.split("-")[0] for p in prompts}
    together, apart = GenerationCounts(), GenerationCounts()
    generate(model, tokenizer, prompts, max_new_tokens=1, device="cpu", counters=together, groups=groups)
    for g in ("g0", "g1"):
        generate(model, tokenizer, [p for p in prompts if groups[p.id] == g], max_new_tokens=1, device="cpu",
                 counters=apart)
    assert together.forward_tokens == apart.forward_tokens


def test_a_cache_growing_in_place_changes_no_bit(tiny_model_dir):
    """The in-place cache (passes.GrowingLayer) gives the very logits of transformers' DynamicLayer, through the
    pool's merges, row selections, trims and compactions and through per-batch decoding, and a copied block
    never writes into its original's buffer."""
    from lorawatch.engine.passes import GrowingLayer, new_cache

    model, tokenizer = load(tiny_model_dir)
    prompts = prompts_for(tokenizer)
    expected = reference_one_at_a_time(model, tokenizer, prompts, 40)
    drafts = {k: v[:4] + (9,) + v[5:] for k, v in list(expected.items())[1:]}  # one row undrafted, the rest diverge
    for pooled in (True, False):
        runs = {}
        for in_place in (True, False):
            runs[in_place] = generate(model, tokenizer, prompts, max_new_tokens=40, device="cpu", token_budget=300,
                                      drafts=drafts, first_logprobs=True,
                                      fast=FastPath(cache_in_place=in_place, pooled_decoding=pooled, lookup=pooled))
        for k in expected:
            assert runs[True][k].output_ids == runs[False][k].output_ids == expected[k]
            assert torch.equal(runs[True][k].first_logprobs, runs[False][k].first_logprobs)

    cache = new_cache(model, in_place=True)
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    layer = cache.layers[0]
    keys = torch.randn(2, 1, 3, 4)
    layer.update(keys, keys)
    buffer = layer._key_room
    layer.update(keys[:, :, :1] + 1, keys[:, :, :1] + 1)
    assert layer._key_room is buffer and layer.keys.shape[2] == 4  # written into the room, not copied
    layer.keys, layer.values = layer.keys[:, :, :2], layer.values[:, :, :2]  # trimmed from the end: same buffer
    copy = layer.detached()
    copy.update(keys[:, :, :1] * 0, keys[:, :, :1] * 0)
    layer.update(keys[:, :, :1] + 5, keys[:, :, :1] + 5)
    assert layer._key_room is buffer and torch.equal(layer.keys[:, :, 2], keys[:, :, 0] + 5)
    assert torch.equal(copy.keys[:, :, :2], keys[:, :, :2]) and torch.equal(copy.keys[:, :, 2], keys[:, :, 0] * 0)
    # keys replaced by a tensor of their own (a merge, a row selection): the old buffer is let go at once
    layer.keys = torch.cat([layer.keys, layer.keys])
    assert layer._key_room is None and layer._value_room is not None  # values untouched keep theirs
