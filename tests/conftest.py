"""Shared fixtures: a tiny randomly initialised model with its own tokenizer, built in the test session (see tiny.py),
torch on one thread, and a cache folder of the session's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny import build_tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-model tests: a 32-wide model gains nothing from intra-op threads and
    loses much to them on a busy 2-core machine (ten times slower there). Use it from an autouse fixture."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory, tiny_model_dir):
    """A finished `lorawatch run` of the tiny model (seed 3, two stages), trained once for the modules that only read
    it (the adapter check, export to HF and GGUF): (run folder, its root with data/, config)."""
    from lorawatch.recipe.run import run_experiment
    from tiny import tiny_config, write_task_files

    root = tmp_path_factory.mktemp("tiny-trained")
    write_task_files(root / "data")
    config = tiny_config(tiny_model_dir, root / "data", seeds=(3,))
    return run_experiment(config, root / "run"), root, config


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory) -> Path:
    """The same kind of tiny model with no chat template (like Gemma-3-270M base)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain-model"), chat_template=False)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # GGUF conversions and base-stage results are cached per test session, never in the user's home.
    # Session scope: module-scoped fixtures that run the protocol are set up before any function-scoped one.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAWATCH_CACHE", str(tmp_path_factory.getbasetemp() / "lorawatch-cache"))
        patch.delenv("LORAWATCH_BASE_STAGE_CACHE", raising=False)
        yield


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
