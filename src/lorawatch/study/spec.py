"""A study: a grid of runs described by one STUDY.yaml, each unit a `lorawatch run` folder.

    name: lr-sweep                      # default: the file's name
    preset: demo                        # or `config: base.yaml`, relative to this file
    set:                                # every unit: dotted config fields, as `lorawatch run --set` changes them
      tasks.*.max_train_rows: 40
    grid:                               # the axes; the units are every combination, times the seeds
      train.learning_rate: [5.0e-4, 1.0e-3]      # an axis over one field: its values
      model:                                      # an axis of named points, each changing several fields
        smollm2: {preset: paper-qwen, model.spec: smollm2-135m-instruct, eval.max_new_tokens: 64}
        gemma3: {preset: paper-gemma, model.spec: gemma3-270m, eval.max_new_tokens: 32}
    seeds: [33, 42]                     # default: the base config's seeds
    resources: {cpus: 1, gpus: 0.5}     # per unit, for --backend ray (fractional GPUs share one)
    retries: 2                          # a unit that crashed is tried again this often, resuming its run folder
    tracking: {backend: mlflow}         # the study as a parent run, each unit a child

A unit is one point of the grid and one seed: its config is built by the same function as `lorawatch run`'s
(`config.with_changes`), so the command line `--plan` writes for it records the same config. The study folder
(folder.py; units.py runs the units into it):

    DIR/study.json           the units (name, folder, changes, command line), for `study status`
    DIR/runs/<unit>/         each unit's run folder
    DIR/status/<unit>.json   each unit's state as last recorded by the process running it
    DIR/logs/<unit>.log      each unit's output, when it ran on Ray (and any unexpected error's traceback)
    DIR/report/              `lorawatch report` over every finished unit
    DIR/tracking.json        the study's parent run, with `tracking:` (its units are its children)
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from lorawatch.config import (
    MAX_SEED,
    ExperimentConfig,
    TrackingSettings,
    describe_error,
    read_mapping_file,
    with_changes,
)
from lorawatch.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    # A unit computes with this many threads wherever it runs, so that the local and the Ray backend give the
    # same numbers to the last digit (a matrix product's sums depend on the thread count).
    cpus: float | None = Field(None, gt=0, description="CPUs (threads) a unit uses; default: all of this "
                                                       "machine's on the local backend, 1 per unit on Ray")
    gpus: float = Field(0, ge=0, description="GPUs a unit needs; a fraction lets several units share one")


class StudySpec(_Strict):
    name: str | None = Field(None, min_length=1)
    preset: str | None = None
    config: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any] | dict[str, dict[str, Any]]] = Field(default_factory=dict)
    seeds: list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]] | None = Field(None, min_length=1)
    resources: Resources = Resources()
    retries: int = Field(2, ge=0)
    tracking: TrackingSettings | None = None

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


@dataclass(frozen=True)
class Unit:
    """One run of the study: a grid point and a seed."""

    name: str
    preset: str | None
    config_file: str | None
    changes: dict[str, Any]  # dotted config fields, in the order they are applied (the seed last)

    def folder(self, study_dir: Path) -> Path:
        return study_dir / "runs" / self.name

    def config(self) -> ExperimentConfig:
        from lorawatch.presets import base_config

        try:
            return with_changes(base_config(self.config_file, self.preset), self.changes, self.preset,
                                source=f"unit {self.name}")
        except ConfigError as error:
            raise ConfigError(str(error) if str(error).startswith("unit ") else f"unit {self.name}: {error}") \
                from None

    def command(self, study_dir: Path) -> str:
        """The same unit as a plain `lorawatch run` command line."""
        argv = ["lorawatch", "run"] + ([self.config_file] if self.config_file else ["--preset", self.preset])
        for field, value in self.changes.items():
            if field == "seeds":
                argv += ["--seeds", ",".join(map(str, value))]
            else:
                argv += ["--set", f"{field}={_as_option(value)}"]
        argv += ["--out", str(self.folder(study_dir))]
        return shlex.join(argv)


def _as_option(value: Any) -> str:
    """A value as `--set` reads it back: JSON, except text that JSON would not read as that same text."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


