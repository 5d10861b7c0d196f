"""The FUSE filesystem of one mounted repository: one commit's tree, read-only, hydrated lazily.

One method per kernel operation, in the manner of pyfuse3's examples. Trees come from the local
blobless clone through pygit2; a blob is fetched (in a batch, see hydrator.py) only when its
content or its real size is needed. Until then an entry reports size 0 with an attribute timeout
of 0, so the kernel asks again (getattr) before it relies on the size.

Every user-facing operation first passes the readiness gate (gate.py); root getattr, statfs,
forget, release and flush never wait, so `mount`, `df`, unmounting and shell prompts keep working
while a repository prepares. Neither do read and readdir: they work on a handle, which open and
opendir gave out on a commit already shown, and keep serving that commit while a later
preparation holds the gate closed.

No fault in one operation ends the session: every kernel operation is wrapped (faults.py) so
that an unexpected exception (a missing object, a pack gone underneath, a bug) fails that one
operation with EIO and one log line.

Nodes of a commit no longer shown are kept only while the kernel knows their inode (its lookup
count) or a handle is open on them, so memory does not grow with every refresh.
"""
from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from pathlib import Path

import pyfuse3
import pygit2

from ..model import BlobFetchFailed, ObjectMissing
from .faults import contained
from .gate import Gate
from .hydrator import Hydrator
from .nodes import (
    BLOB_KINDS,
    DOTGIT_INODE,
    FIRST_INODE,
    FIXED_INODES,
    GIT_MODE_KINDS,
    KIND_MODES,
    Entry,
    Handle,
    Kind,
    Node,
    Snapshot,
)

log = logging.getLogger(__name__)

CACHE_SECONDS = 300.0  # one commit's tree never changes; the gate invalidates on a new commit
SIBLING_BATCH_LIMIT = 2000
BLOB_CACHE_ENTRIES = 64


