"""Writing so that a reader, or a run resumed after a crash, sees the old file or the new one, never half of
one: a temporary name in the same folder, written and synced, then renamed over the target. A folder is
replaced the same way, whole.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from lorawatch.errors import UserError

_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def open_for_replace(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside `path`; when the block ends without an error, the file is synced
    and renamed to `path`. An error in the block (a failed check too) leaves `path` as it was and no temporary
    file behind. A full, read-only or forbidden disk is the user's one-line error, not a traceback."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results unreadable to the user's group
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRORS:
            # disk full, read-only or forbidden: the user's environment, not a bug; finished files stay
            raise UserError(f"{path}: cannot write ({exc.strerror or exc}); finished results are kept, "
                            "free the problem and run the same command again to resume") from None
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with open_for_replace(path) as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def replace_folder(target: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to fill; when the block ends without an error it takes
    `target`'s place whole (an old `target` is removed first), so that `target` is never half written."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def copy_folder(source: Path, target: Path) -> None:
    """Copy a folder so that `target` appears whole or not at all."""
    with replace_folder(target) as tmp:
        shutil.copytree(source, tmp)
