"""The FUSE filesystem of one mounted repository: one commit's tree, read-only, hydrated lazily.

One method per kernel operation, in the manner of pyfuse3's examples. Trees come from the local
blobless clone through pygit2; a blob is fetched (in a batch, see hydrator.py) only when its
content or its real size is needed. Until then an entry reports size 0 with an attribute timeout
of 0, so the kernel asks again (getattr) before it relies on the size. Every user-facing operation
first passes the readiness gate (gate.py); root getattr, statfs, forget, release and flush never
wait, so `mount`, `df`, unmounting and shell prompts keep working while a repository prepares.

No fault in one operation ends the session: every kernel operation is wrapped (`_contained`) so
that an unexpected exception (a missing object, a pack gone underneath, a bug) fails that one
operation with EIO and one log line.
"""
from __future__ import annotations

import enum
import errno
import functools
import inspect
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import pygit2

from .gate import Gate
from .hydrator import Hydrator
from .model import BlobFetchFailed

log = logging.getLogger(__name__)

DOTGIT_INODE = pyfuse3.ROOT_INODE + 1
FIRST_INODE = DOTGIT_INODE + 1
CACHE_SECONDS = 300.0  # one commit's tree never changes; the gate invalidates on a new commit
SIBLING_BATCH_LIMIT = 2000
BLOB_CACHE_ENTRIES = 64


class Kind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    EXEC = "exec"
    LINK = "link"
    GITLINK = "gitlink"  # a submodule: shown as an empty directory
    DOTGIT = "dotgit"  # the synthesized `.git` file at the root


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


@dataclass
class Node:
    inode: int
    parent: int
    name: bytes
    kind: Kind
    oid: str | None  # tree id for directories, blob id for files and links, commit id for gitlinks
    children: dict[bytes, int] | None = None  # filled on first listing or lookup of a directory
    listed: bool = False  # listed by readdir: its files come along when one of them is fetched
    misses: int = 0  # blobs of this directory fetched one at a time so far

    @property
    def is_dir(self) -> bool:
        return self.kind in (Kind.DIR, Kind.GITLINK)

    @property
    def is_blob(self) -> bool:
        return self.kind in (Kind.FILE, Kind.EXEC, Kind.LINK)


@dataclass
class Snapshot:
    """What the mount shows: one commit of one git directory."""

    repo: pygit2.Repository
    commit: pygit2.Commit
    dotgit: bytes
    mtime_ns: int
    nodes: dict[int, Node] = field(default_factory=dict)


# --- faults stay in their operation ---

# Every request handler pyfuse3 may call (init and stacktrace are not requests).
KERNEL_OPERATIONS = frozenset(
    name for name, member in vars(pyfuse3.Operations).items() if inspect.iscoroutinefunction(member)
)
Operation = Callable[..., Awaitable[Any]]
FS = TypeVar("FS", bound=type)


def _log_fault(fs: Any, operation: str, exc: Exception) -> None:
    log.error("%s: %s failed: %s: %s", getattr(fs, "fsname", "artifactfs"), operation, type(exc).__name__, exc)
    log.debug("%s: %s failed", getattr(fs, "fsname", "artifactfs"), operation, exc_info=exc)


