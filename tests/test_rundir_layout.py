"""The run folder has one owner: no module outside lorawatch/rundir/ spells the name of a run file or folder
(rundir/layout.py is the only place that does; the names checked are read from it, so the test cannot go stale),
and no module locks with fcntl (which would make lorawatch unimportable on Windows)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lorawatch.rundir import layout

SRC = Path(__file__).resolve().parents[1] / "src" / "lorawatch"

# A run file's name that is also the name of something else where it is spelled.
ELSEWHERE = {
    ("models/loading.py", "config.json"): "a Hugging Face model folder's config",
    ("study/driver.py", "tracking.json"): "a study folder's record of its parent tracker run",
}
_JOINS = {"joinpath", "glob", "rglob", "with_name"}


def _names() -> tuple[list[str], list[str], list[str]]:
    """(file names, plain folder names, numbered-folder prefixes) of the layout."""
    names = layout.run_file_names()
    files = [n for n in names if "." in n and "{" not in n]
    folders = [n for n in names if "." not in n and "{" not in n]
    prefixes = [n.split("{")[0] for n in names if n.endswith("-{}")]
    return files, folders, prefixes


def _prose(tree: ast.AST) -> set[int]:
    """The strings that are documentation: docstrings, and a command's or a field's help (help=, description=)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            found |= {id(part) for part in ast.walk(node.value)}
    return found


def _joined(node: ast.AST) -> list[ast.AST]:
    """The operands a path is built from: `x / "a"`, x.joinpath("a"), x.glob("a"), ..."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return [node.left, node.right]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _JOINS:
        return list(node.args)
    return []


def _texts(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def spelled(source: str) -> list[str]:
    """The run-file names a module's code spells (its documentation and comments aside)."""
    files, folders, prefixes = _names()
    tree = ast.parse(source)
    docstrings = _prose(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [name for name in files if name in node.value]
            found += [prefix for prefix in prefixes if re.match(re.escape(prefix) + r"(\d|$)", node.value)]
        for operand in _joined(node):
            found += [text for text in _texts(operand) if text in folders]
    return found


def test_the_scan_finds_what_it_looks_for():
    source = '''
"""stage.json, seed-1/ and predictions/ in a docstring are prose"""
a = run / "seed-1" / "stage.json"
b = folder / "predictions" / f"{task}.jsonl"
c = f"seed-{seed}"
d = path.with_name("summary")
e = {"summary": 1, "adapter": None}  # a dict key is no path
f = typer.Option(help="written to RUN/costs.json")
g = write(message="written to RUN/costs.json")
'''
    assert sorted(spelled(source)) == ["costs.json", "predictions", "seed-", "seed-", "stage.json", "summary"]


@pytest.mark.parametrize("path", sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                                        if "rundir" not in p.relative_to(SRC).parts))
def test_no_module_outside_rundir_spells_a_run_file(path):
    found = [name for name in spelled((SRC / path).read_text(encoding="utf-8")) if (path, name) not in ELSEWHERE]
    assert not found, f"{path} spells {sorted(set(found))}: ask rundir.layout's RunFolder/Stage for the file"


def test_nothing_locks_with_fcntl():
    users = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
             if re.search(r"^\s*(import fcntl|from fcntl )", p.read_text(encoding="utf-8"), re.M)]
    assert users == []
