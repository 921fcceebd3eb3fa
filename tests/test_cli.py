"""The command line as a user meets it: exit codes, one-line errors and warnings. The first test runs real
subprocesses; the rest run the same entry point in this interpreter (tiny.cli)."""

import json

from tiny import assert_one_line_error, cli, config_file, lorawatch


def test_run_prints_the_tables(tmp_path, tiny_model_dir):
    result = lorawatch("run", config_file(tmp_path, tiny_model_dir), "--out", tmp_path / "run", "--seeds", "3")
    assert result.returncode == 0, result.stderr
    for title in ("Accuracy matrix", "Continual-learning metrics", "Stability on the reference set", "KL to base",
                  "Summary: final avg accuracy"):
        assert title in result.stdout
    assert "stage 2 (sum)" in result.stderr  # the per-stage progress log
    shown = lorawatch("show", tmp_path / "run")
    assert shown.returncode == 0 and "Accuracy matrix" in shown.stdout
    again = lorawatch("run", config_file(tmp_path, tiny_model_dir), "--out", tmp_path / "run", "--seeds", "3")
    assert again.returncode == 0 and "resuming" in again.stderr and "Accuracy matrix" in again.stdout
    changed = lorawatch("run", config_file(tmp_path, tiny_model_dir, eval={"max_new_tokens": 5}), "--out",
                        tmp_path / "run", "--seeds", "3")
    assert_one_line_error(changed, "different config", "eval.max_new_tokens")


def test_bad_data_file(tmp_path, tiny_model_dir):
    path = config_file(tmp_path, tiny_model_dir)
    (tmp_path / "data" / "num_test.json").write_text('[{"prompt": "x"}]')
    assert_one_line_error(cli("run", path, "--out", tmp_path / "r"), "num_test.json", "row 1", "'answer'")
    assert not (tmp_path / "r").exists()  # nothing half-made is left behind


def test_missing_data_file(tmp_path, tiny_model_dir):
    path = config_file(tmp_path, tiny_model_dir)
    (tmp_path / "data" / "mc_train.json").unlink()
    assert_one_line_error(cli("run", path, "--out", tmp_path / "r"), "mc_train.json", "file not found")


def test_unknown_model_spec(tmp_path, tiny_model_dir):
    path = config_file(tmp_path, tiny_model_dir)
    assert_one_line_error(cli("run", path, "--model", "no-such-model", "--out", tmp_path / "r"),
                          "no-such-model")


def test_invalid_config_value_and_unknown_kind(tmp_path, tiny_model_dir):
    path = config_file(tmp_path, tiny_model_dir, train={"learning_rate": 0})
    assert_one_line_error(cli("run", path), "config.json", "train.learning_rate", "greater than 0")
    data = json.loads(path.read_text())
    data["train"] = {}
    data["tasks"][0]["kind"] = "essay"
    path.write_text(json.dumps(data))
    assert_one_line_error(cli("run", path), "tasks.0.kind", "'essay'")


def test_bad_seeds_and_show_on_non_run(tmp_path):
    assert_one_line_error(cli("run", "--seeds", "1,x"), "--seeds")
    assert_one_line_error(cli("show", tmp_path), "not a lorawatch run folder")
    assert_one_line_error(cli("run", "--preset", "nope"), "unknown preset 'nope'")


def test_metrics_table_output(tmp_path):
    matrix = tmp_path / "m.csv"
    matrix.write_text("checkpoint,a,b\nbase,0.2,0.3\na,0.6,0.4\nb,0.5,0.7\n")
    result = cli("metrics", matrix)
    assert result.returncode == 0 and "OP" in result.stdout.upper() and "0.600" in result.stdout


def test_reversed_order_and_published_position(tmp_path, tiny_model_dir):
    path = config_file(tmp_path, tiny_model_dir, reference={"path": "data/reference.json", "position": "published"})
    result = cli("run", path, "--order", "reversed", "--out", tmp_path / "run", "--seeds", "5",
                       "--max-test-rows", "3")
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "run" / "seed-5" / "accuracy_matrix.csv").read_text().splitlines()[0]
    assert header == "checkpoint,sum,stance"
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["order"] == "reversed" and recorded["reference"]["position"] == "published"
    assert recorded["overrides"] == {"seeds": [5], "order": "reversed", "tasks.*.max_test_rows": 3}
    assert all(t["max_test_rows"] == 3 for t in recorded["tasks"])
    assert_one_line_error(cli("run", path, "--order", "sum,nope", "--out", tmp_path / "r2"), "nope")


def test_a_library_warning_is_one_line_with_its_category_and_origin():
    """lorawatch's own warnings are `warning: <message>` (test_resume checks that in a real run); another
    library's keep one line too, with where they come from, and no source line after them."""
    from lorawatch import errors

    library = errors.format_warning(FutureWarning("`x` is deprecated;\n  use `y`"), FutureWarning,
                                    "/venv/site-packages/transformers/utils.py", 12, "    x()")
    assert library == "warning: `x` is deprecated; use `y` [FutureWarning, utils.py:12]\n"
    own = errors.format_warning(UserWarning("data.json: 2 rows"), UserWarning, errors.__file__, 3, "warn()")
    assert own == "warning: data.json: 2 rows\n"
