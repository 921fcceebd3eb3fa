"""The documentation site builds with `mkdocs build --strict` (every relative link resolves, no page is left
out), and its generated references cover the live command line and config: a command or config section the
generator misses fails here, not in a reader's browser."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lorawatch
import lorawatch.cli
import lorawatch.config

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs", reason="the docs extra (mkdocs, mkdocs-material) is not installed")
pytest.importorskip("material", reason="the docs extra (mkdocs, mkdocs-material) is not installed")
sys.path.insert(0, str(REPO / "docs" / "hooks"))
import reference  # noqa: E402  (docs/hooks/reference.py: the generator the build runs)

sys.path.pop(0)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # The build imports lorawatch in its own process: the same copy as this test's.
    src = str(Path(lorawatch.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(REPO / "mkdocs.yml"), "--site-dir", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))


def test_the_cli_reference_names_every_command_and_option(site):
    page = (site / "cli-reference" / "index.html").read_text(encoding="utf-8")
    text = _text(site / "cli-reference" / "index.html")
    commands = reference.cli_commands(lorawatch.cli.app)
    assert len(commands) >= 10
    import typer.main

    root = typer.main.get_command(lorawatch.cli.app)
    for path in commands:
        assert f'id="{path.replace(" ", "-")}"' in page, f"{path} has no section in the CLI reference"
        command = root
        for name in path.split()[1:]:
            command = command.commands[name]
        for param in command.params:
            names = [param.name.upper()] if reference._is_argument(param) else param.opts
            for name in names:
                assert name in text, f"{path}: {name} is missing from the CLI reference"


def test_the_config_reference_names_every_section_and_field(site):
    page = (site / "config-reference" / "index.html").read_text(encoding="utf-8")
    text = _text(site / "config-reference" / "index.html")
    sections = reference.config_sections(lorawatch.config)
    assert {"model", "tasks", "reference", "train", "eval"} <= set(sections)
    for section in sections:
        assert f'id="{reference._anchor(section)}' in page, f"config section {section} has no section on the page"
    for root in reference.config_roots(lorawatch.config):
        for name, info in root.model_fields.items():
            assert name in text
            for model in reference._models_in(info.annotation):
                for field in model.model_fields:
                    assert field in text, f"{name}.{field} is missing from the config reference"


def test_the_home_page_is_the_readme(site):
    readme_title = (REPO / "README.md").read_text(encoding="utf-8").splitlines()[2].strip("* ")
    assert readme_title in _text(site / "index.html")
