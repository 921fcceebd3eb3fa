"""The stages whose adapter had no effect, as their stage.json records them (engine/drift.adapter_check computed it
when the stage was evaluated). Folders written before the check existed record nothing and are not flagged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir.schema import AdapterCheck


@dataclass(frozen=True)
class InactiveAdapter:
    run_dir: Path
    seed: int
    stage: int
    checkpoint: str
    check: AdapterCheck

    def line(self) -> str:
        return f"seed {self.seed} stage {self.stage} ({self.checkpoint}): {self.check.summary()}"


def inactive_adapters(run_dir: Path, seeds: Iterable[int]) -> list[InactiveAdapter]:
    """Every finished stage of these seeds whose adapter check found the base model's distributions."""
    folder = RunFolder(run_dir)
    found = []
    for seed in seeds:
        seed_folder = folder.seed(seed)
        for k in seed_folder.stages_on_disk():
            stage = seed_folder.stage(k)
            if k == 0 or not stage.finished():
                continue
            record = stage.record.load()
            # The monitor put the stage's first adapter back (revert, or stop/rollback keeping step 0): at stage 1
            # that is the base model by design, not an adapter that silently does nothing.
            if record.intervention is not None and record.intervention.kept_step == 0:
                continue
            if record.adapter_check is not None and not record.adapter_check.active:
                found.append(InactiveAdapter(Path(run_dir), seed, k, record.checkpoint, record.adapter_check))
    return found