@dataclass
class StudyPlan:
    """A study file expanded: its grid points times its seeds, each unit one run folder to make."""

    name: str
    spec: StudySpec
    units: list[Unit]
    source: Path


def load_study_file(path: str | Path) -> StudyPlan:
    """Read STUDY.yaml and expand its grid into units; every unit's config is built (and so checked) here."""
    path = Path(path)
    data = read_mapping_file(path, "study file", "a mapping of study fields (preset or config, set, grid, seeds, ...)")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_error(error, str(path))) from None
    if spec.config is not None and spec.preset is not None:
        raise ConfigError(f"{path}: give 'preset' or 'config', not both")
    try:
        units = expand(spec, path.resolve().parent)
        for unit in units:
            unit.config()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return StudyPlan(spec.name or path.stem, spec, units, path)


# Config fields the study sets in every unit itself: a value for one in `set` or the grid would be replaced
# without a word (two units of one seed, refused by the report only after they ran), so it is refused up front.
STUDY_FIELDS = {
    "seeds": "the study gives each unit one seed itself (every grid point runs once per seed of the study's "
             "'seeds:' list, default: the base config's); list the seeds there instead, e.g. seeds: [1, 2]",
    "tracking": "the study logs its units where its 'tracking:' (or --track) says, one parent run for them all; "
                "give it there instead",
}


def _study_field(key: str) -> str | None:
    """Why a dotted config field cannot be given in `set` or the grid; None when it can."""
    return STUDY_FIELDS.get(str(key).split(".", 1)[0])


def expand(spec: StudySpec, base: Path) -> list[Unit]:
    """The grid's units: every combination of the axes' points (first axis slowest), then every seed."""
    for key in spec.set:
        if _study_field(key):
            raise ConfigError(f"field 'set.{key}': {_study_field(key)}")
    axes = []
    for axis, points in spec.grid.items():
        if isinstance(points, list):
            if _study_field(axis):
                raise ConfigError(f"grid axis '{axis}': {_study_field(axis)}")
            if not points:
                raise ConfigError(f"grid axis '{axis}' has no values")
            axes.append([(_label(axis, value), {axis: value}) for value in points])
        else:
            if not points:
                raise ConfigError(f"grid axis '{axis}' has no points")
            for name, changes in points.items():
                for key in changes:
                    if _study_field(key):
                        raise ConfigError(f"grid point '{axis}.{name}' sets '{key}': {_study_field(key)}")
            axes.append([(_slug(name), dict(changes)) for name, changes in points.items()])
    units, seen = [], set()
    for combination in itertools.product(*axes):
        changes = dict(spec.set)
        preset, config_file = spec.preset, spec.config
        for _, point in combination:
            point = dict(point)
            if "preset" in point or "config" in point:
                preset, config_file = point.pop("preset", None), point.pop("config", None)
            changes.update(point)
        if config_file is not None:
            config_file = str((base / config_file).resolve())
        elif preset is None:
            raise ConfigError("the study needs a base: 'preset' or 'config', at the top or in every grid point")
        label = "-".join(name for name, _ in combination) or "run"
        seeds = spec.seeds if spec.seeds is not None else _base_seeds(preset, config_file)
        for seed in seeds:
            name = f"{label}-seed{seed}"
            if name in seen:
                raise ConfigError(f"two grid points are both named '{name}'; name the points of an axis apart")
            seen.add(name)
            units.append(Unit(name, preset, config_file, {**changes, "seeds": [seed]}))
    return units


def _base_seeds(preset: str | None, config_file: str | None) -> list[int]:
    from lorawatch.presets import base_config

    return base_config(config_file, preset).seeds


def _label(axis: str, value: Any) -> str:
    """A unit name part: text as it is, anything else as field=value (learning_rate=0.0005)."""
    if isinstance(value, str):
        return _slug(value)
    shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return _slug(f"{axis.rsplit('.', 1)[-1]}={shown}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.,+_-]+", "-", str(text)).strip("-") or "x"
