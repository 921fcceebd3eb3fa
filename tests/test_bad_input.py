"""Bad input beyond data and config files: models, the environment, options that do not fit the data.

Each case ends the command with exit code 2 and one line naming the culprit, and leaves no partial result.
The full table of cases is docs/bad-input.md.
"""

import errno
import json

import pytest
from typer.testing import CliRunner

from lorawatch.rundir import atomic
from lorawatch.rundir import store
from lorawatch.cli import app
from lorawatch.errors import DataError, UserError
from lorawatch.data.tasks.loading import load_examples
from tiny import assert_one_line_error, cli, config_file


def test_multiple_choice_gold_outside_the_options(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps([{"prompt": "Stance? A. dovish, B. hawkish, C. neutral.", "answer": "C"},
                                {"prompt": "Stance? A. dovish, B. hawkish, C. neutral.", "answer": "D"}]))
    with pytest.raises(DataError, match=r"mc.json, row 2: answer 'D' is not one of the options A, B, C"):
        load_examples(path, task="t", split="test", kind="multiple_choice")


def test_corrupt_gguf_file(tmp_path, tiny_model_dir):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 20)
    result = cli("run", config_file(tmp_path, tiny_model_dir), "--model", gguf, "--out", tmp_path / "r")
    assert_one_line_error(result, "broken.gguf")
    assert not (tmp_path / "r" / "seed-33").exists()


def test_model_folder_without_tokenizer(tmp_path, tiny_model_dir):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name.startswith(("config", "model", "generation")):
            (folder / item.name).write_bytes(item.read_bytes())
    result = cli("run", config_file(tmp_path, tiny_model_dir), "--model", folder, "--out", tmp_path / "r")
    assert_one_line_error(result, "no-tokenizer", "tokenizer")


def test_output_folder_not_writable(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli("run", config_file(tmp_path, tiny_model_dir), "--out", blocker / "run")
    assert_one_line_error(result, "a-file", "cannot write")


def test_unknown_model_alias(tmp_path, tiny_model_dir):
    result = cli("run", config_file(tmp_path, tiny_model_dir), "--model", "smollm3-tiny", "--out", tmp_path / "r")
    assert_one_line_error(result, "smollm3-tiny")


def test_disk_full_while_writing_keeps_finished_files(tmp_path, monkeypatch):
    store.write_json(tmp_path / "finished.json", {"ok": True})

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(UserError, match=r"next.json: cannot write \(No space left on device\)"):
        store.write_json(tmp_path / "next.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished.json"]  # no partial or temporary file


def test_disk_full_during_a_run_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    result = CliRunner().invoke(app, ["run", str(config_file(tmp_path, tiny_model_dir)), "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "config.json" in lines[0]
