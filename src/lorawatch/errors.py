"""Errors that are the user's to fix.

Anything raised as a `UserError` is printed by the command line as one line and exits with code 2;
everything else is a bug in lorawatch and keeps its traceback. Warnings reach the user as one line too
(`format_warning`).
"""

from __future__ import annotations

import stat
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem with the user's input: a data file, a config value, a model spec, the environment."""

    exit_code = 2


class DataError(UserError):
    """A data file is missing or malformed. The message names the file and, where known, the row."""

    def __init__(self, path: object, message: str, row: int | None = None):
        where = f"{path}" if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.row = row


class ConfigError(UserError):
    """A config value is invalid. The message names the field."""


class ModelSpecError(UserError):
    """A model spec cannot be resolved to a model and tokenizer."""


def file_problem(path: Path, what: str) -> str | None:
    """Why `path` is not a readable regular file (a missing file, a folder, a pipe that would block a read, a
    symbolic link loop), phrased for a one-line error; None when it is one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"{what} not found" + (" (a broken symbolic link)" if path.is_symlink() else "")
    except OSError as exc:
        return f"{what} cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return f"is a folder; expected a {what}"
    if not stat.S_ISREG(mode):
        return f"is not a regular file (a pipe, socket or device); expected a {what}"
    return None


def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   line: str | None = None) -> str:
    """A warning as one line, `warning: <message>`, for `warnings.formatwarning`: Python's own format adds the
    category, the file and the source line that raised it, which mean nothing to a user. A warning from another
    library keeps its category and origin in brackets, still on the line, so that a user can search for it."""
    text = " ".join(str(message).split())
    path = Path(filename)
    if path.is_relative_to(_PACKAGE) or path.resolve().is_relative_to(_PACKAGE):
        return f"warning: {text}\n"
    return f"warning: {text} [{category.__name__}, {path.name}:{lineno}]\n"
