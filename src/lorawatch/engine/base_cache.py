"""The base stage, cached across runs: the base model's evaluation depends on neither the seed nor the task
order, so it is computed once per model, data and settings and copied into every run that matches its key."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, ContextManager

from lorawatch.rundir import atomic, locks
from lorawatch.engine.drift import DRIFT_RULES_VERSION
from lorawatch.engine.checkpoint_eval import EvalParams
from lorawatch.engine.generation import GENERATION_RULES_VERSION
from lorawatch.data.inputs import Encoded, RunData
from lorawatch.models.loading import LoadedModel, default_cache_dir
from lorawatch.rundir.layout import CachedBaseStage, Stage
from lorawatch.data.tasks.scoring import SCORING_RULES_VERSION


def base_stage_key(loaded: LoadedModel, weights: str, data: RunData, encoded: Encoded, params: EvalParams) -> str:
    """What the base checkpoint's evaluation depends on, to the byte: the model (and a digest of its weights), the exact token ids of every
    prompt, the answers, the generation settings (the token budget too: batching changes float round-off) and
    the software. Task order and seeds do not enter."""
    versions = {p: importlib.metadata.version(p) for p in ("lorawatch", "torch", "transformers")}
    info = loaded.info
    tasks = sorted((t.name, t.kind, [(e.id, e.answer) for e in t.test],
                    [list(p.input_ids) for p in encoded.test[t.name]]) for t in data.tasks)
    reference = [(e.id, e.task, e.answer, list(p.input_ids)) for e, p in zip(data.reference, encoded.reference)]
    versions["scoring_rules"] = SCORING_RULES_VERSION
    versions["generation_rules"] = GENERATION_RULES_VERSION
    versions["drift_rules"] = DRIFT_RULES_VERSION
    payload = json.dumps({"model": [info.spec, info.path, info.dtype, info.device, info.num_parameters, weights],
                          "versions": versions, "tasks": tasks, "reference": reference,
                          "max_new_tokens": params.max_new_tokens, "token_budget": params.token_budget,
                          **({"batch_rows": params.batch_rows} if params.batch_rows else {}),
                          "position": params.reference_position, "fast_path": params.fast.to_dict()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def base_stage_cache(key: str) -> Path:
    """$LORAWATCH_BASE_STAGE_CACHE/<key> if set, else beside the model cache:
    $LORAWATCH_CACHE/base-stages/<key> or ~/.cache/lorawatch/base-stages/<key>."""
    root = os.environ.get("LORAWATCH_BASE_STAGE_CACHE")
    return (Path(root).expanduser() if root else default_cache_dir().parent / "base-stages") / key


def base_stage_lock(cache: Path | None, on_wait: Callable[[], None]) -> ContextManager[None]:
    """While held, this process alone computes or reads the cached base stage of this key: runs started together
    (a study's units, two terminals) compute it once, the others wait, then reuse it. The OS drops the lock when
    its holder dies. Without a usable cache folder there is nothing to share, and no lock."""
    return locks.waiting_lock(None if cache is None else CachedBaseStage(cache).lock, on_wait)


def restore_base_stage(cache: Path, base: Stage, base_lp_path: Path) -> bool:
    """Put a cached base evaluation's parts into this run; the usual resume path then reads them back."""
    entry = CachedBaseStage(cache)
    if not entry.complete_marker.is_file():
        return False
    try:
        base.path.mkdir(parents=True, exist_ok=True)
        for source, target in zip(entry.stage.base_units(), base.base_units()):
            if source.is_dir():
                atomic.copy_folder(source, target)
            else:
                atomic.write_bytes(target, source.read_bytes())
        atomic.write_bytes(base_lp_path, entry.logprobs.read_bytes())
    except OSError:
        warnings.warn(f"{cache}: cached base stage unreadable, computing it", stacklevel=2)
        return False
    return True


def save_base_stage(cache: Path, base: Stage, base_lp_path: Path) -> None:
    try:
        with atomic.replace_folder(cache) as tmp:
            entry = CachedBaseStage(tmp)
            tmp.mkdir(parents=True)
            for source, target in zip(base.base_units(), entry.stage.base_units()):
                (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
            shutil.copy2(base_lp_path, entry.logprobs)
            entry.complete_marker.write_text("")
    except OSError as exc:  # a cache is optional: a full or read-only disk must not fail the run
        warnings.warn(f"{cache}: could not cache the base stage ({exc.strerror or exc})", stacklevel=2)
