"""Per-repository locks: one add, prepare or remove of a name at a time on this host.

A lock is an flock on <root>/locks/<name>.lock, and the file is removed when its holder lets go,
so lock files of removed repositories and failed adds do not pile up. Removing a lock file must
never let two holders in: a waiter may have opened the file just before it was unlinked, and
would then hold a lock on a file nobody else can find. So whoever takes the flock checks that the
path still names the very file it locked (same device and inode), and starts over if not.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _names_locked_file(fd: int, lock_file: Path) -> bool:
    try:
        on_disk = os.stat(lock_file, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


@contextmanager
def repo_lock(lock_file: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `lock_file`; yields False if not blocking and it is taken."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        except BaseException:
            os.close(fd)
            raise
        if _names_locked_file(fd, lock_file):
            break
        os.close(fd)  # its holder removed it while we waited: lock the file that is there now
    try:
        yield True
    finally:
        # Unlink before unlocking: a waiter on this file then finds it gone and starts over. Only
        # the file we hold: under this protocol nobody else can replace it meanwhile.
        try:
            if _names_locked_file(fd, lock_file):
                lock_file.unlink()
        finally:
            os.close(fd)  # closing releases the lock
