"""git's untracked cache (the UNTR index extension), made for a fresh mount without a walk.

A `git status` looks for untracked files in every directory of the work tree. git keeps what it
found in the index (the untracked cache) and, led by the fsmonitor hook, looks again only where
the hook says something changed. The first status after a mount has no cache yet and walks every
directory: through FUSE, hundreds of times slower than the status after it. But a mount that
was just prepared has no untracked file anywhere, and preparation knows every directory (they
are the commit's trees): so it writes the cache git would have written after that walk, with
every directory valid and empty of untracked files, and the first status walks nothing.

What the mount's overlay already holds (a new preparation of a mount in use) is reported by the
hook against the base token in the same index (fsmonitor.py), which makes git look at those
directories again. Anything git cannot vouch for (another work tree path, other flags, a global
excludes file) makes git drop this cache and walk, as it would have anyway.

Format (git's Documentation/gitformat-index, "Untracked cache"), checked against what git 2.39
writes: the identity of the work tree, the stat data and hashes of info/exclude and of the
global excludes file, the directory flags of a default status, ".gitignore", then every
directory depth first with its number of untracked entries and subdirectories, and three EWAH
bitmaps (valid, check-only, has a .gitignore) followed by stat data of the valid directories and
hashes of their .gitignore files.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

STAT_DATA_BYTES = 36  # ctime, mtime (sec, nsec), dev, ino, uid, gid, size: 32-bit each
# dir.h: DIR_SHOW_OTHER_DIRECTORIES | DIR_HIDE_EMPTY_DIRECTORIES, what `git status` uses.
STATUS_DIR_FLAGS = (1 << 1) | (1 << 2)
PER_DIRECTORY_EXCLUDES = b".gitignore"
EWAH_MAX_LITERALS = (1 << 31) - 1


@dataclass
class Directory:
    name: bytes
    gitignore: bytes | None = None  # the raw hash of its .gitignore, if it has one
    children: dict[bytes, Directory] = field(default_factory=dict)
    submodules: bool = False  # it holds a submodule (a directory git looks at, not into)

    @property
    def recorded_gitignore(self) -> bytes | None:
        """The .gitignore hash git's own walk records: only where it matched a subdirectory
        against the rules. A directory with none never needed its rules, and git, trusting a
        valid directory whose recorded hash is null, does not read them on later statuses either
        (until something changes there, when it reads them all again)."""
        return self.gitignore if self.children or self.submodules else None


def encode_varint(value: int) -> bytes:
    """git's varint (varint.c): seven bits a byte, most significant first, each continuation
    byte's value offset by one."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        value -= 1
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def ewah(bits: list[bool]) -> bytes:
    """An EWAH bitmap of `bits` as git serializes it (ewah/ewah_io.c): bit count, word count,
    64-bit words (one marker word, then literal words), the position of the last marker."""
    size = max((i + 1 for i, bit in enumerate(bits) if bit), default=0)
    literals = []
    for start in range(0, size, 64):
        word = 0
        for offset, bit in enumerate(bits[start : start + 64]):
            if bit:
                word |= 1 << offset
        literals.append(word)
    if len(literals) > EWAH_MAX_LITERALS:
        raise ValueError("too many directories for one EWAH marker word")
    words = [len(literals) << 33, *literals]
    return struct.pack(f">II{len(words)}QI", size, len(words), *words, 0)


def tree_of_directories(paths: Iterable[bytes], gitignores: dict[bytes, bytes],
                        submodules: Iterable[bytes] = ()) -> Directory:  # fmt: skip
    """The directory tree from the commit's directory paths, the raw hashes of its .gitignore
    files by their directory, and the paths of its submodules."""
    root = Directory(b"", gitignores.get(b""))

    def at(path: bytes) -> Directory:
        node = root
        parts = path.split(b"/") if path else []
        for depth, part in enumerate(parts):
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = Directory(part, gitignores.get(b"/".join(parts[: depth + 1])))
            node = child
        return node

    for path in sorted(paths):
        at(path)
    for path in submodules:
        at(path.rsplit(b"/", 1)[0] if b"/" in path else b"").submodules = True
    return root


def untracked_extension(work_tree: Path, root: Directory, *, info_exclude: bytes | None, hash_size: int) -> bytes:
    """The UNTR extension (its signature and size included) of `root`, every directory valid and
    without untracked files, for the work tree at `work_tree`."""
    ident = f"Location {work_tree}, system {os.uname().sysname}".encode() + b"\0"
    no_stat = bytes(STAT_DATA_BYTES)  # git stats these files itself and compares their hashes
    body = bytearray(encode_varint(len(ident)) + ident)
    body += no_stat + no_stat + struct.pack(">I", STATUS_DIR_FLAGS)
    body += (info_exclude or bytes(hash_size)) + bytes(hash_size)  # no global excludes file known
    body += PER_DIRECTORY_EXCLUDES + b"\0"
    ordered = list(_depth_first(root))
    body += encode_varint(len(ordered))
    for directory in ordered:
        body += encode_varint(0) + encode_varint(len(directory.children)) + directory.name + b"\0"
    body += ewah([True] * len(ordered))  # valid
    body += ewah([])  # check-only
    body += ewah([d.recorded_gitignore is not None for d in ordered])
    # The stat data of a valid directory: led by the fsmonitor hook, git never compares it.
    body += no_stat * len(ordered)
    body += b"".join(d.recorded_gitignore for d in ordered if d.recorded_gitignore is not None)
    body += b"\0"
    return b"UNTR" + struct.pack(">I", len(body)) + bytes(body)


def _depth_first(directory: Directory) -> Iterable[Directory]:
    yield directory
    for name in sorted(directory.children):
        yield from _depth_first(directory.children[name])
