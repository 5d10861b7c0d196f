"""What is mounted on this host, and how to take a FUSE mount down."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings


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
    """A FUSE mount whose server is gone answers ENOTCONN to everything it is asked. statfs is
    always asked (stat may be answered from the kernel's attribute cache, for minutes)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def unmount(path: str | Path, *, lazy: bool = False) -> bool:
    """Unmount a FUSE mount; True if it is gone afterwards."""
    args = ["fusermount3", "-u", "-q"] + (["-z"] if lazy else []) + [str(path)]
    subprocess.run(args, capture_output=True, check=False)
    return not is_mounted(path)


def under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def artifactfs_mounts() -> set[Path]:
    """Mount points of artifactfs mounts (any installation's) visible to this process."""
    return {Path(path) for path, fstype in fuse_mounts().items() if fstype == "fuse.artifactfs"}


MAX_SYMLINKS = 40


def resolve_outside(path: Path, enclosing: Callable[[Path], str | None], *, strict: bool = False) -> Path:
    """os.path.realpath(path), one component at a time, refusing before it would look up a name
    inside a mount: `enclosing(p)` says which mount `p` lies in (None if none).

    os.path.realpath would lstat every component, and a lookup inside a gated placeholder waits
    until its repository is ready (for ever, if the caller is the mountd that would open it).
    With `strict`, a missing component raises FileNotFoundError (NotADirectoryError where a file
    stands in the middle); otherwise the rest is taken as written.
    """
    from .model import MountRefused

    current = Path("/")
    pending = list(path.parts[1:])
    links = 0
    missing: OSError | None = None  # raised once `current`, the missing name, is known to lie outside
    while True:
        inside = enclosing(current)
        if inside is not None:
            raise MountRefused(f"{path} lies inside {inside}: choose a path outside every mount")
        if missing is not None:
            raise missing
        if not pending:
            return current
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except (FileNotFoundError, NotADirectoryError) as exc:
            if strict:  # a registered mount path need not exist yet: that refusal comes first
                missing, current = exc, candidate
                continue
            is_link = False
        if is_link:
            links += 1
            if links > MAX_SYMLINKS:
                raise MountRefused(f"{path}: too many levels of symbolic links")
            target = Path(os.readlink(candidate))
            pending = list(target.parts[1:] if target.is_absolute() else target.parts) + pending
            if target.is_absolute():
                current = Path("/")
            continue
        current = candidate


def inside_artifactfs_mount(mounts: set[Path]) -> Callable[[Path], str | None]:
    """For resolve_outside: the innermost of `mounts` a path lies in."""

    def enclosing(path: Path) -> str | None:
        found = max((m for m in mounts if under(path, m)), key=lambda m: len(m.parts), default=None)
        return None if found is None else f"the artifactfs mount {found}"

    return enclosing


def check_mount_path(settings: "Settings", name: str, path: str | Path) -> Path:
    """The mount path of repository `name`, refused unless it is <allowed mount root>/.../<name>
    and lies inside no artifactfs mount.

    Mounting (and unmounting, and creating the mount point) is done as root, so a path from the
    registry is checked again here, after resolving symbolic links in its parent, every time.
    """
    from .model import MountRefused

    raw = Path(path)
    if not raw.is_absolute() or raw.name != name or ".." in raw.parts:
        raise MountRefused(f"mount path {str(raw)!r} of {name!r} is not <mount root>/{name}")
    enclosing = inside_artifactfs_mount(artifactfs_mounts())
    parent = resolve_outside(raw.parent, enclosing)
    roots = [resolve_outside(root, enclosing) for root in settings.mount_roots]
    if not any(under(parent, root) for root in roots):
        allowed = ":".join(str(r) for r in settings.mount_roots)
        raise MountRefused(
            f"mount path {raw} is outside the allowed mount roots ({allowed}): "
            "choose a --mount-root under one of them, or add it to ARTIFACTFS_ALLOWED_MOUNT_ROOTS"
        )
    return parent / name
