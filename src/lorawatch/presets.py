"""Named configs. `demo` runs offline on the built-in tasks in a few minutes on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

from lorawatch.config import ExperimentConfig, build_config, load_config
from lorawatch.errors import ConfigError
from lorawatch.data.tasks.base import DEFAULT_INSTRUCTIONS


def _demo() -> dict:
    def task(name: str, kind: str) -> dict:
        # The paper's instructions, and 40 training rows seen twice: far fewer rows than the paper's 500.
        return {"name": name, "kind": kind, "builtin": name, "instruction": DEFAULT_INSTRUCTIONS[kind],
                "max_train_rows": 40, "max_test_rows": 24}

    return {
        "name": "demo",
        "model": {"spec": "smollm2-135m-instruct"},
        "tasks": [task("stance", "multiple_choice"), task("science", "multiple_choice"),
                  task("arithmetic", "numeric")],
        "reference": {"builtin_per_task": 6},
        # With 40 rows the paper's schedule (batch 16, lr 5e-5) would make 3 optimizer steps per task and
        # change nothing visible; smaller batches and a larger constant rate make 20.
        "train": {"learning_rate": 5e-4, "batch_size": 4, "grad_accum": 1, "epochs": 2, "lr_scheduler": "constant"},
        # A short answer budget, as on a device: the answer has to come first.
        "eval": {"max_new_tokens": 12},
        "seeds": [33],
    }


# The paper's published study: three models, TRACE's FOMC -> ScienceQA -> NumGLUE-cm,
# the 48-row reference set, the paper's LoRA and training settings (the config defaults), seeds 33/42/123.
PAPER_MODELS = {
    "paper-qwen": "Qwen/Qwen3.5-0.8B",
    "paper-llama": "meta-llama/Llama-3.2-1B-Instruct",
    "paper-gemma": "google/gemma-3-1b-it",
}


def _paper(name: str) -> dict:
    from lorawatch.data.fetch import dataset_dir, installed

    root = dataset_dir("trace-500")
    if not installed("trace-500"):
        raise ConfigError(f"preset {name} needs the paper's data in {root}; run `lorawatch data fetch trace-500` first")

    def task(folder: str, kind: str) -> dict:
        return {"name": folder, "kind": kind, "instruction": DEFAULT_INSTRUCTIONS[kind],
                "train": str(root / folder / "train.json"), "test": str(root / folder / "test.json")}

    return {
        "name": name,
        "model": {"spec": PAPER_MODELS[name]},
        "tasks": [task("FOMC", "multiple_choice"), task("ScienceQA", "multiple_choice"),
                  task("NumGLUE-cm", "numeric")],
        "reference": {"path": str(root / "reference.json")},
        "eval": {"max_new_tokens": 256},
        "seeds": [33, 42, 123],
    }


PRESETS = {"demo": _demo, **{name: (lambda n=name: _paper(n)) for name in PAPER_MODELS}}


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return build_config(PRESETS[name](), source=f"preset {name}")


def base_config(config_file: str | Path | None, preset_name: str | None) -> ExperimentConfig:
    """The config a command or a study unit starts from: a config file or a preset (default: demo)."""
    if config_file is not None and preset_name is not None:
        raise ConfigError("give a config file or --preset, not both")
    return load_config(config_file) if config_file is not None else preset(preset_name or "demo")
