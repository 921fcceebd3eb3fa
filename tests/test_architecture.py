"""The layout's promises (docs/architecture.md), read from the source: which package may import which, and
optional dependencies only where they are used. A new import that breaks the one-way flow fails here."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorawatch"

# package -> packages of lorawatch it must not import (anywhere in its modules, module level or not)
FORBIDDEN = {
    "engine": {"analysis", "report", "recipe", "study", "integrations"},
    "rundir": {"analysis", "report", "recipe", "study", "integrations"},
    # deploy loads models and runs llama.cpp; analysis reads the deployed forms' files through rundir
    "analysis": {"engine", "recipe", "models", "study", "integrations", "deploy"},
    # the report reads finished run folders: no model, no training, no llama.cpp (the deployed forms through
    # analysis/deployed.py)
    "report": {"engine", "recipe", "models", "deploy"},
    "models": {"engine", "recipe", "analysis", "report", "rundir", "study", "integrations", "data"},
    "data": {"engine", "recipe", "analysis", "report", "rundir", "study", "integrations", "models"},
    # export reads a finished run (rundir, analysis) and loads its model (models, engine); it trains nothing
    "deploy": {"recipe", "report", "study", "integrations", "cli"},
}
# optional dependencies imported anywhere (inside a function too) -> the only modules that may: llama.cpp's
# runtime is reached through deploy/gguf.llama_cpp_module (which silences its logging once, for every caller)
ANYWHERE = {"llama_cpp": {"deploy/gguf.py"}}
# optional dependencies -> the only places that may import them at module level
OPTIONAL = {"ray": {"study/ray_backend.py"}, "mlflow": set(), "tensorboard": set(), "trl": set(),
            "llama_cpp": set()}


def imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def modules_of(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downstream(package):
    broken = []
    for path in modules_of(package):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "lorawatch" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                broken.append(f"{path.relative_to(SRC)} imports {name}")
    assert modules_of(package) and not broken, "\n".join(broken)


def test_optional_dependencies_are_imported_where_they_are_used():
    broken = []
    for path in SRC.rglob("*.py"):
        rel = str(path.relative_to(SRC))
        for name in imports(path, module_level_only=True):
            top = name.split(".")[0]
            if top in OPTIONAL and rel not in OPTIONAL[top]:
                broken.append(f"{rel} imports {name} at module level")
    assert not broken, "\n".join(broken)


def test_llama_cpp_is_imported_in_one_place():
    broken = []
    for path in SRC.rglob("*.py"):
        rel = str(path.relative_to(SRC))
        for name in imports(path):
            top = name.split(".")[0]
            if top in ANYWHERE and rel not in ANYWHERE[top]:
                broken.append(f"{rel} imports {name}")
    assert not broken, "\n".join(broken)
