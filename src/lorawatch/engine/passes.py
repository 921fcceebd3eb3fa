"""One forward pass over a batch of rows, and what every way of generating shares: left padding with each
row's own position ids, batches sized by a token budget, a prefix common to a batch's prompts computed once,
and the pass that checks drafts. evaluation.generate and decode_pool build on these; what they cost is
counted in a `GenerationCounts` (rundir/schema: costs.json holds them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorawatch.data.prompts import EncodedPrompt
from lorawatch.rundir.schema import GenerationCounts

# Rows x padded width of one batch. Bigger batches make decoding steps cheaper per row; the key/value cache
# of a SmolLM2 batch at this budget stays under ~0.5 GB.
DEFAULT_TOKEN_BUDGET = 8192
# Rows x kept positions x vocabulary of the logits of one draft-checking pass (float32: 4 bytes each).
LOGITS_BUDGET = 48_000_000


@dataclass
class Row:
    """A prompt being generated for: its output so far, and whether it is finished."""
    prompt: EncodedPrompt
    want_first: bool = False  # keep the next-token distribution after the prompt
    out: list[int] = field(default_factory=list)
    first_logprobs: torch.Tensor | None = None
    done: bool = False


def left_pad(prompts: Sequence[EncodedPrompt], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad_ids([p.input_ids for p in prompts], pad_id, device)


def left_pad_ids(rows: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
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


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that grows in place: keys and values are views into a buffer with room for
    `ROOM` more positions, so a decoding step writes its new column instead of copying the whole cache into a
    new tensor as DynamicLayer's torch.cat does (a quarter of a CPU decoding step at the pool's cache sizes).
    The attention reads the same numbers through a strided view: results are bit for bit those of DynamicLayer
    (tests/test_generation.py). Whoever replaces `keys`/`values` with a tensor of their own (row selection,
    merging, compaction) just makes the next update start a new buffer; a view cut from the end of the
    current one (a trimmed width) keeps it."""

    ROOM = 64

    def __setattr__(self, name: str, value) -> None:
        # keys/values replaced by a tensor of their own (row selection, merge, compaction, a split-off copy):
        # the buffer behind the old ones is let go at once, not kept alive beside the new tensor until the next
        # update (a parked block would hold both)
        if name in ("keys", "values"):
            room = self.__dict__.get(f"_{name[:-1]}_room")
            if room is not None and (not isinstance(value, torch.Tensor) or value.data_ptr() != room.data_ptr()):
                self.__dict__[f"_{name[:-1]}_room"] = None
        super().__setattr__(name, value)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._append(self.keys, "_key_room", key_states)
        self.values = self._append(self.values, "_value_room", value_states)
        return self.keys, self.values

    def _append(self, held: torch.Tensor, room_name: str, new: torch.Tensor) -> torch.Tensor:
        """`held` with `new` appended along the positions: written into the buffer when `held` is the start of
        it, else into a new buffer, the old one let go first (so that peak memory stays what torch.cat needs)."""
        room = getattr(self, room_name, None)
        setattr(self, room_name, None)
        n, add = (held.shape[-2] if held.numel() else 0), new.shape[-2]
        if not (room is not None and n > 0 and held.data_ptr() == room.data_ptr() and held.stride() == room.stride()
                and held.shape[:2] == room.shape[:2] and n + add <= room.shape[-2]):
            room = None  # the last reference to a buffer `held` is no view of
            room = new.new_empty((*new.shape[:2], n + add + self.ROOM, new.shape[-1]))
            if n:
                room[..., :n, :] = held
        room[..., n:n + add, :] = new
        setattr(self, room_name, room)
        return room[..., :n + add, :]

    def detached(self) -> "GrowingLayer":
        """The same keys and values in a layer with no claim on this one's buffer (writing into a shared
        buffer would overwrite the other layer's next columns)."""
        copy = GrowingLayer()
        copy.__dict__.update({k: v for k, v in self.__dict__.items() if not k.endswith("_room")})
        return copy


def new_cache(model, in_place: bool) -> DynamicCache:
    """An empty cache for `model`; with `in_place`, its plain full-attention layers grow in place."""
    cache = DynamicCache(config=model.config)
    if in_place:
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


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


def prefill(model, seqs: Sequence[Sequence[int]], prompts: Sequence[EncodedPrompt], *, pad_id: int, device: str,
            keep: int, use_cache: bool, counters: GenerationCounts, share_prefix: bool,
            in_place: bool) -> tuple[torch.Tensor, DynamicCache | None, torch.Tensor, torch.Tensor]:
    """One pass over a batch of rows (each a prompt and what follows it): (logits of the last `keep` positions,
    cache, attention mask, each row's last position id). With `share_prefix`, a prefix common to all prompts
    is computed once and its cache copied to every row; the rows' own tokens follow it, padded on their
    left: [prefix][pad][row]."""
    shared = shared_prefix_length([p.input_ids for p in prompts]) if share_prefix else 0
    cache = new_cache(model, in_place) if use_cache or shared else None
    if shared:
        prefix = torch.tensor([list(seqs[0][:shared])], dtype=torch.long, device=device)
        model(input_ids=prefix, attention_mask=torch.ones_like(prefix), cache=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(len(seqs))
        counters.forward_passes += 1
        counters.forward_tokens += shared
    ids, own_mask = left_pad_ids([s[shared:] for s in seqs], pad_id, device)
    mask = torch.cat([own_mask.new_ones((len(seqs), shared)), own_mask], dim=1)
    positions = position_ids(mask)[:, shared:]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=cache is not None, logits_to_keep=keep).logits
    counters.forward_passes += 1
    counters.forward_tokens += ids.numel()
    return logits, cache, mask, positions[:, -1]


def usable_drafts(rows: list[Row], drafts: Mapping[str, Sequence[int]], max_new_tokens: int,
             stops: set[int]) -> list[list[int]]:
    """Each row's draft as far as it can be used: at most `max_new_tokens`, up to its first stop token."""
    guesses = []
    for row in rows:
        draft = list(drafts[row.prompt.id])[:max_new_tokens]
        cut = next((i for i, t in enumerate(draft) if t in stops), None)
        guesses.append(draft if cut is None else draft[:cut + 1])
    return guesses


def check_drafts(model, rows: list[Row], guesses: list[list[int]], *, max_new_tokens: int, pad_id: int,
                  device: str, vocab: int, token_budget: int, batch_rows: int | None, counters: GenerationCounts,
                  finish: Callable[[Row], None], share_prefix: bool, in_place: bool,
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
        logits, cache, mask, _ = prefill(model, seqs, [rows[i].prompt for i in batch], pad_id=pad_id,
                                         device=device, keep=keep, use_cache=use_cache, counters=counters,
                                         share_prefix=share_prefix, in_place=in_place)
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
