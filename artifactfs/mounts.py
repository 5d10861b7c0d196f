"""What is mounted on this host, and how to take a FUSE mount down."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fuse_mounts() -> dict[str, str]:
    """Mount point -> fstype for every FUSE mount visible to this process."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fstype = right.split(" ", 1)[0]
            if fstype.startswith("fuse"):
                mounts[_unescape(left.split(" ")[4])] = fstype
    return mounts


def is_mounted(path: str | Path) -> bool:
    return str(path) in fuse_mounts()


def is_stale(path: str | Path) -> bool:
    """A FUSE mount whose server is gone answers ENOTCONN to everything."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def unmount(path: str | Path, *, lazy: bool = False) -> bool:
    """Unmount a FUSE mount; True if it is gone afterwards."""
    args = ["fusermount3", "-u", "-q"] + (["-z"] if lazy else []) + [str(path)]
    subprocess.run(args, capture_output=True, check=False)
    return not is_mounted(path)
