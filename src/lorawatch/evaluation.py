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

Each of these shortcuts is a `FastPath` switch. `fast_path_for` turns off the ones that are not exact for a
model's architecture or dtype (tests/test_conformance.py checks the rest against transformers' `generate`
for every family the presets name, in fp32 and bf16), and `FastPath.plain()` turns them all off: the
straightforward path the fast one is checked against.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Iterator, Mapping, Sequence

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from lorawatch import decode_pool
from lorawatch.prompts import EncodedPrompt

# End-of-turn markers of the chat formats in use; generation also stops at them.
CHAT_END_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

# Rows x padded width of one batch. Bigger batches make decoding steps cheaper per row; the key/value cache
# of a SmolLM2 batch at this budget stays under ~0.5 GB.
DEFAULT_TOKEN_BUDGET = 8192
# Rows x kept positions x vocabulary of the logits of one draft-checking pass (float32: 4 bytes each).
LOGITS_BUDGET = 48_000_000
# Bumped whenever a change here changes what generation computes: cached base-stage results record it.
GENERATION_RULES_VERSION = 2


@dataclass(frozen=True)
class FastPath:
    """The evaluation shortcuts in use (see the module docstring). Where `fast_path_for` leaves one on, it changes
    what greedy decoding computes by float round-off at most (a token can flip only where the model scores two
    equal within it); the batching by token budget is common to both paths."""
    shared_prefix: bool = True  # a prefix common to a batch's prompts is computed once
    drop_finished: bool = True  # finished rows leave the decoding batch
    drafts: bool = True  # the previous checkpoint's outputs are checked in one pass
    merge_adapter: bool = True  # LoRA folded into the weights while evaluating
    reference_from_generation: bool = True  # reference drift read from the generation's first pass
    pooled_decoding: bool = True  # one refilled decoding batch for all unfinished rows, from the draft pass's cache
    lookup: bool = True  # proposals looked up in a row's old output and prompt, checked in the decoding step

    @classmethod
    def plain(cls) -> "FastPath":
        return cls(**{name: False for name in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)


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


def left_pad(prompts: Sequence[EncodedPrompt], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _left_pad([p.input_ids for p in prompts], pad_id, device)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's own first token: padding does not shift a row."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def budget_batches(lengths: Sequence[int], token_budget: int, row_cost: Callable[[int], int] | None = None,
                   cost_budget: int | None = None, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length whose rows x longest length fit the token budget.

    `row_cost(longest)` and `cost_budget` add a second limit (the logits of a draft-checking pass), `max_rows`
    a third (a fixed batch size, as the published implementation's 4).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        rows = len(current) + 1
        fits = rows * lengths[i] <= token_budget and (max_rows is None or rows <= max_rows)
        if fits and row_cost is not None and cost_budget is not None:
            fits = rows * row_cost(lengths[i]) <= cost_budget
        if current and not fits:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class GenerationCounters:
    """What a generation call cost, in tokens; the benchmark reports these."""
    rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0  # each row up to and including its own stop token: the decoding work needed
    # row-steps computed by incremental decoding (the first token of a prefill, or the token after a checked draft,
    # included): generated tokens = decode steps + accepted draft tokens + accepted lookup tokens
    decode_steps: int = 0
    draft_tokens: int = 0  # draft tokens checked in a single pass
    accepted_draft_tokens: int = 0
    forward_tokens: int = 0  # every position run through the model, padding included
    forward_passes: int = 0
    lookup_tokens: int = 0  # tokens proposed by lookup (pooled decoding) and checked in a decoding step
    accepted_lookup_tokens: int = 0

    def add(self, other: "GenerationCounters") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Generated:
    output_ids: tuple[int, ...]  # generated tokens, ending with the stop token when the row stopped at one
    first_logprobs: torch.Tensor | None = None  # float32 [vocab]: the next-token distribution after the prompt


@dataclass
class _Row:
    prompt: EncodedPrompt
    want_first: bool = False  # keep the next-token distribution after the prompt
    out: list[int] = field(default_factory=list)
    first_logprobs: torch.Tensor | None = None
    done: bool = False


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
    counters: GenerationCounters | None = None,
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
    counters = counters if counters is not None else GenerationCounters()
    stops = set(stop_token_ids(tokenizer, model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = model.get_output_embeddings().weight.shape[0]
    want_first = {p.id for p in prompts} if first_logprobs is True else set(first_logprobs or ())
    rows = [_Row(p, want_first=p.id in want_first) for p in prompts]
    if len({p.id for p in prompts}) < len(prompts):
        raise ValueError("generate: prompt ids must be unique (results are keyed by them)")
    counters.rows += len(rows)
    counters.prompt_tokens += sum(len(p.input_ids) for p in prompts)

    def finish(row: _Row) -> None:
        for i, token in enumerate(row.out):
            if token in stops:
                row.out = row.out[:i + 1]
                break
        row.out = row.out[:max_new_tokens]
        row.done = bool(row.out) and (row.out[-1] in stops or len(row.out) >= max_new_tokens)
        if row.done and on_rows:
            on_rows(1)

    by_group: dict[str | None, list[_Row]] = {}
    for row in rows:
        by_group.setdefault((groups or {}).get(row.prompt.id), []).append(row)
    options = dict(max_new_tokens=max_new_tokens, pad_id=pad_id, device=device, token_budget=token_budget,
                   batch_rows=batch_rows, counters=counters, finish=finish, share_prefix=fast.shared_prefix)
    use_drafts = fast.drafts and bool(drafts)
    if fast.pooled_decoding:
        _generate_pooled(model, list(by_group.values()), drafts if use_drafts else {}, vocab=vocab,
                         lookup=fast.lookup, stops=stops, **options)
    else:
        for group in by_group.values():
            drafted = [r for r in group if use_drafts and drafts.get(r.prompt.id)]
            guesses = _guesses(drafted, drafts, max_new_tokens, stops) if drafted else []
            for _ in _check_drafts(model, drafted, guesses, vocab=vocab, use_cache=False, **options):
                pass
            pending = [r for r in group if not r.done]
            if pending:
                _decode(model, pending, drop_finished=fast.drop_finished, **options)
    counters.generated_tokens += sum(len(r.out) for r in rows)
    return {r.prompt.id: Generated(tuple(r.out), r.first_logprobs) for r in rows}


def _guesses(rows: list[_Row], drafts: Mapping[str, Sequence[int]], max_new_tokens: int,
             stops: set[int]) -> list[list[int]]:
    """Each row's draft as far as it can be used: at most `max_new_tokens`, up to its first stop token."""
    guesses = []
    for row in rows:
        draft = list(drafts[row.prompt.id])[:max_new_tokens]
        cut = next((i for i, t in enumerate(draft) if t in stops), None)
        guesses.append(draft if cut is None else draft[:cut + 1])
    return guesses


def _check_drafts(model, rows: list[_Row], guesses: list[list[int]], *, max_new_tokens: int, pad_id: int,
                  device: str, vocab: int, token_budget: int, batch_rows: int | None, counters: GenerationCounters,
                  finish: Callable[[_Row], None], share_prefix: bool,
                  use_cache: bool) -> Iterator[tuple[list[int], DynamicCache | None, torch.Tensor, torch.Tensor]]:
    """One pass over prompt + draft per row: keep the draft's prefix that greedy decoding agrees with, plus
    greedy's next token. Yields each batch as (row indices, cache, mask, position id of each row's next
    token), the mask switched off over the draft tokens greedy decoding did not confirm."""
    if not rows:
        return
    lengths = [len(r.prompt.input_ids) + len(g) for r, g in zip(rows, guesses)]
    longest_draft = max(len(g) for g in guesses)
    for batch in budget_batches(lengths, token_budget, row_cost=lambda _: (longest_draft + 1) * vocab,
                                cost_budget=LOGITS_BUDGET, max_rows=batch_rows):
        seqs = [list(rows[i].prompt.input_ids) + guesses[i] for i in batch]
        keep = max(len(guesses[i]) for i in batch) + 1
        logits, cache, mask, _ = _prefill(model, seqs, [rows[i].prompt for i in batch], pad_id=pad_id,
                                          device=device, keep=keep, use_cache=use_cache, counters=counters,
                                          share_prefix=share_prefix)
        positions = []
        for b, i in enumerate(batch):
            row, draft = rows[i], guesses[i]
            start = keep - 1 - len(draft)  # the prompt's last position within the kept logits
            greedy = logits[b, start:].argmax(-1).tolist()  # greedy[j]: the token after prompt + draft[:j]
            if row.want_first:
                row.first_logprobs = torch.log_softmax(logits[b, start].float(), dim=-1).cpu()
            agree = 0
            while agree < len(draft) and greedy[agree] == draft[agree]:
                agree += 1
            row.out = draft[:agree] + [greedy[agree]]
            counters.draft_tokens += len(draft)
            counters.accepted_draft_tokens += agree
            if agree < len(draft):
                mask[b, mask.shape[1] - (len(draft) - agree):] = 0
            positions.append(len(row.prompt.input_ids) + agree)
            finish(row)
            counters.decode_steps += len(row.out) > agree  # greedy's own token after the draft, where kept
        del logits
        yield batch, cache, mask, torch.tensor(positions, device=mask.device)


def _decode(model, rows: list[_Row], *, max_new_tokens: int, pad_id: int, device: str, token_budget: int,
            batch_rows: int | None, counters: GenerationCounters, finish: Callable[[_Row], None], share_prefix: bool,
            drop_finished: bool) -> None:
    """Incremental greedy decoding. With `drop_finished` a row leaves the batch (and its cache) once it is
    finished; without it, it is carried along until the whole batch is done and its tokens are ignored."""
    lengths = [len(r.prompt.input_ids) + max_new_tokens for r in rows]  # the longest a row's cache can grow
    for batch in budget_batches(lengths, token_budget, max_rows=batch_rows):
        active = [rows[i] for i in batch]
        logits, cache, mask, last = _prefill(model, [list(r.prompt.input_ids) + r.out for r in active],
                                             [r.prompt for r in active], pad_id=pad_id, device=device, keep=1,
                                             use_cache=True, counters=counters, share_prefix=share_prefix)
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


def _generate_pooled(model, groups: list[list[_Row]], drafts: Mapping[str, Sequence[int]], *, stops: set[int],
                     max_new_tokens: int, pad_id: int, device: str, token_budget: int, batch_rows: int | None,
                     counters: GenerationCounters, finish: Callable[[_Row], None],
                     share_prefix: bool, vocab: int, lookup: bool) -> None:
    """Every unfinished row in one decoding batch (decode_pool.py): rows whose drafts diverged join it with the
    draft pass's cache, rows without drafts are prefilled when there is room, and the batch is refilled as
    rows finish. Drafts are checked and prompts prefilled group by group; the batch's rows x (width + tokens
    still to come) stay within the token budget."""
    drafted = [[r for r in group if drafts.get(r.prompt.id)] for group in groups]
    guesses = [_guesses(rows, drafts, max_new_tokens, stops) for rows in drafted]
    old_outputs = {id(row): guess for rows, gs in zip(drafted, guesses) for row, guess in zip(rows, gs)}
    # rows without a draft, group after group, by length within a group (prefill batches share prefixes)
    waiting = [(g, r) for g, group in enumerate(groups)
               for r in sorted(group, key=lambda r: len(r.prompt.input_ids)) if id(r) not in old_outputs]

    def pool_row(row: _Row) -> decode_pool.PoolRow:
        return decode_pool.PoolRow(row, [old_outputs.get(id(row), []), list(row.prompt.input_ids)])

    def unfinished(batch_rows: list[_Row], cache, mask, pos) -> decode_pool.Block | None:
        block = decode_pool.Block([pool_row(r) for r in batch_rows], cache, mask, pos)
        keep = [i for i, r in enumerate(batch_rows) if not r.done]
        if not keep:
            return None
        if not decode_pool.poolable(cache):
            raise RuntimeError("pooled decoding needs a full-attention cache (see evaluation.fast_path_for)")
        if len(keep) < len(block):
            block.select(keep)
        return block

    checks = ((rows, batch) for rows, gs in zip(drafted, guesses) if rows
              for batch in _check_drafts(model, rows, gs, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                         device=device, vocab=vocab, token_budget=token_budget,
                                         batch_rows=batch_rows, counters=counters, finish=finish,
                                         share_prefix=share_prefix, use_cache=True))
    parked: list[decode_pool.Block] = []
    pool: decode_pool.Block | None = None
    fixed = decode_pool.fixed_cost_positions(device)

    def fits(rows: int, width: int) -> bool:  # with room for every row to reach max_new_tokens
        return rows * (width + max_new_tokens) <= token_budget and (batch_rows is None or rows <= batch_rows)

    while True:
        while True:  # admit rows while there is room
            size, width = (len(pool), pool.width) if pool else (0, 0)
            if parked:
                block = parked[0]
                take = len(block)
                while take > 0 and not fits(size + take, max(width, block.width)):
                    take -= 1
                take = max(take, 0 if size else 1)
                if not take:
                    break
                pool = decode_pool.merge(pool, block.split(take) if take < len(block) else parked.pop(0))
                continue
            checked = next(checks, None)
            if checked is not None:
                rows, (batch, cache, mask, pos) = checked
                block = unfinished([rows[i] for i in batch], cache, mask, pos)
                if block is not None:
                    parked.append(block)
                continue
            if waiting:
                take = 0
                # a prefill batch stays within one group: its rows share their long prefix
                while take < len(waiting) and waiting[take][0] == waiting[0][0] and \
                        fits(size + take + 1, max(width, len(waiting[take][1].prompt.input_ids))):
                    take += 1
                take = max(take, 0 if size else 1)
                if not take:
                    break
                joining, waiting = [r for _, r in waiting[:take]], waiting[take:]
                logits, cache, mask, last = _prefill(model, [list(r.prompt.input_ids) for r in joining],
                                                     [r.prompt for r in joining], pad_id=pad_id, device=device,
                                                     keep=1, use_cache=True, counters=counters,
                                                     share_prefix=share_prefix)
                counters.decode_steps += len(joining)
                for row, token, row_logits in zip(joining, logits[:, -1].argmax(-1).tolist(), logits[:, -1]):
                    if row.want_first:
                        row.first_logprobs = torch.log_softmax(row_logits.float(), dim=-1).cpu()
                    row.out = [token]
                    finish(row)
                block = unfinished(joining, cache, mask, last + 1)
                if block is not None:
                    pool = decode_pool.merge(pool, block)
                continue
            break
        if pool is None or not len(pool):
            break
        decode_pool.step(model, pool, lookup=lookup, max_new_tokens=max_new_tokens, stops=stops, pad_id=pad_id,
                         fixed=fixed, logits_budget=LOGITS_BUDGET, vocab=vocab, counters=counters)
        for r in pool.rows:
            finish(r.row)
        keep = [i for i, r in enumerate(pool.rows) if not r.row.done]
        if not keep:
            pool = None
            continue
        if len(keep) < len(pool):
            pool.select(keep)
        pool.compact()


# Rows of a batch that start with the same tokens (the chat template, the task's instruction and its fixed
# preamble: half of a TRACE prompt) share one computation of that prefix.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own.

    Called on the prompts alone (never prompt + draft): a row's own part then always holds its last prompt
    token, where its first generated token and reference distribution are read, even when rows repeat a
    whole prompt."""
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n if n >= MIN_SHARED_PREFIX and len(seqs) > 1 else 0


def _prefill(model, seqs: Sequence[Sequence[int]], prompts: Sequence[EncodedPrompt], *, pad_id: int, device: str,
             keep: int, use_cache: bool, counters: GenerationCounters,
             share_prefix: bool) -> tuple[torch.Tensor, DynamicCache | None, torch.Tensor, torch.Tensor]:
    """One pass over a batch of rows (each a prompt and what follows it): (logits of the last `keep` positions,
    cache, attention mask, each row's last position id). With `share_prefix`, a prefix common to all prompts
    is computed once and its cache copied to every row; the rows' own tokens follow it, padded on their
    left: [prefix][pad][row]."""
    shared = shared_prefix_length([p.input_ids for p in prompts]) if share_prefix else 0
    cache = DynamicCache(config=model.config) if use_cache or shared else None
    if shared:
        prefix = torch.tensor([list(seqs[0][:shared])], dtype=torch.long, device=device)
        model(input_ids=prefix, attention_mask=torch.ones_like(prefix), cache=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(len(seqs))
        counters.forward_passes += 1
        counters.forward_tokens += shared
    ids, own_mask = _left_pad([s[shared:] for s in seqs], pad_id, device)
    mask = torch.cat([own_mask.new_ones((len(seqs), shared)), own_mask], dim=1)
    positions = position_ids(mask)[:, shared:]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=cache is not None, logits_to_keep=keep).logits
    counters.forward_passes += 1
    counters.forward_tokens += ids.numel()
    return logits, cache, mask, positions[:, -1]


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
