"""The experiment config: typed, validated, and separate from the code that uses it.

A config is built in Python, loaded from a YAML/JSON file, or taken from a preset. Every value is checked
when the config is built, and a bad one is reported as a ConfigError naming its field.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, Field, create_model, StrictInt, ValidationError, field_validator, model_validator

from lorawatch.engine.fast_path import switch_descriptions
from lorawatch.analysis.signals import DEFAULT_SIGNAL, SIGNALS, SPAN_SIGNALS, SignalName
from lorawatch.deploy.formats import unknown_format
from lorawatch.errors import ConfigError, file_problem
from lorawatch.recipe.strategies import STRATEGIES, StrategySettings
from lorawatch.recipe.strategies.base import NoneConfig
from lorawatch.strict import Strict as _Strict
from lorawatch.data.tasks.base import TASK_KINDS, task_key
from lorawatch.data.tasks.builtin import BUILTIN_KINDS

# Names the run folder and its tables use for themselves: the base row, the checkpoint column, the reference set,
# and the version key of scores.json (which is keyed by task name).
RESERVED_TASK_NAMES = ("base", "checkpoint", "reference", "schema_version")
MAX_SEED = 2**32 - 1


class ModelSettings(_Strict):
    spec: str = Field("smollm2-135m-instruct", min_length=1,
                      description="packaged alias, hub id, local folder or .gguf file")
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | None = None
    trust_remote_code: bool = False


class TaskSettings(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["multiple_choice", "numeric"]
    instruction: str | None = Field(None, description="defaults to the paper's instruction for the kind")
    builtin: str | None = Field(None, description="a built-in generated task: stance, science, arithmetic")
    train: str | None = Field(None, description="JSON/JSONL file of {prompt, answer} rows")
    test: str | None = None
    max_train_rows: int | None = Field(None, gt=0)
    max_test_rows: int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _usable_name(cls, name: str) -> str:
        # The name becomes a file name (predictions/<name>.jsonl) and a column of the accuracy matrix.
        if name.strip().lower() in RESERVED_TASK_NAMES:
            raise ValueError(f"'{name}' is reserved ({', '.join(RESERVED_TASK_NAMES)} name parts of the run folder "
                             "and its tables); rename the task")
        if any(ch in name for ch in '/\\\0') or name.startswith(".") or name != name.strip():
            raise ValueError("a task name must not contain '/', '\\' or NUL, start with '.', or have leading or "
                             "trailing spaces")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> "TaskSettings":
        if self.builtin is not None and self.builtin in BUILTIN_KINDS and BUILTIN_KINDS[self.builtin] != self.kind:
            raise ValueError(f"built-in task '{self.builtin}' is {BUILTIN_KINDS[self.builtin]}, not {self.kind}")
        if self.builtin is not None and self.builtin not in BUILTIN_KINDS:
            raise ValueError(f"unknown built-in task '{self.builtin}'; choose one of {', '.join(BUILTIN_KINDS)}")
        if self.builtin is None and (self.train is None or self.test is None):
            raise ValueError("a task needs either 'builtin' or both 'train' and 'test' files")
        if self.builtin is not None and (self.train or self.test):
            raise ValueError("a task takes either 'builtin' or 'train'/'test' files, not both")
        if self.builtin is not None and (self.max_train_rows is None or self.max_test_rows is None):
            raise ValueError("a built-in task needs 'max_train_rows' and 'max_test_rows' (its size)")
        return self


class ReferenceSettings(_Strict):
    path: str | None = Field(None, description="JSON/JSONL reference rows; each names its task")
    builtin_per_task: int | None = Field(None, gt=0, description="rows per built-in task")
    max_rows: int | None = Field(None, gt=0)
    # "answer": each row's own last prompt token (correct). "published": the published code's index
    # attention_mask.sum(1) - 1 of left-padded batches of 4, a prompt token for most rows; for comparison only.
    position: Literal["answer", "published"] = "answer"
    # engine/span_drift.py: the drift over the first k tokens of the base model's own answer and of the gold answer,
    # teacher-forced (about four reference-set prefills per checkpoint); 0 turns it off.
    span_tokens: int = Field(8, ge=0, le=64, description="answer tokens the span drift reads (0: off)")

    @model_validator(mode="after")
    def _one_source(self) -> "ReferenceSettings":
        if (self.path is None) == (self.builtin_per_task is None):
            raise ValueError("the reference set needs exactly one of 'path' or 'builtin_per_task'")
        return self


class LoraSettings(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="a list of module names (e.g. [q_proj, "
                                                                  "v_proj]), or all-linear")
    bias: Literal["none", "all", "lora_only"] = "none"


class TrainSettings(_Strict):
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(2, gt=0)
    grad_accum: int = Field(8, gt=0)
    epochs: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # The published training loop (no HF Trainer) has no scheduler: the rate is constant. "linear" decays it
    # to zero over the stage's optimizer steps without warm-up, as the HF Trainer's default would.
    lr_scheduler: Literal["constant", "linear"] = "constant"
    # The published loop divides each micro-batch's mean answer-token loss by grad_accum (a short last window
    # too, whose leftover gradients get one more clipped step). "tokens" weighs every answer token of an
    # accumulation window equally instead, whichever micro-batch it lands in.
    loss_weighting: Literal["micro_batch", "tokens"] = "micro_batch"


class _EvalSizes(_Strict):
    max_new_tokens: int = Field(256, gt=0)
    # Rows x padded length per generation batch; batches hold prompts of similar length.
    token_budget: int = Field(8192, ge=64)
    # Rows per generation batch at most, besides the token budget (the published implementation: 4).
    batch_rows: int | None = Field(None, gt=0)


# Every switch `--plain` turns off: the fast path's (engine/fast_path.py, docs/performance.md; one not exact for the
# model's architecture or dtype is turned off there whatever it says here), then the run's own.
_SWITCHES = {**switch_descriptions(), "reuse_base_stage": "cache the base evaluation across runs, orders and seeds"}
PLAIN_SWITCHES = tuple(_SWITCHES)

EvalSettings = create_model("EvalSettings", __base__=_EvalSizes, __module__=__name__,
                            **{name: (bool, Field(True, description=text)) for name, text in _SWITCHES.items()})


class MonitorSettings(_Strict):
    """Live drift monitoring during training, and the action taken when KL to base crosses a threshold.
    See recipe/monitor.py for the exact semantics of each action."""
    every: int = Field(10, gt=0, description="optimizer steps between two live measurements")
    action: Literal["warn", "stop", "revert", "rollback"] = "warn"
    signal: SignalName = Field(DEFAULT_SIGNAL, description="what the threshold applies to: "
                               + "; ".join(f"{name}: {text}" for name, text in SIGNALS.items()))
    threshold: float | None = Field(None, gt=0, description="absolute value of the signal (KL to base by default)")
    relative: float | None = Field(None, gt=0, description="threshold = this x the previous checkpoint's value of "
                                                           "the signal")
    calibrate_from: str | None = Field(None, description="a report folder / correlation.json (fitted failure-zone "
                                                         "threshold) or a run folder (largest KL without accuracy loss)")
    patience: int = Field(1, gt=0, description="act after this many consecutive measurements above the threshold "
                                               "(a stage's last measurement above it always acts)")

    @model_validator(mode="after")
    def _needs_a_threshold(self) -> "MonitorSettings":
        if self.action != "warn" and self.threshold is None and self.relative is None and self.calibrate_from is None:
            raise ValueError(f"action '{self.action}' needs a threshold: give 'threshold', 'relative' or "
                             "'calibrate_from'")
        return self


class TrackingSettings(_Strict):
    """Where a run (or a study) is also logged for experiment trackers (integrations/tracking.py). Not part of what a run's
    results depend on: a resumed run may add, change or drop it."""
    backend: Literal["mlflow", "tensorboard"]
    uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite:///<folder>/mlflow.db beside "
                                              "the run or study); TensorBoard log folder (default: "
                                              "<folder>/tensorboard)")
    experiment: str | None = Field(None, description="MLflow experiment name (default: the run's or study's name)")


class DeploySettings(_Strict):
    """The checkpoints evaluated as they ship: merged, converted to GGUF and run by llama.cpp (deploy/deployed.py),
    once the run's last stage is finished. Not part of what the run's PyTorch results depend on: a resumed run may
    add, change or drop it."""
    formats: list[str] = Field(min_length=1, description="GGUF types, e.g. [f16, q8_0, q4_k_m]: each checkpoint "
                                                         "(the base model too) in each, through llama.cpp")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        formats = [f.lower() for f in formats]
        problem = unknown_format(formats)
        if problem:
            raise ValueError(problem)
        return formats


class StatisticsSettings(_Strict):
    """How lorawatch decides whether a difference is real (analysis/significance.py): the verdict of every trained
    checkpoint, the intervals of accuracies and metrics, and what a test size can detect."""
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of a verdict, for the whole family of "
                                                       "tasks compared at once")
    correction: Literal["holm", "none"] = Field("holm", description="adjustment of the tasks' p-values for testing "
                                                                    "them together")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of every interval")
    resamples: int = Field(2000, ge=100, description="bootstrap resamples")
    power: float = Field(0.8, gt=0, lt=1, description="power at which the detectable drop is stated")
    seed: int = Field(0, ge=0, description="seed of the bootstrap's generator: the same predictions always give "
                                           "the same intervals")


class ExperimentConfig(_Strict):
    name: str = Field("lorawatch-run", min_length=1)
    model: ModelSettings = ModelSettings()
    tasks: list[TaskSettings] = Field(min_length=1)
    order: Literal["original", "reversed"] | list[str] = Field(
        "original", description="training order: 'original' (as listed), 'reversed', or a list of task names")
    reference: ReferenceSettings
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    monitor: MonitorSettings | None = None
    tracking: TrackingSettings | None = None
    deploy: DeploySettings | None = None  # the deployed forms through llama.cpp, after the last stage
    strategy: StrategySettings = NoneConfig()  # against forgetting and drift (recipe/strategies/)
    statistics: StatisticsSettings = StatisticsSettings()
    # Strict: YAML's `yes`/`true` are not seeds. Bounded: the training seed is seed * 1000 + stage.
    seeds: list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=lambda: [33], min_length=1)
    # Provenance: the preset a config came from and what the command line changed in it.
    preset: str | None = None
    overrides: dict[str, bool | str | int | float | list] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _check_tasks(self) -> "ExperimentConfig":
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate task names: {', '.join(duplicates)}")
        # Reference rows name their task loosely (case and punctuation ignored), so names must differ beyond that.
        by_key: dict[str, str] = {}
        for name in names:
            other = by_key.setdefault(task_key(name), name)
            if other != name:
                raise ValueError(f"task names '{other}' and '{name}' differ only in case or punctuation; reference "
                                 "rows could not tell them apart")
        if isinstance(self.order, list):
            unknown = [n for n in self.order if n not in names]
            if unknown:
                raise ValueError(f"order names unknown task(s) {', '.join(unknown)}; tasks are {', '.join(names)}")
            if sorted(self.order) != sorted(names):
                raise ValueError(f"order must name every task exactly once; tasks are {', '.join(names)}")
        return self

    @model_validator(mode="after")
    def _strategy_fits_lora(self) -> "ExperimentConfig":
        if self.strategy.one_adapter_per_task and self.lora.bias != "none":
            raise ValueError(f"strategy '{self.strategy.name}' trains one adapter per task and needs lora.bias "
                             f"'none' (trained biases would be shared by every task's adapter), got '{self.lora.bias}'")
        return self

    @model_validator(mode="after")
    def _span_signal_needs_spans(self) -> "ExperimentConfig":
        if (self.monitor is not None and self.monitor.signal in SPAN_SIGNALS
                and self.reference.span_tokens == 0):
            raise ValueError(f"monitor.signal '{self.monitor.signal}' reads the drift over the first answer tokens: "
                             "set reference.span_tokens above 0")
        return self

    def ordered_tasks(self) -> list[TaskSettings]:
        if self.order == "original":
            return list(self.tasks)
        if self.order == "reversed":
            return list(reversed(self.tasks))
        by_name = {t.name: t for t in self.tasks}
        return [by_name[n] for n in self.order]


assert set(TASK_KINDS) == {"multiple_choice", "numeric"}


# pydantic names the member of a union that failed inside the location ('lora.target_modules.list[str]'); a
# person needs the field and what it takes.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|[a-z][a-z-]*\[.*\])$")
_MEMBER_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                 "list[str]": "a list of names"}


def describe_error(error: ValidationError, source: str) -> str:
    """A pydantic error as one line: the source, the first field that failed and why."""
    errors = error.errors()
    first = errors[0]
    loc = _without_strategy_tag([str(p) for p in first["loc"]])
    members = []
    while loc and _UNION_MEMBER.match(loc[-1]):
        members.insert(0, loc.pop())
    field = repr(".".join(loc))[1:-1] or "config"  # escaped: a key with a line break would split the line
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    if first["type"] == "union_tag_invalid":  # a strategy name that is not registered: the field is its name
        field += ".name"
        message = f"expected one of {first['ctx']['expected_tags']}"
        first = {**first, "input": first["ctx"]["tag"]}
    if first["type"] == "union_tag_not_found":  # not a mapping: there is no name to tell the strategy by
        message = "expected a mapping of a strategy's name and settings"
    count = len(errors)
    if members:  # every error of this field is one member of its union: say what the field takes instead
        of_field = [e for e in errors if _without_strategy_tag([str(p) for p in e["loc"]])[:len(loc)] == loc]
        taken = [_MEMBER_WORDS.get(m, m) for e in of_field for m in [str(e["loc"][len(loc)])]
                 if len(e["loc"]) > len(loc)]
        description = _field_description(loc)
        message = f"expected {description or ' or '.join(dict.fromkeys(taken))}"
        count -= len(of_field) - 1
    got = first.get("input")
    shown = "" if first["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"{source}: field '{field}': {message}{shown}{more}"


def _without_strategy_tag(loc: list[str]) -> list[str]:
    # pydantic names the member of the strategy union that failed ('strategy.replay.fraction'): not a field
    return [part for i, part in enumerate(loc) if not (i == 1 and loc[0] == "strategy" and part in STRATEGIES)]


def _field_description(loc: list[str]) -> str | None:
    """The description of the config field at `loc`, when it has one."""
    model: type[BaseModel] | None = ExperimentConfig
    info = None
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        annotation = info.annotation
        model = next((a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type)
                      and issubclass(a, BaseModel)), None)
    return info.description if info is not None else None


def build_config(data: dict, source: str = "config") -> ExperimentConfig:
    """Validate a plain dict (from a file, a preset, or code) into a config."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_error(error, source)) from None


