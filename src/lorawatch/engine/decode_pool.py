"""Decoding only what changed: one decoding batch per generation call, refilled as rows finish, continuing each
row from the cache of the pass that checked its draft, and re-synchronising a row with text it is likely to
repeat (prompt-lookup decoding). Every token is still greedy decoding's own choice.

The batch (the pool) holds rows of any task and any origin side by side in one key/value cache, each row's
tokens right-aligned, with an attention mask that switches off every column that is not the row's own: its
left padding, and the positions of draft or lookup tokens the model did not confirm. Position ids are each
row's own count of real tokens, so a row computes what it would compute alone, up to float round-off.

- A row whose draft diverged keeps the draft pass's cache up to the divergence and joins the pool with the
  token greedy decoding chose there; nothing of its prompt is computed twice.
- A row without a draft is prefilled when the pool has room for it (rows of one task share their common
  prefix, see passes.prefill) and joins with its first token.
- Before each step, a row looks the last few tokens it has (prompt + output) up in its old output (the
  draft) and in its prompt; where they occur, the tokens that followed are proposed and checked in the same
  pass: the longest prefix greedy decoding agrees with is kept, plus greedy's own next token. A step then
  feeds a window of tokens per row; how wide is chosen from the proposals' track record, because every row of
  the batch pays for the widest window.

Only caches whose every layer is plain full attention can be merged, shifted and masked like this;
`evaluation.fast_path_for` switches the pool off for the other architectures (sliding windows, linear
attention), which keep the per-batch decoding of evaluation._decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorawatch.engine import passes
from lorawatch.rundir.schema import GenerationCounts

# n-gram sizes looked up, longest first: a 3-gram match is specific; a 2-gram match still predicts well in
# the repetitive text of reasoning outputs and in answers copied from the prompt.
LOOKUP_NGRAMS = (3, 2)
# The widest window a step feeds (the row's last token and up to this many proposed tokens minus one).
MAX_WINDOW = 33
WINDOWS = (1, 2, 3, 5, 9, 17, MAX_WINDOW)


def fixed_cost_positions(device: str) -> int:
    """A forward pass's fixed cost (reading the weights, launching kernels) in positions' worth of compute:
    what a wider window is weighed against. On a CPU a decoding step of a few rows costs about as much as 30-40
    positions of a long pass (docs/performance.md); an accelerator computes hundreds of positions in the time
    it reads its weights once. Only the speed depends on this, never a token."""
    return 32 if device == "cpu" else 256


@dataclass
class PoolRow:
    """A row in (or waiting for) the pool: the evaluation row, what it may repeat, and its proposals' record."""
    row: passes.Row
    sources: list[Sequence[int]]  # where proposals are looked up: the old output first, then the prompt
    proposed: int = 0
    accepted: int = 0
    _index: list[dict[tuple[int, ...], list[int]]] | None = field(default=None, repr=False)

    def acceptance(self) -> float:
        # a prior of 1 accepted in 2 proposed: a row without a record is neither trusted nor written off
        return (self.accepted + 1) / (self.proposed + 2)

    def propose(self, limit: int, stops: set[int]) -> list[int]:
        """Up to `limit` tokens that followed the row's last n tokens where they occur in its sources, up to
        and including a stop token."""
        if limit <= 0:
            return []
        if self._index is None:
            self._index = [_ngram_index(s) for s in self.sources]
        text = list(self.row.prompt.input_ids) + self.row.out
        for n in LOOKUP_NGRAMS:
            key = tuple(text[-n:])
            for k, (source, index) in enumerate(zip(self.sources, self._index)):
                starts = index.get(key)
                if not starts:
                    continue
                # in the old output, the occurrence nearest the row's own position (an edited output realigns
                # with its old self); in the prompt, the latest
                here = len(self.row.out) if k == 0 else len(source)
                start = min(starts, key=lambda s: (abs(s + n - here), s))
                follow = list(source[start + n:start + n + limit])
                cut = next((i for i, t in enumerate(follow) if t in stops), None)
                if follow:
                    return follow if cut is None else follow[:cut + 1]
        return []


def _ngram_index(tokens: Sequence[int]) -> dict[tuple[int, ...], list[int]]:
    index: dict[tuple[int, ...], list[int]] = {}
    for n in LOOKUP_NGRAMS:
        for i in range(len(tokens) - n):  # an occurrence with at least one token after it
            index.setdefault(tuple(tokens[i:i + n]), []).append(i)
    return index