@contained
class TreeFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, gate: Gate, *, fsname: str = "artifactfs") -> None:
        super().__init__()
        self.gate = gate
        self.fsname = fsname
        self.snapshot: Snapshot | None = None
        # Every live node, of the commit shown and of earlier ones still in use. Inode numbers are
        # never reused, not even when a new commit is shown: the kernel may still hold old ones.
        self.nodes: dict[int, Node] = {}
        self.next_inode = FIRST_INODE
        self.handles: dict[int, Handle] = {}
        self.next_handle = 1
        self.sizes: dict[str, int] = {}
        self._blob_cache: OrderedDict[str, bytes] = OrderedDict()
        self.uid = os.getuid()
        self.gid = os.getgid()

    # --- what is shown ---

    @property
    def hydrator(self) -> Hydrator | None:
        return self.snapshot.hydrator if self.snapshot is not None else None

    def show(self, git_dir: Path, head: str, hydrator: Hydrator) -> list[tuple[int, bytes]]:
        """Show commit `head` of `git_dir` (called when the repository becomes ready).

        Returns the (parent inode, name) entries of the commit shown before that the kernel may
        still cache, which the caller must invalidate. Their nodes stay resolvable until the
        kernel forgets them and their last handle is closed, so a file opened before keeps reading
        the content it opened; nodes of that commit the kernel does not know go at once.
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
            hydrator=hydrator,
        )
        root = Node(pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE, b"", Kind.DIR, str(commit.tree_id), snap)
        dotgit = Node(DOTGIT_INODE, pyfuse3.ROOT_INODE, b".git", Kind.DOTGIT, None, snap)
        stale: list[tuple[int, bytes]] = []
        for fixed in (root, dotgit):  # the same inodes, shown anew: the kernel's count carries over
            previous = self.nodes.get(fixed.inode)
            fixed.lookups = previous.lookups if previous is not None else 0
        superseded = [node for node in self.nodes.values() if node.inode not in FIXED_INODES]
        self.nodes[root.inode], self.nodes[dotgit.inode] = root, dotgit
        self.snapshot = snap
        for node in superseded:
            if node.lookups:
                stale.append((node.parent, node.name))
            self._drop_if_unused(node)
        return stale

    def exists(self, oid: str) -> bool:
        """Whether the object store holds `oid` (ask the hydrator: it caches the answer)."""
        assert self.snapshot is not None
        return self.snapshot.repo.odb.exists(oid)

    # --- nodes and handles ---

    def _snap(self) -> Snapshot:
        if self.snapshot is None:  # gate open without a snapshot cannot happen; be loud if it does
            raise pyfuse3.FUSEError(errno.EIO)
        return self.snapshot

    def _node(self, inode: int) -> Node:
        self._snap()
        try:
            return self.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _entries(self, node: Node) -> dict[bytes, Entry]:
        """A directory's entries by name, in name order, read from its git tree on first use."""
        if node.entries is not None:
            return node.entries
        entries: dict[bytes, Entry] = {}
        if node.kind is Kind.DIR:
            tree = node.snap.repo.get(node.oid)
            if not isinstance(tree, pygit2.Tree):
                raise ObjectMissing(f"tree {node.oid} is missing from the local git directory")
            for entry in tree:
                kind = GIT_MODE_KINDS.get(entry.filemode)
                if kind is not None:
                    name = entry.raw_name if hasattr(entry, "raw_name") else entry.name.encode()
                    entries[name] = (kind, str(entry.id))
        if node.inode == pyfuse3.ROOT_INODE:
            entries[b".git"] = (Kind.DOTGIT, None)
        node.entries = dict(sorted(entries.items()))
        return node.entries

    def _child(self, parent: Node, name: bytes) -> Node | None:
        """The node of entry `name` of directory `parent`, made on first use; None if no such entry."""
        inode = parent.children.get(name)
        if inode is not None and inode in self.nodes:
            return self.nodes[inode]
        entry = self._entries(parent).get(name)
        if entry is None:
            return None
        kind, oid = entry
        if kind is Kind.DOTGIT:
            return self.nodes[DOTGIT_INODE]
        inode = self.next_inode
        self.next_inode += 1
        node = self.nodes[inode] = Node(inode, parent.inode, name, kind, oid, parent.snap)
        parent.children[name] = inode
        return node

    def _drop_if_unused(self, node: Node) -> None:
        """Forget a node of a commit no longer shown once neither the kernel nor a handle uses it.
        Nodes of the commit shown stay: their inode numbers must not change while it is (git's
        index records them, and a changed one makes git status read the file again)."""
        if node.snap is self.snapshot or node.lookups > 0 or node.handles > 0 or node.inode in FIXED_INODES:
            return
        if self.nodes.get(node.inode) is node:
            del self.nodes[node.inode]
        parent = self.nodes.get(node.parent)
        if parent is not None and parent.children.get(node.name) == node.inode:
            del parent.children[node.name]

    def _drop_unless_counted(self, nodes: list[Node]) -> None:
        """Nodes made for an entry the kernel did not take: of a commit no longer shown, they go."""
        for node in nodes:
            self._drop_if_unused(node)

    def _open_handle(self, node: Node) -> int:
        fh = self.next_handle
        self.next_handle += 1
        self.handles[fh] = Handle(node)
        node.handles += 1
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _close_handle(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            handle.node.handles -= 1
            self._drop_if_unused(handle.node)

    # --- contents ---

    def _known_size(self, node: Node) -> int | None:
        if node.kind is Kind.DOTGIT:
            return len(node.snap.dotgit)
        if node.is_dir:
            return 4096
        assert node.oid is not None
        size = self.sizes.get(node.oid)
        if size is None and node.snap.hydrator.is_present(node.oid):
            size = self.sizes[node.oid] = self._object(node.snap, node.oid).size
        return size

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
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
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.snap.mtime_ns
        attr.entry_timeout = CACHE_SECONDS
        # An unhydrated blob's size is unknown: a timeout of 0 makes the kernel ask (getattr)
        # before it relies on it, and that is when the blob is fetched.
        attr.attr_timeout = CACHE_SECONDS if size is not None else 0
        return attr

    async def _hydrate(self, node: Node, caller_tid: int | None) -> None:
        """Make a blob present, waiting on behalf of `caller_tid` (a signal to it ends the wait).

        The first miss in a directory fetches that blob alone; once the directory has been
        listed, or a second of its files is needed (git status, a build, grep walking it), the
        rest of the directory comes along in the same batch."""
        hydrator = node.snap.hydrator
        if not node.is_blob or node.oid is None or hydrator.is_present(node.oid):
            return
        wanted = [node.oid]
        parent = self.nodes.get(node.parent)
        # A reader of a blob that is already on its way is not a second miss: it just waits.
        if parent is not None and parent.snap is node.snap and not hydrator.is_pending(node.oid):
            if (parent.listed or parent.misses > 0) and parent.entries:
                for kind, oid in parent.entries.values():
                    if len(wanted) >= SIBLING_BATCH_LIMIT:
                        break
                    if kind in BLOB_KINDS and oid is not None and oid != node.oid and not hydrator.is_present(oid):
                        wanted.append(oid)
            parent.misses += 1
        try:
            await hydrator.ensure(dict.fromkeys(wanted), caller_tid)
        except BlobFetchFailed as exc:
            log.error("%s: %s", self.fsname, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @staticmethod
    def _object(snap: Snapshot, oid: str) -> pygit2.Object:
        obj = snap.repo.get(oid)
        if obj is None:
            raise ObjectMissing(f"object {oid} is missing from the local git directory")
        return obj

    def _blob(self, node: Node) -> bytes:
        assert node.oid is not None
        data = self._blob_cache.get(node.oid)
        if data is None:
            data = self._object(node.snap, node.oid).data
            self._blob_cache[node.oid] = data
            if len(self._blob_cache) > BLOB_CACHE_ENTRIES:
                self._blob_cache.popitem(last=False)
        else:
            self._blob_cache.move_to_end(node.oid)
        return data

    # --- kernel operations: never gated ---

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sfs = pyfuse3.StatvfsData()
        sfs.f_bsize = sfs.f_frsize = 4096
        sfs.f_blocks = sfs.f_bfree = sfs.f_bavail = 0
        sfs.f_files = len(self.nodes)  # the inodes this mount holds now
        sfs.f_ffree = sfs.f_favail = 0
        sfs.f_namemax = 255
        return sfs

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is not None:
                node.lookups = max(0, node.lookups - count)
                self._drop_if_unused(node)

    async def release(self, fh: int) -> None:
        self._close_handle(fh)

    async def releasedir(self, fh: int) -> None:
        self._close_handle(fh)

    async def flush(self, fh: int) -> None:
        return None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        node = handle.node
        if node.kind is Kind.DOTGIT:
            return node.snap.dotgit[off : off + size]
        # pyfuse3 does not say who reads: the opener's thread may not be the reader (another
        # thread, a child after fork), and its signals must not fail someone else's read. open
        # hydrated the blob already; a read that must fetch waits until the fetch deadline.
        await self._hydrate(node, None)
        return self._blob(node)[off : off + size]

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._handle(fh).node
        node.listed = True
        names = list(self._entries(node))
        made: list[Node] = []
        accepted = 0
        try:
            for index in range(start_id, len(names)):
                child = self._child(node, names[index])
                assert child is not None
                made.append(child)
                if not pyfuse3.readdir_reply(token, names[index], self._attr(child), index + 1):
                    break
                accepted += 1
        except BaseException:
            self._drop_unless_counted(made)  # a failed readdir hands the kernel nothing
            raise
        for child in made[:accepted]:
            child.lookups += 1
        self._drop_unless_counted(made[accepted:])

    # --- kernel operations: gated ---

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE and self.snapshot is None:
            return self._placeholder_root_attr()
        if inode != pyfuse3.ROOT_INODE:
            await self.gate.wait(ctx.pid)
        node = self._node(inode)
        await self._hydrate(node, ctx.pid)  # the kernel asks for attributes when it needs the real size
        return self._attr(node)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self.gate.wait(ctx.pid)
        parent = self._node(parent_inode)
        if name == b".":
            node: Node | None = parent
        elif name == b"..":
            node = self._node(parent.parent)
        elif not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        else:
            node = self._child(parent, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            attr = self._attr(node)
        except BaseException:
            self._drop_unless_counted([node])
            raise
        node.lookups += 1
        return attr

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self.gate.wait(ctx.pid)
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._open_handle(node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        await self.gate.wait(ctx.pid)
        node = self._node(inode)
        if node.kind is not Kind.LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self._hydrate(node, ctx.pid)
        return self._blob(node)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self.gate.wait(ctx.pid)
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        await self._hydrate(node, ctx.pid)
        return pyfuse3.FileInfo(fh=self._open_handle(node), keep_cache=True)

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
