"""Errors that are the user's to fix.

Anything raised as a `UserError` is printed by the command line as one line and exits with code 2;
everything else is a bug in lorawatch and keeps its traceback.
"""

from __future__ import annotations


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