@dataclass
class Block:
    """Rows sharing one key/value cache: every layer [rows, heads, width, dim], `mask` [rows, width] marks each
    row's own columns, `pos` [rows] is the position id of each row's next token (its last one, not yet fed)."""
    rows: list[PoolRow]
    cache: DynamicCache
    mask: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def select(self, keep: Sequence[int]) -> None:
        index = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.mask, self.pos = self.mask[index], self.pos[index]
        self.rows = [self.rows[i] for i in keep]

    def split(self, n: int) -> "Block":
        """The first `n` rows as a block of their own (copied); this block keeps the rest."""
        first = Block(self.rows[:n], _copy_cache(self.cache), self.mask.clone(), self.pos.clone())
        first.select(range(n))
        self.select(range(n, len(self)))
        return first

    def compact(self) -> None:
        """Drop the columns no row uses, and where every row's own columns are fewer than the width by a
        quarter, move each row's columns to the right end (the mask keeps their order; keys carry their
        positions). The cache is copied only when a quarter of it would be saved: the next step's update
        copies it anyway, and trailing unused columns are cut off without a copy."""
        live = self.mask.any(0)
        end = int(live.nonzero().max()) + 1
        if end < self.width:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]
            self.mask, live = self.mask[:, :end], live[:end]
        if int(live.sum()) * 4 < self.width * 3:
            index = live.nonzero().squeeze(1)
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(2, index)
                layer.values = layer.values.index_select(2, index)
            self.mask = self.mask[:, index]
        own = int(self.mask.sum(1).max())
        if own * 4 < self.width * 3:
            # a stable sort of 0/1 puts each row's masked columns first and its own after, both in order
            order = torch.sort(self.mask, dim=1, stable=True).indices[:, -own:]
            for layer in self.cache.layers:
                gather = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys = layer.keys.gather(2, gather)
                layer.values = layer.values.gather(2, order[:, None, :, None].expand(
                    -1, layer.values.shape[1], -1, layer.values.shape[3]))
            self.mask = self.mask.gather(1, order)


def _copy_cache(cache: DynamicCache) -> DynamicCache:
    copy = DynamicCache.__new__(DynamicCache)
    copy.__dict__.update(cache.__dict__)
    copy.layers = []
    for layer in cache.layers:
        if isinstance(layer, passes.GrowingLayer):
            copy.layers.append(layer.detached())
            continue
        new = DynamicLayer()
        new.__dict__.update(layer.__dict__)
        copy.layers.append(new)
    return copy


def poolable(cache: DynamicCache) -> bool:
    """Whether every layer of `cache` is plain full attention (a DynamicLayer or the in-place GrowingLayer: no
    window, no recurrent state)."""
    return all(type(layer) in (DynamicLayer, passes.GrowingLayer) for layer in cache.layers)


def merge(into: Block | None, block: Block) -> Block:
    """`block`'s rows appended to `into`'s, both left-padded with masked columns to the wider width."""
    if into is None or len(into) == 0:
        return block
    width = max(into.width, block.width)
    for mine, theirs in zip(into.cache.layers, block.cache.layers):
        mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], dim=0)
        mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], dim=0)
    into.mask = torch.cat([_pad_left(into.mask, width), _pad_left(block.mask, width)], dim=0)
    into.pos = torch.cat([into.pos, block.pos])
    into.rows = into.rows + block.rows
    return into


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    axis = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def window_for(rows: Sequence[PoolRow], proposals: Sequence[list[int]], fixed: int, limit: int) -> int:
    """The window (tokens fed per row) that maximises expected tokens gained per position computed: every row
    gains its own token; a proposal's tokens count at the row's acceptance rate, decaying along the proposal."""
    cap = min(limit, MAX_WINDOW, 1 + max((len(p) for p in proposals), default=0))
    best, best_rate = 1, 0.0
    for window in sorted({w for w in WINDOWS if w < cap} | {cap}):
        gain = 0.0
        for row, proposal in zip(rows, proposals):
            q = row.acceptance()
            gain += 1.0 + sum(q ** (j + 1) for j in range(min(len(proposal), window - 1)))
        rate = gain / (fixed + len(rows) * window)
        if rate > best_rate:
            best, best_rate = window, rate
    return best


