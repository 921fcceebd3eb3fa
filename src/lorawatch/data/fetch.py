"""Download the paper's data, verified file by file against a pinned manifest.

    fetch_dataset("trace-500")              # -> ~/.local/share/lorawatch/data/trace-500 (or $LORAWATCH_DATA/...)
    fetch_dataset("trace-500", dest=Path("data"), source="/mnt/copy")   # a local folder or a base URL

Every file is written to a temporary name in its destination folder, its size and SHA-256 are checked,
and only then is it renamed into place: a file at its final name is always a verified one. Files already
present with the right digest are not transferred again, so a fetch that failed half way is finished by
running it again. Standard library only (urllib); one timeout per request.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from lorawatch.errors import UserError

_CHUNK = 64 * 1024
DEFAULT_TIMEOUT = 30.0  # seconds, per request (connecting and each read)
_USER_AGENT = "lorawatch-fetch/0.1 (+https://github.com/tspthomas/slm_stability_cl)"
_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


@dataclass(frozen=True)
class DatasetFile:
    path: str  # relative, with forward slashes
    size: int  # bytes
    sha256: str


@dataclass(frozen=True)
class DatasetManifest:
    name: str
    description: str
    repository: str  # owner/name on GitHub
    commit: str
    folder: str  # inside the repository, ends with '/'
    files: tuple[DatasetFile, ...]

    @property
    def base_url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repository}/{self.commit}/{self.folder}"

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


# The paper's TRACE subsets (data/llm-cl-500/ of the authors' repository at the pinned commit).
# Sizes and SHA-256 were computed once from a copy identical to that commit.
_TRACE_500_FILES = (
    DatasetFile("FOMC/eval.json", 34906, "bc258307c34bb277b5158713e9ec13fc20547b53c306413fddca7da7fc10c255"),
    DatasetFile("FOMC/eval_dev.json", 41074, "e317f44bab72d7230052321ad050060b050d02ee860124800b50b07f7746c9fe"),
    DatasetFile("FOMC/test.json", 36967, "8b257fcda84600ceb000235d3af87b5ef754694d04d81c9e60bda2a632e608ba"),
    DatasetFile("FOMC/train.json", 180920, "ad55548875b28afb37d5e6af0ed241887600b6a5ae5272e04ba687d8d5d0ca5f"),
    DatasetFile("NumGLUE-cm/eval.json", 9548, "87edcff354115a4c96d6eabb09f2b9c669ad895f9c5b91ff88c48bf985ca929f"),
    DatasetFile("NumGLUE-cm/eval_dev.json", 13542,
                "facbca000914598ef684950efd61f05d2d0866cdba665c9147911b05f7a629a0"),
    DatasetFile("NumGLUE-cm/test.json", 19485, "52a3fd70e14995309cc74696f82329f2991fffe5456c805f1a76ed3c0005da7c"),
    DatasetFile("NumGLUE-cm/train.json", 120018,
                "722bbb05819949ff1496a6558f451289e64e52a3f6c34ed81c8a8889e2ce5c08"),
    DatasetFile("ScienceQA/eval.json", 137652, "e4cf69626f1163bed5825b34cae12542b1782698b60b0f67ba6e9cb5b4067195"),
    DatasetFile("ScienceQA/eval_dev.json", 129378,
                "ba74464899a793a01bcad413a618157cd8a8ad329dc3b495f9a7ed5ecb666c39"),
    DatasetFile("ScienceQA/test.json", 140660, "ed1314220ee5f3700fc4b7e93efd5810ad09ee2ce44c9b68a12c648a5ac3e3f9"),
    DatasetFile("ScienceQA/train.json", 668046,
                "8f796547542ffdf89397d4750486d95c9e8fdbe16d6402b9ba6e3d44900d0599"),
    DatasetFile("reference.json", 39414, "73d18158d5db4b2e82197370d7daab9098a41f22331536843864a7ecdb61e9b5"),
)

DATASETS: dict[str, DatasetManifest] = {
    "trace-500": DatasetManifest(
        name="trace-500",
        description="the paper's TRACE subsets: FOMC, ScienceQA, NumGLUE-cm (train/test/eval/eval_dev) "
                    "and the reference set",
        repository="tspthomas/slm_stability_cl",
        commit="801a3b3fdf673cb096995676cda5d6cb1adaef27",
        folder="data/llm-cl-500/",
        files=_TRACE_500_FILES,
    ),
}


# --------------------------------------------------------------------------------------------------
# Where datasets live


def data_root() -> Path:
    """$LORAWATCH_DATA if set, else ~/.local/share/lorawatch/data."""
    root = os.environ.get("LORAWATCH_DATA")
    if root:
        return Path(root).expanduser()
    return Path.home() / ".local" / "share" / "lorawatch" / "data"


def manifest(name: str) -> DatasetManifest:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}") from None


def dataset_dir(name: str) -> Path:
    """The default folder of a dataset: <data root>/<name>."""
    return data_root() / manifest(name).name


def _matches(path: Path, entry: DatasetFile) -> bool:
    try:
        if not path.is_file() or path.stat().st_size != entry.size:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == entry.sha256


def verified_files(name: str, dest: Path | None = None) -> int:
    """How many of the dataset's files are present in `dest` (default: its data folder) with the right digest."""
    folder = Path(dest).expanduser() if dest is not None else dataset_dir(name)
    return sum(_matches(folder / entry.path, entry) for entry in manifest(name).files)


