"""The two locks lorawatch takes, through `filelock` (flock on POSIX, LockFileEx on Windows): the OS drops a lock
when its holder dies, so a crash never leaves one stuck. The lock files stay in place after a release."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from lorawatch.errors import UserError


def _lock(path: Path, on_acquired: Callable[[int], None] | None = None) -> FileLock:
    # preserve_lock_file: deleting the file on release would let a second writer lock a new inode of the same name
    return FileLock(path, preserve_lock_file=True, on_acquired=on_acquired)


@contextmanager
def writer_lock(path: Path, what: Path) -> Iterator[None]:
    """One writer for `what` (a run folder), whose lock file is `path`: a second one is refused at once with a
    one-line error naming the holder, which the lock file holds while it is held."""
    holder = (f"lorawatch pid {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}").encode()

    def note_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, holder)

    lock = _lock(path, note_holder)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        try:
            named = path.read_text(encoding="utf-8").strip()
        except OSError:
            named = ""
        raise UserError(f"{what}: already being written by {named or 'another process'}; wait for it to finish "
                        "or use another --out") from None
    try:
        yield
    finally:
        lock.release()


def is_held(path: Path) -> bool:
    """Whether a process holds the lock of `path` now."""
    if not path.is_file():
        return False
    lock = _lock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return True
    lock.release()
    return False


@contextmanager
def waiting_lock(path: Path | None, on_wait: Callable[[], None]) -> Iterator[None]:
    """While held, this process alone works under `path`'s lock; another one waits its turn (`on_wait` is called
    once when it has to). Without a usable place for the lock file there is nothing to share, and no lock."""
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            on_wait()
            lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()