def with_changes(config: ExperimentConfig, changes: dict, preset: str | None = None,
                 source: str = "command line") -> ExperimentConfig:
    """The config with changes to dotted fields ("*" stands for every task), recorded in it as `overrides` (and
    the preset it came from). `lorawatch run`'s options and `--set`, and a study's units, are built by this one
    function, so that a unit run from its command line records the same config as one run by the study."""
    data = config.model_dump(mode="json")
    changes = {key: value for key, value in changes.items() if value is not None}
    for section in ("monitor", "tracking", "deploy"):  # optional sections: a change to one of their fields creates them
        if any(key.startswith(f"{section}.") for key in changes):
            data[section] = data.get(section) or {}
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        targets = [data]
        for part in parents:
            try:
                targets = [item for t in targets for item in (t if part == "*" else [t[part]])]
            except (KeyError, TypeError):
                raise ConfigError(f"{source}: field '{key}': no such field") from None
        for target in targets:
            if not isinstance(target, dict):
                raise ConfigError(f"{source}: field '{key}': no such field")
            target[leaf] = value
    if preset is not None:
        data["preset"] = preset
    data["overrides"] = {**data.get("overrides", {}), **changes}
    return build_config(data, source=source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"line {mark.line + 1} column {mark.column + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_mapping_file(path: Path, what: str, expected: str) -> dict:
    """A YAML (or, by its suffix, JSON) file whose top level is a mapping: a config or a study file. Any problem
    is one ConfigError naming the file, and where in it; `expected` says what the mapping holds."""
    stdin = str(path) == "-"  # standard input: YAML (which reads JSON too)
    problem = None if stdin else file_problem(path, what)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    is_json = path.suffix.lower() == ".json"
    try:
        text = sys.stdin.read() if stdin else path.read_text(encoding="utf-8")
        data = json.loads(text) if is_json else yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not a valid JSON file ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not a valid YAML file ({problem}{where})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {expected}")
    return data


def load_config(path: str | Path) -> ExperimentConfig:
    """Read a YAML or JSON config (`-`: standard input). Relative data paths are taken relative to the config file
    (to the current folder for standard input)."""
    path = Path(path)
    data = read_mapping_file(path, "config file", "a mapping of config fields at the top level")
    base = Path.cwd() if str(path) == "-" else path.resolve().parent
    for task in data.get("tasks") or []:
        if isinstance(task, dict):
            for key in ("train", "test"):
                if isinstance(task.get(key), str):
                    task[key] = str(base / task[key])
    reference = data.get("reference")
    if isinstance(reference, dict) and isinstance(reference.get("path"), str):
        reference["path"] = str(base / reference["path"])
    monitor = data.get("monitor")
    if isinstance(monitor, dict) and isinstance(monitor.get("calibrate_from"), str):
        monitor["calibrate_from"] = str(base / monitor["calibrate_from"])
    return build_config(data, source=str(path))