def installed(name: str, dest: Path | None = None) -> bool:
    """True when every file of the dataset is present with the right size and SHA-256."""
    return verified_files(name, dest) == len(manifest(name).files)


# --------------------------------------------------------------------------------------------------
# Fetching


def human_size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    if size < 1000**2:
        return f"{size / 1000:.1f} kB"
    return f"{size / 1000**2:.1f} MB"


class _Source:
    """Where files come from: a base URL (http, https) or a local folder."""

    def __init__(self, text: str, timeout: float):
        self.text = text
        self.timeout = timeout
        self.folder: Path | None = None
        self.base_url: str | None = None
        scheme = urllib.parse.urlsplit(text).scheme.lower() if "://" in text else ""
        if scheme in ("http", "https"):
            self.base_url = text if text.endswith("/") else text + "/"
        elif scheme == "file":
            parts = urllib.parse.urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise UserError(f"source {text}: a file:// URL must name a local folder (file:///path)")
            self.folder = Path(urllib.request.url2pathname(parts.path))
        elif scheme:
            raise UserError(f"source {text}: unsupported URL scheme {scheme!r} (use a local folder, or an http://, "
                            "https:// or file:// URL)")
        else:
            self.folder = Path(text).expanduser()
        if self.folder is not None and not self.folder.is_dir():
            raise UserError(f"source {text}: no such folder (give a local folder, or an http://, https:// or "
                            "file:// URL)")

    def __str__(self) -> str:
        return self.base_url if self.base_url is not None else str(self.folder)

    def location(self, entry: DatasetFile) -> str:
        if self.base_url is not None:
            return self.base_url + urllib.parse.quote(entry.path)
        return str(self.folder / entry.path)

    def open(self, entry: DatasetFile) -> BinaryIO:
        """Open one file for reading; every failure is a UserError naming the file."""
        if self.folder is not None:
            return self._open_local(entry)
        url = self.location(entry)
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 (http/https checked above)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 404:
                raise UserError(f"{entry.path}: not found at the source {self.base_url} (HTTP 404 for {url})") from None
            raise UserError(f"{entry.path}: cannot download {url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise UserError(f"{entry.path}: cannot download {url}: {_reason(exc.reason)}") from None
        except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
            raise UserError(f"{entry.path}: cannot download {url}: {_reason(exc)}") from None

    def _open_local(self, entry: DatasetFile) -> BinaryIO:
        """A regular file of the source folder. Anything else is refused before it is read: a named pipe would
        block the read until something writes to it, a device would be read without end. Opened without
        blocking and checked again on the open file, so that nothing swapped in after the check blocks either."""
        path = self.folder / entry.path

        def refused(mode: int) -> UserError | None:
            if stat.S_ISREG(mode):
                return None
            what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a named pipe, socket or device)"
            return UserError(f"{entry.path}: {path} in the source folder is {what}; expected the dataset's file")

        try:
            error = refused(path.stat().st_mode)
            if error is not None:
                raise error
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise UserError(f"{entry.path}: not found in the source folder {self.folder}") from None
        except OSError as exc:
            raise UserError(f"{entry.path}: cannot read {path} ({exc.strerror or exc})") from None
        error = refused(os.fstat(fd).st_mode)
        if error is not None:
            os.close(fd)
            raise error
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")