def _contain(operation: str, handler: Operation) -> Operation:
    """`handler`, failing with EIO instead of raising anything but FUSEError.

    pyfuse3 lets any other exception out of its main loop, which ends the session and leaves
    every user of the mount with ENOTCONN. Cancellation (and any other BaseException) still
    passes: it is how the mount shuts down.
    """
    if operation == "forget":  # no reply to carry an error, and pyfuse3 wants no exception at all

        @functools.wraps(handler)
        async def forget(self: Any, *args: Any) -> None:
            try:
                await handler(self, *args)
            except Exception as exc:
                _log_fault(self, operation, exc)

        return forget

    @functools.wraps(handler)
    async def contained(self: Any, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            _log_fault(self, operation, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return contained


def _contained(cls: FS) -> FS:
    """Wrap every kernel operation of `cls` (its own and the ones it inherits) in `_contain`."""
    for operation in KERNEL_OPERATIONS:
        setattr(cls, operation, _contain(operation, getattr(cls, operation)))
    return cls


@_contained
class TreeFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, gate: Gate, *, fsname: str = "artifactfs") -> None:
        super().__init__()
        self.gate = gate
        self.fsname = fsname
        self.snapshot: Snapshot | None = None
        self.hydrator: Hydrator | None = None
        self.sizes: dict[str, int] = {}
        self._blob_cache: OrderedDict[str, bytes] = OrderedDict()
        # Inode numbers are never reused, not even when a new commit is shown: the kernel may
        # still hold entries of the old one.
        self.next_inode = FIRST_INODE
        self.uid = os.getuid()
        self.gid = os.getgid()

    # --- what is shown ---

    def show(self, git_dir: Path, head: str, hydrator: Hydrator) -> list[tuple[int, bytes]]:
        """Show commit `head` of `git_dir` (called when the repository becomes ready).

        Returns the (parent inode, name) entries of the commit shown before, which the kernel may
        still cache and the caller must invalidate. Their nodes stay resolvable, so a file opened
        before keeps reading the content it opened.
        """
        repo = pygit2.Repository(str(git_dir))
        commit = repo.get(head)
        if not isinstance(commit, pygit2.Commit):
            raise ValueError(f"{head} is not a commit in {git_dir}")
        snap = Snapshot(
            repo=repo,
            commit=commit,
            dotgit=f"gitdir: {git_dir}\n".encode(),
            mtime_ns=commit.commit_time * 1_000_000_000,
        )
        snap.nodes[pyfuse3.ROOT_INODE] = Node(pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE, b"", Kind.DIR, str(commit.tree_id))
        snap.nodes[DOTGIT_INODE] = Node(DOTGIT_INODE, pyfuse3.ROOT_INODE, b".git", Kind.DOTGIT, None)
        stale: list[tuple[int, bytes]] = []
        if self.snapshot is not None:
            for inode, node in self.snapshot.nodes.items():
                if inode not in snap.nodes:
                    snap.nodes[inode] = node
                    stale.append((node.parent, node.name))
        self.snapshot = snap
        self.hydrator = hydrator
        return stale

    def exists(self, oid: str) -> bool:
        """Whether the object store holds `oid` (ask the hydrator: it caches the answer)."""
        assert self.snapshot is not None
        return self.snapshot.repo.odb.exists(oid)

    def is_present(self, oid: str) -> bool:
        assert self.hydrator is not None
        return self.hydrator.is_present(oid)

    # --- helpers ---

    def _snap(self) -> Snapshot:
        if self.snapshot is None:  # gate open without a snapshot cannot happen; be loud if it does
            raise pyfuse3.FUSEError(errno.EIO)
        return self.snapshot

    def _node(self, inode: int) -> Node:
        try:
            return self._snap().nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _children(self, node: Node) -> dict[bytes, int]:
        """Name -> inode for a directory, built from its git tree on first use."""
        if node.children is not None:
            return node.children
        snap = self._snap()
        children: dict[bytes, int] = {}
        if node.kind is Kind.DIR:
            tree = snap.repo.get(node.oid)
            for entry in tree:
                kind = GIT_MODE_KINDS.get(entry.filemode)
                if kind is None:
                    continue
                name = entry.raw_name if hasattr(entry, "raw_name") else entry.name.encode()
                inode = self.next_inode
                self.next_inode += 1
                snap.nodes[inode] = Node(inode, node.inode, name, kind, str(entry.id))
                children[name] = inode
        if node.inode == pyfuse3.ROOT_INODE:
            children[b".git"] = DOTGIT_INODE
        node.children = children
        return children

    def _known_size(self, node: Node) -> int | None:
        if node.kind is Kind.DOTGIT:
            return len(self._snap().dotgit)
        if node.is_dir:
            return 4096
        assert node.oid is not None
        size = self.sizes.get(node.oid)
        if size is None and self.is_present(node.oid):
            size = self.sizes[node.oid] = self._snap().repo.get(node.oid).size
        return size

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        snap = self._snap()
        size = self._known_size(node)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.st_mode = KIND_MODES[node.kind]
        attr.st_nlink = 1  # "unknown" to find/fts, which then read directories instead of guessing
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_rdev = 0
        attr.st_size = size or 0
        attr.st_blksize = 4096
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = snap.mtime_ns
        attr.entry_timeout = CACHE_SECONDS
        # An unhydrated blob's size is unknown: a timeout of 0 makes the kernel ask (getattr)
        # before it relies on it, and that is when the blob is fetched.
        attr.attr_timeout = CACHE_SECONDS if size is not None else 0
        return attr

    async def _hydrate(self, node: Node) -> None:
        """Make a blob present. The first miss in a directory fetches that blob alone; once the
        directory has been listed, or a second of its files is needed (git status, a build, grep
        walking it), the rest of the directory comes along in the same batch."""
        if not node.is_blob or node.oid is None or self.is_present(node.oid):
            return
        assert self.hydrator is not None
        wanted = [node.oid]
        parent = self._snap().nodes.get(node.parent)
        # A reader of a blob that is already on its way is not a second miss: it just waits.
        if parent is not None and not self.hydrator.is_pending(node.oid):
            if (parent.listed or parent.misses > 0) and parent.children:
                for inode in parent.children.values():
                    sibling = self._snap().nodes[inode]
                    if sibling.is_blob and not self.is_present(sibling.oid) and len(wanted) < SIBLING_BATCH_LIMIT:  # type: ignore[arg-type]
                        wanted.append(sibling.oid)  # type: ignore[arg-type]
            parent.misses += 1
        try:
            await self.hydrator.ensure(dict.fromkeys(wanted))
        except BlobFetchFailed as exc:
            log.error("%s: %s", self.fsname, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _blob(self, oid: str) -> bytes:
        data = self._blob_cache.get(oid)
        if data is None:
            data = self._snap().repo.get(oid).data
            self._blob_cache[oid] = data
            if len(self._blob_cache) > BLOB_CACHE_ENTRIES:
                self._blob_cache.popitem(last=False)
        else:
            self._blob_cache.move_to_end(oid)
        return data

    # --- kernel operations: never gated ---

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sfs = pyfuse3.StatvfsData()
        sfs.f_bsize = sfs.f_frsize = 4096
        sfs.f_blocks = sfs.f_bfree = sfs.f_bavail = 0
        sfs.f_files = len(self.snapshot.nodes) if self.snapshot else 0
        sfs.f_ffree = sfs.f_favail = 0
        sfs.f_namemax = 255
        return sfs

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Nodes are cheap and inodes must stay stable while the commit is shown: keep them.
        return None

    async def release(self, fh: int) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None

    async def flush(self, fh: int) -> None:
        return None

    # --- kernel operations: gated ---

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE and self.snapshot is None:
            return self._placeholder_root_attr()
        if inode != pyfuse3.ROOT_INODE:
            await self.gate.wait(ctx.pid)
        node = self._node(inode)
        await self._hydrate(node)  # the kernel asks for attributes when it needs the real size
        return self._attr(node)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self.gate.wait(ctx.pid)
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent))
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        inode = self._children(parent).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._node(inode))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self.gate.wait(ctx.pid)
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self.gate.wait()
        node = self._node(fh)
        node.listed = True
        entries = sorted(self._children(node).items())
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attr(self._node(inode)), index + 1):
                break

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        await self.gate.wait(ctx.pid)
        node = self._node(inode)
        if node.kind is not Kind.LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self._hydrate(node)
        return self._blob(node.oid)  # type: ignore[arg-type]

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self.gate.wait(ctx.pid)
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        await self._hydrate(node)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await self.gate.wait()
        node = self._node(fh)
        if node.kind is Kind.DOTGIT:
            return self._snap().dotgit[off : off + size]
        await self._hydrate(node)
        return self._blob(node.oid)[off : off + size]  # type: ignore[arg-type]

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> None:
        await self.gate.wait(ctx.pid)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        await self.gate.wait(ctx.pid)
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        await self.gate.wait(ctx.pid)
        return []

    # --- writes: this layer is read-only ---

    async def _read_only(self, ctx: pyfuse3.RequestContext | None = None) -> None:
        await self.gate.wait(ctx.pid if ctx is not None else None)
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def mkdir(self, parent_inode, name, mode, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def unlink(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def rmdir(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def symlink(self, parent_inode, name, target, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def link(self, inode, new_parent_inode, new_name, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def create(self, parent_inode, name, mode, flags, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        await self._read_only()

    async def setxattr(self, inode, name, value, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    async def removexattr(self, inode, name, ctx):  # type: ignore[no-untyped-def]
        await self._read_only(ctx)

    # --- the placeholder ---

    def _placeholder_root_attr(self) -> pyfuse3.EntryAttributes:
        """Root attributes before the first commit is shown: a plain, empty-looking directory."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.ROOT_INODE
        attr.st_mode = KIND_MODES[Kind.DIR]
        attr.st_nlink = 1
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_size = 4096
        attr.st_blksize = 4096
        attr.attr_timeout = 0
        attr.entry_timeout = 0
        return attr
