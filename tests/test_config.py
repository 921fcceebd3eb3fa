import json

import pytest

from lorawatch.config import build_config, load_config
from lorawatch.errors import ConfigError
from lorawatch.presets import preset


def minimal(**overrides):
    data = {"tasks": [{"name": "a", "kind": "multiple_choice", "builtin": "stance", "max_train_rows": 4,
                       "max_test_rows": 4}],
            "reference": {"builtin_per_task": 2}}
    data.update(overrides)
    return data


def test_defaults_are_the_papers():
    config = build_config(minimal())
    assert (config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.target_modules, config.lora.bias) == \
        (8, 16, 0.05, "all-linear", "none")
    t = config.train
    assert (t.learning_rate, t.batch_size, t.grad_accum, t.epochs, t.max_length, t.max_grad_norm) == \
        (5e-5, 2, 8, 1, 512, 1.0)
    assert config.eval.max_new_tokens == 256 and config.model.spec == "smollm2-135m-instruct"


@pytest.mark.parametrize("overrides, field, fragment", [
    ({"train": {"learning_rate": -1}}, "train.learning_rate", "greater than 0"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "greater than 0"),
    ({"train": {"batch_size": "two"}}, "train.batch_size", "valid integer"),
    ({"eval": {"max_new_tokens": 0}}, "eval.max_new_tokens", "greater than 0"),
    ({"lora": {"dropout": 1.5}}, "lora.dropout", "less than 1"),
    ({"colour": "blue"}, "colour", "unknown field"),
    ({"seeds": [1, 1]}, "seeds", "distinct"),
    ({"seeds": []}, "seeds", "at least 1"),
    ({"order": ["a", "zzz"]}, "config", "unknown task(s) zzz"),
    ({"tasks": [{"name": "a", "kind": "essay", "builtin": "stance", "max_train_rows": 1, "max_test_rows": 1}]},
     "tasks.0.kind", "'multiple_choice' or 'numeric'"),
    ({"tasks": [{"name": "a", "kind": "numeric"}]}, "tasks.0", "either 'builtin' or both"),
])
def test_invalid_values_name_their_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(minimal(**overrides), source="cfg.yaml")
    message = str(info.value)
    assert message.startswith("cfg.yaml: field '") and f"'{field}'" in message and fragment in message
    assert "\n" not in message


def test_duplicate_task_names():
    task = minimal()["tasks"][0]
    with pytest.raises(ConfigError, match="duplicate task names: a"):
        build_config(minimal(tasks=[task, dict(task)]))


def test_yaml_file_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "cfg.yaml").write_text(
        "tasks:\n  - {name: t, kind: numeric, train: data/train.json, test: data/test.json}\n"
        "reference: {path: data/ref.json}\nseeds: [1, 2]\n")
    config = load_config(tmp_path / "cfg.yaml")
    assert config.tasks[0].train == str(tmp_path / "data" / "train.json")
    assert config.reference.path == str(tmp_path / "data" / "ref.json") and config.seeds == [1, 2]


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not a valid JSON file"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_demo_preset_round_trips():
    config = preset("demo")
    assert [t.name for t in config.ordered_tasks()] == ["stance", "science", "arithmetic"]
    assert build_config(json.loads(config.model_dump_json())) == config
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset("nope")


def test_task_orders():
    two = minimal()["tasks"] + [{"name": "b", "kind": "numeric", "builtin": "arithmetic", "max_train_rows": 4,
                                 "max_test_rows": 4}]
    assert [t.name for t in build_config(minimal(tasks=two)).ordered_tasks()] == ["a", "b"]
    assert [t.name for t in build_config(minimal(tasks=two, order="reversed")).ordered_tasks()] == ["b", "a"]
    assert [t.name for t in build_config(minimal(tasks=two, order=["b", "a"])).ordered_tasks()] == ["b", "a"]
    with pytest.raises(ConfigError, match="every task exactly once"):
        build_config(minimal(tasks=two, order=["a"]))
    with pytest.raises(ConfigError, match="order"):
        build_config(minimal(tasks=two, order="backwards"))


def test_paper_presets_need_the_data_and_use_it(tmp_path, monkeypatch):
    from tiny import TRACE_DIR, needs_trace
    from lorawatch.data.fetch import fetch_dataset

    monkeypatch.setenv("LORAWATCH_DATA", str(tmp_path / "data"))
    with pytest.raises(ConfigError, match=r"preset paper-qwen needs the paper.s data .*lorawatch data fetch trace-500"):
        preset("paper-qwen")
    needs_trace()
    fetch_dataset("trace-500", source=str(TRACE_DIR), log=lambda *a, **k: None)
    for name, model in (("paper-qwen", "Qwen/Qwen3.5-0.8B"), ("paper-llama", "meta-llama/Llama-3.2-1B-Instruct"),
                        ("paper-gemma", "google/gemma-3-1b-it")):
        config = preset(name)
        assert config.model.spec == model and config.seeds == [33, 42, 123]
        assert [t.name for t in config.ordered_tasks()] == ["FOMC", "ScienceQA", "NumGLUE-cm"]
        assert (config.train.learning_rate, config.train.batch_size, config.train.grad_accum) == (5e-5, 2, 8)
        assert config.eval.max_new_tokens == 256
        assert config.reference.path.endswith("reference.json")
        assert config.tasks[2].instruction.startswith("Please reason step by step")


def test_a_change_to_an_optional_sections_field_creates_the_section():
    from lorawatch.config import with_changes
    from lorawatch.presets import preset

    config = with_changes(preset("demo"), {"deploy.formats": ["f16", "q8_0"], "monitor.every": 3})
    assert config.deploy.formats == ["f16", "q8_0"] and config.monitor.every == 3
    assert config.overrides["deploy.formats"] == ["f16", "q8_0"]
