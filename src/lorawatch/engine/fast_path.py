"""The evaluation's fast-path switches, declared once, here: `FastPath`.

Each switch is a field of the config's `eval` section of the same name, with the description below
(config.EvalSettings); `--plain` turns them all off (config.PLAIN_SWITCHES); generation.fast_path_for turns off the
ones that are not exact for a model's architecture or dtype, and a run records which it used (stage.json,
costs.json). No torch here: the config is built without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _switch(description: str) -> Any:
    return field(default=True, metadata={"description": description})


RECORDED_FIRST = ("shared_prefix", "drop_finished")


@dataclass(frozen=True)
class FastPath:
    """The evaluation shortcuts in use (see generation.py's docstring). Where `fast_path_for` leaves one on, it
    changes what greedy decoding computes by float round-off at most (a token can flip only where the model scores
    two equal within it); the batching by token budget is common to both paths."""
    drafts: bool = _switch("check the previous checkpoint's outputs as drafts in one pass")
    merge_adapter: bool = _switch("fold LoRA into the weights while evaluating (fp32 only)")
    shared_prefix: bool = _switch("compute a prefix common to a batch's prompts once (full-attention models only)")
    drop_finished: bool = _switch("finished rows leave the decoding batch")
    reference_from_generation: bool = _switch("read the reference drift from the generation's first pass instead "
                                              "of a pass of its own")
    pooled_decoding: bool = _switch("decode every unfinished row in one batch refilled as rows finish, continuing "
                                    "from the draft pass's cache (full-attention models only)")
    lookup: bool = _switch("propose continuations found in a row's old output and prompt and check them in the "
                           "decoding step (with pooled_decoding)")
    cache_in_place: bool = _switch("grow the key/value cache in place instead of copying it at every decoding step")

    @classmethod
    def plain(cls) -> "FastPath":
        return cls(**{name: False for name in switch_descriptions()})

    @classmethod
    def requested_by(cls, settings: Any) -> "FastPath":
        """The switches as `settings` (the config's `eval` section) set them."""
        return cls(**{name: getattr(settings, name) for name in switch_descriptions()})

    def to_dict(self) -> dict[str, bool]:
        # Run folders have always recorded the two oldest switches first (stage.json, costs.json): the same run
        # writes the same bytes whatever order the config lists them in.
        switches = asdict(self)
        order = (*RECORDED_FIRST, *(name for name in switches if name not in RECORDED_FIRST))
        return {name: switches[name] for name in order}


def switch_descriptions() -> dict[str, str]:
    """Every switch's name and what it does, in declaration order."""
    return {f.name: f.metadata["description"] for f in fields(FastPath)}
