import json

import pytest

from lorawatch.errors import DataError
from lorawatch.data.tasks.base import Task
from lorawatch.data.tasks.loading import load_examples, load_reference


def write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_json_and_jsonl(tmp_path):
    rows = [{"prompt": "p1", "answer": "A"}, {"prompt": "p2", "answer": 3}]
    a = load_examples(write(tmp_path / "a.json", json.dumps(rows)), task="t", split="train")
    b = load_examples(write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n"), task="t",
                      split="test")
    assert [e.prompt for e in a] == ["p1", "p2"] and [e.answer for e in b] == ["A", "3"]
    assert a[0].id == "t/train/0" and b[1].id == "t/test/1"


@pytest.mark.parametrize("name, content, expected", [
    ("missing.json", None, "file not found"),
    ("empty.json", "", "file is empty"),
    ("bad.json", "{not json", "not valid JSON"),
    ("dict.json", '{"prompt": "x", "answer": "A"}', "found a dict"),
    ("none.json", "[]", "contains no rows"),
    ("scalar.json", '["x"]', "row 1: expected an object"),
    ("noprompt.json", '[{"answer": "A"}]', "row 1: missing 'prompt'"),
    ("noanswer.json", '[{"prompt": "x", "answer": "A"}, {"prompt": "y"}]', "row 2: missing 'answer'"),
    ("emptyprompt.json", '[{"prompt": "  ", "answer": "A"}]', "'prompt' must be a non-empty string"),
    ("listanswer.json", '[{"prompt": "x", "answer": ["A"]}]', "'answer' must be a string or a number"),
    ("emptyanswer.json", '[{"prompt": "x", "answer": ""}]', "'answer' is empty"),
    ("badline.jsonl", '{"prompt": "x", "answer": "A"}\n{oops\n', "row 2: not valid JSON"),
    ("latin1.json", b'[{"prompt": "caf\xe9", "answer": "A"}]', "not UTF-8"),
    ("letter.json", '[{"prompt": "x", "answer": "maybe"}]', "must start with an option letter"),
])
def test_malformed_files_name_file_and_row(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError) as info:
        load_examples(path, task="t", split="train", kind="multiple_choice")
    assert str(path) in str(info.value) and expected in str(info.value)


def test_word_golds_warn_once_per_file_not_refuse(tmp_path):
    rows = [{"prompt": "day?", "answer": "FRIDAY"}, {"prompt": "x", "answer": "4"}, {"prompt": "y", "answer": "May"}]
    path = write(tmp_path / "n.json", json.dumps(rows))
    with pytest.warns(UserWarning) as caught:
        loaded = load_examples(path, task="t", split="test", kind="numeric")
    assert len(loaded) == 3
    assert len(caught) == 1
    assert str(path) in str(caught[0].message) and "2 numeric answer(s) are words" in str(caught[0].message) \
        and "rows 1, 3" in str(caught[0].message)


def test_reference_rows_map_to_tasks(tmp_path):
    tasks = [Task("FOMC", "multiple_choice", "i"), Task("NumGLUE-cm", "numeric", "j")]
    path = write(tmp_path / "ref.json", json.dumps([
        {"prompt": "a", "answer": "A", "task_name": "fomc"},
        {"prompt": "b", "answer": "12", "task_name": "numglue_cm"},
    ]))
    rows = load_reference(tasks, path=str(path), builtin_per_task=None, builtin_names={}, max_rows=None)
    assert [r.task for r in rows] == ["FOMC", "NumGLUE-cm"]
    write(path, json.dumps([{"prompt": "a", "answer": "A", "task_name": "other"}]))
    with pytest.raises(DataError, match="row 1: task 'other'"):
        load_reference(tasks, path=str(path), builtin_per_task=None, builtin_names={}, max_rows=None)