def _reason(exc: object) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _install(source: _Source, entry: DatasetFile, target: Path) -> None:
    """Copy one file from the source to a temporary name beside `target`, verify it, rename it into place."""
    where = source.location(entry)
    tmp: str | None = None
    try:
        stream = source.open(entry)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as handle:
                while size <= entry.size:  # never read more than one byte past the expected size
                    try:
                        chunk = stream.read(min(_CHUNK, entry.size + 1 - size))
                    except Exception as exc:  # noqa: BLE001 (timeouts, resets, http.client.IncompleteRead)
                        if isinstance(exc, OSError) and source.folder is not None:
                            raise UserError(f"{entry.path}: cannot read {where} ({_reason(exc)})") from None
                        if isinstance(exc, OSError) or type(exc).__module__ == "http.client":
                            raise UserError(f"{entry.path}: download from {where} failed: {_reason(exc)}") from None
                        raise
                    if not chunk:
                        break
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
                os.fchmod(handle.fileno(), 0o644)
        finally:
            stream.close()
        got = digest.hexdigest()
        if size != entry.size or got != entry.sha256:
            if size < entry.size:
                problem, got_size = "is truncated", f"{size} bytes"
            elif size > entry.size:
                problem, got_size = "is too long", f"more than {entry.size} bytes"
            else:
                problem, got_size = "is corrupt", f"{size} bytes"
            got_digest = "" if size > entry.size else f", sha256 {got[:12]}..."
            raise UserError(f"{entry.path}: the copy from {where} {problem}: expected {entry.size} bytes, sha256 "
                            f"{entry.sha256[:12]}..., got {got_size}{got_digest}; it was not installed")
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        if exc.errno in _ENVIRONMENT_ERRORS or isinstance(exc, (FileExistsError, NotADirectoryError,
                                                                IsADirectoryError)):
            raise UserError(f"{target}: cannot write ({exc.strerror or exc}); verified files are kept, "
                            "free the problem and run the same command again") from None
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def fetch_dataset(name: str, dest: Path | None = None, source: str | None = None, *,
                  log: Callable[[str], object] = print, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download a dataset into `dest` (default `dataset_dir(name)`), verifying every file; return the folder.

    `source` is a base URL (http://, https://, file://) or a local folder laid out like the dataset; by
    default the pinned commit of the authors' repository. Files already present with the right SHA-256 are
    not transferred again. A missing, truncated or corrupted file raises a UserError naming it, and never
    lands at its final name.
    """
    spec = manifest(name)
    if not timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    folder = Path(dest).expanduser() if dest is not None else dataset_dir(name)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    origin = _Source(str(source) if source is not None else spec.base_url, timeout)
    missing = [entry for entry in spec.files if not _matches(folder / entry.path, entry)]
    if not missing:
        log(f"{spec.name}: already installed in {folder}; all {len(spec.files)} files verified, nothing to download")
        return folder
    todo = sum(entry.size for entry in missing)
    log(f"{spec.name}: fetching {len(missing)} of {len(spec.files)} files ({human_size(todo)}) from {origin} "
        f"into {folder}")
    width = max(len(entry.path) for entry in spec.files)
    for entry in spec.files:
        target = folder / entry.path
        if entry not in missing:
            log(f"  {entry.path:<{width}}  {human_size(entry.size):>9}  already present, sha256 ok")
            continue
        replacing = target.exists()
        start = time.monotonic()
        _install(origin, entry, target)
        note = " (replaced a file that differed)" if replacing else ""
        log(f"  {entry.path:<{width}}  {human_size(entry.size):>9}  fetched, sha256 ok "
            f"({time.monotonic() - start:.1f} s){note}")
    log(f"{spec.name}: {len(spec.files)} files verified in {folder} ({len(missing)} fetched, "
        f"{len(spec.files) - len(missing)} already present)")
    return folder
