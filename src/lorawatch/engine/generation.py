"""Greedy generation -> predictions -> exact-match accuracy, computed the cheap way.

On a CPU a forward pass over many tokens at once runs several times faster per token than one decoding
step of a batch, so the generation here spends as little as it can on incremental decoding:

- Prompts are sorted by length and batched by a token budget (not a fixed number of rows), left-padded,
  with position ids counted from each row's own first token, so a row's result does not depend on its
  batch neighbours.
- A row leaves the decoding batch as soon as it has produced a stop token; finished rows cost nothing.
- A row may come with a draft: the tokens an earlier, similar checkpoint generated for the same prompt.
  The draft is checked in one forward pass over prompt + draft; the longest prefix that greedy decoding
  would itself produce is kept, plus greedy's own next token, and only a row that still has not finished
  is decoded further. The result is greedy decoding's result whatever the draft is: a draft only decides
  how much work is saved.
- Rows that start with the same tokens (chat template, instruction, the task's fixed preamble: about half
  of a TRACE prompt) compute that prefix once; its cache is copied to every row.
- The distribution after the last prompt token (the reference set's answer position) comes out of the same
  forward pass, so the reference drift needs no second pass.
- Every row still unfinished after its draft, of any task, is decoded in one batch refilled as rows finish,
  continuing from the draft pass's cache and checking tokens looked up in its old output (decode_pool.py).
- The key/value cache grows in place instead of being copied at every decoding step (passes.GrowingLayer).

The passes themselves (padding, batching, shared prefixes, draft checking) are in passes.py; this module
chooses among them. Each of these shortcuts is a `FastPath` switch (fast_path.py). `fast_path_for` turns off the ones that
are not exact for a model's architecture or dtype (tests/test_conformance.py checks the rest against
transformers' `generate` for every family the presets name, in fp32 and bf16), and `FastPath.plain()` turns
them all off: the straightforward path the fast one is checked against.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lorawatch.engine import decode_pool
from lorawatch.engine.passes import (
    DEFAULT_TOKEN_BUDGET,
    Row,
    budget_batches,
    check_drafts,
    prefill,
    usable_drafts,
)
from lorawatch.data.prompts import EncodedPrompt
from lorawatch.engine.fast_path import FastPath
from lorawatch.rundir.schema import GenerationCounts

# End-of-turn markers of the chat formats in use; generation also stops at them.
CHAT_END_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

# Bumped whenever a change here changes what generation computes: cached base-stage results record it.
GENERATION_RULES_VERSION = 2


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fast_path_for(model: torch.nn.Module, dtype: torch.dtype, requested: FastPath) -> tuple[FastPath, dict[str, str]]:
    """The requested shortcuts less those not exact for this model and dtype, with the reason for each one
    switched off here."""
    config = _text_config(model)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    off: dict[str, str] = {}
    if requested.shared_prefix:
        if getattr(config, "sliding_window", None) or layer_types - {"full_attention"}:
            # A sliding-window cache drops old positions, and a recurrent state (linear attention) cannot be
            # split as [prefix][padding][row]: only full attention makes a shared prefix exact.
            kinds = ", ".join(sorted(layer_types - {"full_attention"})) or "sliding window"
            off["shared_prefix"] = f"not exact with {kinds} layers"
    if requested.pooled_decoding and (getattr(config, "sliding_window", None) or layer_types - {"full_attention"}):
        # Rows are merged into one cache, shifted and masked column by column: only plain full-attention layers
        # can be (a window drops old columns, a recurrent state has none).
        kinds = ", ".join(sorted(layer_types - {"full_attention"})) or "sliding window"
        off["pooled_decoding"] = f"not exact with {kinds} layers"
    if requested.lookup and (not requested.pooled_decoding or "pooled_decoding" in off):
        off["lookup"] = "needs pooled_decoding"
    if requested.merge_adapter and dtype not in (torch.float32, torch.float64):
        # W + s*B*A rounded to bf16/fp16 loses the small updates of a short stage: another model is evaluated.
        off["merge_adapter"] = f"folding the adapter into {str(dtype).removeprefix('torch.')} weights rounds it away"
    used = FastPath(**{name: value and name not in off for name, value in requested.to_dict().items()})
    return used, off


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[m] for m in CHAT_END_MARKERS if m in vocab)
    return sorted(ids)


@dataclass(frozen=True)
class Generated:
    output_ids: tuple[int, ...]  # generated tokens, ending with the stop token when the row stopped at one
    first_logprobs: torch.Tensor | None = None  # float32 [vocab]: the next-token distribution after the prompt


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[EncodedPrompt],
    *,
    max_new_tokens: int,
    device: str,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    batch_rows: int | None = None,
    drafts: Mapping[str, Sequence[int]] | None = None,
    first_logprobs: bool | Collection[str] = False,
    counters: GenerationCounts | None = None,
    on_rows: Callable[[int], None] | None = None,
    fast: FastPath = FastPath(),
    groups: Mapping[str, str | None] | None = None,
) -> dict[str, Generated]:
    """Greedy continuation of every prompt (at most `max_new_tokens`, ending at a stop token), by prompt id.

    `drafts` maps prompt ids to guessed continuations (see the module docstring), used when `fast.drafts`;
    `first_logprobs` also returns the next-token log-probabilities after each prompt (or after those whose ids
    it lists); `batch_rows` caps the rows of any batch (besides the token budget). `groups` maps prompt ids to
    a group (their task): prompts are batched within their group, where they share a long prefix, and only
    pooled decoding mixes groups. `fast.merge_adapter` is the caller's business (`merged_adapter`).
    """
    model.eval()
    fast = fast_path_for(model, model.dtype, fast)[0]  # whatever is asked, never a shortcut inexact here
    counters = counters if counters is not None else GenerationCounts()
    stops = set(stop_token_ids(tokenizer, model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = model.get_output_embeddings().weight.shape[0]
    want_first = {p.id for p in prompts} if first_logprobs is True else set(first_logprobs or ())
    rows = [Row(p, want_first=p.id in want_first) for p in prompts]
    if len({p.id for p in prompts}) < len(prompts):
        raise ValueError("generate: prompt ids must be unique (results are keyed by them)")
    counters.rows += len(rows)
    counters.prompt_tokens += sum(len(p.input_ids) for p in prompts)

    def finish(row: Row) -> None:
        for i, token in enumerate(row.out):
            if token in stops:
                row.out = row.out[:i + 1]
                break
        row.out = row.out[:max_new_tokens]
        row.done = bool(row.out) and (row.out[-1] in stops or len(row.out) >= max_new_tokens)
        if row.done and on_rows:
            on_rows(1)

    by_group: dict[str | None, list[Row]] = {}
    for row in rows:
        by_group.setdefault((groups or {}).get(row.prompt.id), []).append(row)
    options = dict(max_new_tokens=max_new_tokens, pad_id=pad_id, device=device, token_budget=token_budget,
                   batch_rows=batch_rows, counters=counters, finish=finish, share_prefix=fast.shared_prefix,
                   in_place=fast.cache_in_place)
    use_drafts = fast.drafts and bool(drafts)
    if fast.pooled_decoding:
        decode_pool.generate(model, list(by_group.values()), drafts if use_drafts else {}, vocab=vocab,
                             lookup=fast.lookup, stops=stops, **options)
    else:
        for group in by_group.values():
            drafted = [r for r in group if use_drafts and drafts.get(r.prompt.id)]
            guesses = usable_drafts(drafted, drafts, max_new_tokens, stops) if drafted else []
            for _ in check_drafts(model, drafted, guesses, vocab=vocab, use_cache=False, **options):
                pass
            pending = [r for r in group if not r.done]
            if pending:
                _decode(model, pending, drop_finished=fast.drop_finished, **options)
    counters.generated_tokens += sum(len(r.out) for r in rows)
    return {r.prompt.id: Generated(tuple(r.out), r.first_logprobs) for r in rows}


def _decode(model, rows: list[Row], *, max_new_tokens: int, pad_id: int, device: str, token_budget: int,
            batch_rows: int | None, counters: GenerationCounts, finish: Callable[[Row], None], share_prefix: bool,
            in_place: bool, drop_finished: bool) -> None:
    """Incremental greedy decoding. With `drop_finished` a row leaves the batch (and its cache) once it is
    finished; without it, it is carried along until the whole batch is done and its tokens are ignored."""
    lengths = [len(r.prompt.input_ids) + max_new_tokens for r in rows]  # the longest a row's cache can grow
    for batch in budget_batches(lengths, token_budget, max_rows=batch_rows):
        active = [rows[i] for i in batch]
        logits, cache, mask, last = prefill(model, [list(r.prompt.input_ids) + r.out for r in active],
                                            [r.prompt for r in active], pad_id=pad_id, device=device, keep=1,
                                            use_cache=True, counters=counters, share_prefix=share_prefix,
                                            in_place=in_place)
        logits = logits[:, -1]
        counters.decode_steps += len(active)
        while True:
            tokens = logits.argmax(-1)
            for row, token, row_logits in zip(active, tokens.tolist(), logits):
                if row.done:
                    continue  # carried along (drop_finished off): its tokens are not its own any more
                if row.want_first and row.first_logprobs is None and not row.out:
                    row.first_logprobs = torch.log_softmax(row_logits.float(), dim=-1).cpu()
                row.out.append(token)
                finish(row)
            keep = [i for i, row in enumerate(active) if not row.done]
            if not keep:
                break
            if drop_finished and len(keep) < len(active):
                index = torch.tensor(keep, device=mask.device)
                # reorder_cache selects rows in every kind of cache layer, recurrent states included.
                cache.reorder_cache(index)
                mask, last, tokens = mask[index], last[index], tokens[index]
                active = [active[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            last = last + 1
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache,
                           use_cache=True).logits[:, -1]
            counters.forward_passes += 1
            counters.forward_tokens += len(active)
            counters.decode_steps += len(active)
        del cache


@contextmanager
def merged_adapter(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate with the LoRA update folded into the base weights (W + s*B*A): one matmul per layer instead
    of three. The base weights are restored bit for bit afterwards, so training continues unchanged."""
    lora_layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "base_layer")
                   and getattr(m, "lora_A", None)]
    if not lora_layers:
        yield
        return
    saved = [layer.get_base_layer().weight.detach().clone() for layer in lora_layers]
    try:
        for layer in lora_layers:
            layer.merge()
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(lora_layers, saved):
                layer.get_base_layer().weight.copy_(weight)
                layer.merged_adapters = []


def decode_text(tokenizer: PreTrainedTokenizerBase, output_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(output_ids), skip_special_tokens=True).strip()
