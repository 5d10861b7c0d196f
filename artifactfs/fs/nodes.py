"""The shared types of the filesystem: kinds of entries, the commit shown (Snapshot), the
inode table's nodes and the handles open on them."""
from __future__ import annotations

import enum
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyfuse3
import pygit2

from .hydrator import Hydrator

if TYPE_CHECKING:
    from .contents import Contents
    from .layers import Layers, Shown
    from .overlay import OverlayEntry

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
    ANSWER = "answer"  # an fsmonitor answer: found by a lookup at the root, never listed


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
    Kind.ANSWER: stat.S_IFREG | 0o444,
}


@dataclass(eq=False)
class Snapshot:
    """What the mount shows: one commit of one git directory, and the hydrator that fills it."""

    repo: pygit2.Repository
    commit: pygit2.Commit
    dotgit: bytes
    mtime_ns: int
    hydrator: Hydrator
    layers: Layers  # this commit's trees under the overlay
    contents: Contents  # its blobs' contents, as reads want them


@dataclass(eq=False)
class Node:
    inode: int
    parent: int
    name: bytes
    kind: Kind
    # The base object it shows: a tree for a directory (None for one the overlay made), a blob for
    # a file or link whose content is still the base's, a commit for a gitlink.
    oid: str | None
    snap: Snapshot  # the commit this node belongs to
    # The overlay's record of this path, if it has one. Its path goes stale when a directory above
    # is renamed: the node's place is its parent and name, and only the record's other fields count.
    over: OverlayEntry | None = None
    entries: dict[bytes, Shown] | None = None  # a directory's merged listing, read on first use
    children: dict[bytes, int] = field(default_factory=dict)  # the nodes made so far for entries
    listed_at: float | None = None  # last listed by readdir (monotonic time): see TreeFS._hydrate
    misses: int = 0  # blobs of this directory fetched one at a time so far
    lookups: int = 0  # the kernel's lookup count: entries handed out and not forgotten yet
    handles: int = 0  # open file and directory handles on this node
    mtime_ns: int | None = None  # written to since its record was last saved (on release, fsync)
    unlinked: bool = False  # removed or replaced while the kernel or a handle still holds it
    answer: bytes | None = None  # what an ANSWER node holds (made with it, never changed)
    stored: str | None = None  # the blob last put into the kernel's page cache (TreeFS._store_pages)

    @property
    def is_dir(self) -> bool:
        return self.kind in (Kind.DIR, Kind.GITLINK)

    @property
    def is_blob(self) -> bool:
        return self.kind in BLOB_KINDS

    @property
    def data(self) -> int | None:
        """The overlay content file holding this file's content, if it is no longer the base's."""
        return self.over.data if self.over is not None else None


@dataclass(eq=False)
class Handle:
    """One open() or opendir(): the node (and through it the commit) it was opened on."""

    node: Node
    writable: bool = False
    append: bool = False
    fd: int | None = None  # open on content file `data` (the node's, unless it was copied up since)
    data: int | None = None
    names: list[bytes] | None = None  # a directory's names as listed when readdir began
