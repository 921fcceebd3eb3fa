"""Named configs. `demo` runs offline on the built-in tasks in a few minutes on a laptop CPU."""

from __future__ import annotations

from lorawatch.config import ExperimentConfig, build_config
from lorawatch.errors import ConfigError


def _demo() -> dict:
    return {
        "name": "demo",
        "model": {"spec": "smollm2-135m-instruct"},
        "tasks": [
            {"name": "stance", "kind": "multiple_choice", "builtin": "stance", "max_train_rows": 64,
             "max_test_rows": 40},
            {"name": "science", "kind": "multiple_choice", "builtin": "science", "max_train_rows": 64,
             "max_test_rows": 40},
            {"name": "arithmetic", "kind": "numeric", "builtin": "arithmetic", "max_train_rows": 64,
             "max_test_rows": 40},
        ],
        "reference": {"builtin_per_task": 8},
        # Far fewer rows than the paper's 500 per task, so fewer, larger steps: with the paper's 5e-5 and
        # 4 optimizer steps per task nothing would visibly change in a demo.
        "train": {"learning_rate": 3e-4, "batch_size": 4, "grad_accum": 2},
        "eval": {"max_new_tokens": 24, "batch_size": 16},
        "seeds": [33],
    }


PRESETS = {"demo": _demo}


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return build_config(PRESETS[name](), source=f"preset {name}")