def step(model, pool: Block, *, lookup: bool, max_new_tokens: int, stops: set[int], pad_id: int, fixed: int,
         logits_budget: int, vocab: int, counters: GenerationCounts) -> None:
    """One forward pass: every row feeds its last token and, with `lookup`, proposed continuations; each row's
    output grows by the proposed tokens greedy decoding confirms plus greedy's own next token. A proposal
    never reaches past a stop token or the row's last allowed token, so every confirmed token is kept."""
    proposals = [r.propose(min(MAX_WINDOW, max_new_tokens - len(r.row.out)) - 1, stops) if lookup else []
                 for r in pool.rows]
    limit = max(1, logits_budget // max(1, len(pool) * vocab))
    window = window_for(pool.rows, proposals, fixed, limit) if lookup else 1
    feeds = [[r.row.out[-1]] + p[:window - 1] for r, p in zip(pool.rows, proposals)]
    ids = torch.full((len(pool), window), pad_id, dtype=torch.long)
    fed = torch.zeros((len(pool), window), dtype=torch.long)
    for i, feed in enumerate(feeds):
        ids[i, :len(feed)] = torch.tensor(feed)
        fed[i, :len(feed)] = 1
    device = pool.mask.device
    ids, fed = ids.to(device), fed.to(device)
    positions = pool.pos[:, None] + torch.arange(window, device=device)
    mask = torch.cat([pool.mask, fed], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=pool.cache, use_cache=True,
                   logits_to_keep=window).logits
    greedy = logits.argmax(-1).tolist()
    counters.forward_passes += 1
    counters.forward_tokens += ids.numel()
    counters.decode_steps += len(pool)  # one greedy token per row; confirmed proposals are lookup tokens
    kept = fed.clone()
    for i, (row, feed) in enumerate(zip(pool.rows, feeds)):
        proposal = feed[1:]
        agree = 0
        while agree < len(proposal) and greedy[i][agree] == proposal[agree]:
            agree += 1
        row.row.out.extend(proposal[:agree] + [greedy[i][agree]])
        row.proposed += len(proposal)
        row.accepted += agree
        counters.lookup_tokens += len(proposal)
        counters.accepted_lookup_tokens += agree
        kept[i, agree + 1:] = 0  # the unconfirmed proposals' columns: never attended again
    pool.mask = torch.cat([pool.mask, kept], dim=1)
    pool.pos = pool.pos + kept.sum(1)


def generate(model, groups: list[list[passes.Row]], drafts: Mapping[str, Sequence[int]], *, stops: set[int],
             max_new_tokens: int, pad_id: int, device: str, token_budget: int, batch_rows: int | None,
             counters: GenerationCounts, finish: Callable[[passes.Row], None],
             share_prefix: bool, in_place: bool, vocab: int, lookup: bool) -> None:
    """evaluation.generate's pooled decoding (see the module docstring): every unfinished row in one decoding
    batch; rows whose drafts diverged join it with the draft pass's cache, rows without drafts are prefilled
    when there is room, and the batch is refilled as rows finish. Drafts are checked and prompts prefilled
    group by group; the batch's rows x (width + tokens still to come) stay within the token budget."""
    drafted = [[r for r in group if drafts.get(r.prompt.id)] for group in groups]
    guesses = [passes.usable_drafts(rows, drafts, max_new_tokens, stops) for rows in drafted]
    old_outputs = {id(row): guess for rows, gs in zip(drafted, guesses) for row, guess in zip(rows, gs)}
    # rows without a draft, group after group, by length within a group (prefill batches share prefixes)
    waiting = [(g, r) for g, group in enumerate(groups)
               for r in sorted(group, key=lambda r: len(r.prompt.input_ids)) if id(r) not in old_outputs]

    def pool_row(row: passes.Row) -> PoolRow:
        return PoolRow(row, [old_outputs.get(id(row), []), list(row.prompt.input_ids)])

    def unfinished(batch_rows: list[passes.Row], cache, mask, pos) -> Block | None:
        block = Block([pool_row(r) for r in batch_rows], cache, mask, pos)
        keep = [i for i, r in enumerate(batch_rows) if not r.done]
        if not keep:
            return None
        if not poolable(cache):
            raise RuntimeError("pooled decoding needs a full-attention cache (see evaluation.fast_path_for)")
        if len(keep) < len(block):
            block.select(keep)
        return block

    checks = ((rows, batch) for rows, gs in zip(drafted, guesses) if rows
              for batch in passes.check_drafts(model, rows, gs, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                               device=device, vocab=vocab, token_budget=token_budget,
                                               batch_rows=batch_rows, counters=counters, finish=finish,
                                               share_prefix=share_prefix, in_place=in_place, use_cache=True))
    parked: list[Block] = []
    pool: Block | None = None
    fixed = fixed_cost_positions(device)

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
                pool = merge(pool, block.split(take) if take < len(block) else parked.pop(0))
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
                logits, cache, mask, last = passes.prefill(model, [list(r.prompt.input_ids) for r in joining],
                                                           [r.prompt for r in joining], pad_id=pad_id,
                                                           device=device, keep=1, use_cache=True, counters=counters,
                                                           share_prefix=share_prefix, in_place=in_place)
                counters.decode_steps += len(joining)
                for row, token, row_logits in zip(joining, logits[:, -1].argmax(-1).tolist(), logits[:, -1]):
                    if row.want_first:
                        row.first_logprobs = torch.log_softmax(row_logits.float(), dim=-1).cpu()
                    row.out = [token]
                    finish(row)
                block = unfinished(joining, cache, mask, last + 1)
                if block is not None:
                    pool = merge(pool, block)
                continue
            break
        if pool is None or not len(pool):
            break
        step(model, pool, lookup=lookup, max_new_tokens=max_new_tokens, stops=stops, pad_id=pad_id, fixed=fixed,
             logits_budget=passes.LOGITS_BUDGET, vocab=vocab, counters=counters)
        for r in pool.rows:
            finish(r.row)
        keep = [i for i, r in enumerate(pool.rows) if not r.row.done]
        if not keep:
            pool = None
            continue
        if len(keep) < len(pool):
            pool.select(keep)
        pool.compact()
