"""Where a run is logged: the tracker's store with its default made explicit (beside the run or the study), and
checked before any model work, so that a typo costs seconds, not a run."""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
from pathlib import Path

from lorawatch.config import TrackingSettings
from lorawatch.errors import UserError
from lorawatch.rundir.layout import tracker_store

_INSTALL = {"mlflow": ("mlflow", "pip install 'lorawatch[mlflow]'"),
            "tensorboard": ("tensorboard", "pip install 'lorawatch[tensorboard]'")}
BACKENDS = tuple(_INSTALL)


def require(backend: str) -> None:
    """A one-line error, before any model work, when the backend's package is missing."""
    module, install = _INSTALL[backend]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"tracking with {backend} needs the {module} package: {install}")


# MLflow's tracking stores by URI scheme (a plain path is its file store); a `+driver` suffix is allowed.
_MLFLOW_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
REACH_TIMEOUT_S = 5.0  # a tracking server that does not answer within this is refused before any model work


def check_destination(settings: TrackingSettings, home: Path) -> None:
    """Where a run will be logged can take it: the package is there, the URI's scheme is one the tracker knows,
    its folder can be written, a server answers (within REACH_TIMEOUT_S). Checked before any model work, so that
    a typo costs seconds, not a run and minutes of the tracker's retries; every problem is one line."""
    require(settings.backend)
    uri = resolve(settings, home).uri
    if settings.backend == "tensorboard":
        _check_folder(Path(uri), uri, "a folder for TensorBoard's logs")
        return
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter: a folder of MLflow's file store
        _check_folder(Path(uri), uri, "a folder for MLflow's file store")
    elif scheme.split("+")[0] not in _MLFLOW_SCHEMES:
        raise UserError(f"tracking uri {uri!r}: MLflow has no store for scheme '{scheme}'; use sqlite:///FILE.db, a "
                        "folder, or http(s)://HOST:PORT of an MLflow server")
    elif scheme == "sqlite":
        database = sqlite_file(uri)
        if database is None:
            raise UserError(f"tracking uri {uri!r}: expected sqlite:///PATH/TO/FILE.db")
        if database.exists() and not database.is_file():
            raise UserError(f"tracking uri {uri!r}: {database} is not a file; expected an SQLite database file")
        _check_folder(database.parent, uri, "the folder of the SQLite database")
    elif scheme == "file":
        _check_folder(Path(urllib.parse.unquote(parts.path)), uri, "a folder for MLflow's file store")
    elif scheme in ("http", "https"):
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "", port), timeout=REACH_TIMEOUT_S).close()
        except OSError as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or exc.__class__.__name__)
            raise UserError(f"tracking uri {uri!r}: no MLflow server answers there ({reason} within "
                            f"{REACH_TIMEOUT_S:g} s); start it, or give another --uri") from None


def _check_folder(folder: Path, uri: str, what: str) -> None:
    """`folder` is, or can be made as, a writable folder."""
    folder = folder.expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise UserError(f"tracking uri {uri!r}: {existing} is a link that leads nowhere; expected {what}")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"tracking uri {uri!r}: {existing} is a file; expected {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"tracking uri {uri!r}: {existing} cannot be written; expected {what}")


def sqlite_file(uri: str) -> Path | None:
    """A SQLite store's database file (its artifacts go beside it); None for a server or Databricks."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def resolve(settings: TrackingSettings, home: Path) -> TrackingSettings:
    """The settings with the default store made explicit: `sqlite:///<home>/mlflow.db` for MLflow,
    `<home>/tensorboard` for TensorBoard. A study gives this to its units, so that children and parent share
    one store."""
    if settings.uri is not None:
        return settings
    home = Path(home).resolve()
    where = tracker_store(home, settings.backend)
    uri = f"sqlite:///{where.as_posix()}" if settings.backend == "mlflow" else str(where)
    return settings.model_copy(update={"uri": uri})


def destination(settings: TrackingSettings, home: Path, name: str, parent: str | None = None) -> dict:
    """Where a run goes, resolved (schema.TrackingDestination): what tracking.json matches a tracker run by."""
    uri = resolve(settings, home).uri
    if settings.backend == "tensorboard":
        uri = str(Path(parent or uri).resolve())
    return {"backend": settings.backend, "uri": uri, "parent": parent,
            "experiment": None if parent else settings.experiment or name}  # a child: its parent's experiment
