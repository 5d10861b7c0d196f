"""The shared types of the filesystem: kinds of entries, the commit shown (Snapshot), the
inode table's nodes and the handles open on them."""
from __future__ import annotations

import enum
import stat
from dataclasses import dataclass, field

import pyfuse3
import pygit2

from .hydrator import Hydrator

DOTGIT_INODE = pyfuse3.ROOT_INODE + 1
FIRST_INODE = DOTGIT_INODE + 1
FIXED_INODES = frozenset({pyfuse3.ROOT_INODE, DOTGIT_INODE})


class Kind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    EXEC = "exec"
    LINK = "link"
    GITLINK = "gitlink"  # a submodule: shown as an empty directory
    DOTGIT = "dotgit"  # the synthesized `.git` file at the root


BLOB_KINDS = frozenset({Kind.FILE, Kind.EXEC, Kind.LINK})
GIT_MODE_KINDS = {
    pygit2.enums.FileMode.TREE: Kind.DIR,
    pygit2.enums.FileMode.BLOB: Kind.FILE,
    pygit2.enums.FileMode.BLOB_EXECUTABLE: Kind.EXEC,
    pygit2.enums.FileMode.LINK: Kind.LINK,
    pygit2.enums.FileMode.COMMIT: Kind.GITLINK,
}
KIND_MODES = {
    Kind.DIR: stat.S_IFDIR | 0o755,
    Kind.GITLINK: stat.S_IFDIR | 0o755,
    Kind.FILE: stat.S_IFREG | 0o644,
    Kind.EXEC: stat.S_IFREG | 0o755,
    Kind.LINK: stat.S_IFLNK | 0o777,
    Kind.DOTGIT: stat.S_IFREG | 0o644,
}


@dataclass(eq=False)
class Snapshot:
    """What the mount shows: one commit of one git directory, and the hydrator that fills it."""

    repo: pygit2.Repository
    commit: pygit2.Commit
    dotgit: bytes
    mtime_ns: int
    hydrator: Hydrator


Entry = tuple[Kind, str | None]  # a directory entry as git has it: kind and object id


@dataclass(eq=False)
class Node:
    inode: int
    parent: int
    name: bytes
    kind: Kind
    oid: str | None  # tree id for directories, blob id for files and links, commit id for gitlinks
    snap: Snapshot  # the commit this node belongs to
    entries: dict[bytes, Entry] | None = None  # a directory's git tree, by name, read on first use
    children: dict[bytes, int] = field(default_factory=dict)  # the nodes made so far for entries
    listed: bool = False  # listed by readdir: its files come along when one of them is fetched
    misses: int = 0  # blobs of this directory fetched one at a time so far
    lookups: int = 0  # the kernel's lookup count: entries handed out and not forgotten yet
    handles: int = 0  # open file and directory handles on this node

    @property
    def is_dir(self) -> bool:
        return self.kind in (Kind.DIR, Kind.GITLINK)

    @property
    def is_blob(self) -> bool:
        return self.kind in BLOB_KINDS


@dataclass(eq=False)
class Handle:
    """One open() or opendir(): the node (and through it the commit) it was opened on."""

    node: Node
