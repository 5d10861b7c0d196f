"""The FUSE filesystem of one mounted repository: one commit's tree under a writable overlay.

One method per kernel operation, in the manner of pyfuse3's examples. Trees come from the local
blobless clone through pygit2 (layers.py merges them with the overlay); a blob is fetched (in a
batch, see hydrator.py) only when its content or its real size is needed. Until then an entry
reports size 0 with an attribute timeout of 0, so the kernel asks again (getattr) before it
relies on the size.

Every change lands in the overlay (overlay.py), recorded before the operation returns: a write to
a tracked file copies it up first (hydrating it, unless it is truncated to nothing), a removal
leaves a whiteout, a rename of a tracked file or directory records it by reference and copies
nothing. The overlay numbers every change so that git's fsmonitor hook learns which paths changed
(fsmonitor.py), and git never reads or hashes a file nobody touched.

Every user-facing operation first passes the readiness gate (gate.py); root getattr, statfs,
forget, release and flush never wait, so `mount`, `df`, unmounting and shell prompts keep working
while a repository prepares. Neither do read, write, readdir and fsync: they work on a handle,
which open and opendir gave out on a commit already shown, and keep serving it while a later
preparation holds the gate closed.

No fault in one operation ends the session: every kernel operation is wrapped (faults.py) so
that an unexpected exception (a missing object, a pack gone underneath, a bug) fails that one
operation with EIO and one log line; a full disk fails it with ENOSPC.

Nodes of a commit no longer shown, and nodes removed, are kept only while the kernel knows their
inode (its lookup count) or a handle is open on them, so memory does not grow with every refresh
and an open file keeps working after it is renamed or unlinked.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pyfuse3
import pygit2

from ..model import BlobFetchFailed, ObjectMissing
from .contents import Contents
from .faults import contained
from .fsmonitor import Answers
from .gate import Gate, GateState, process_of
from .hydrator import Hydrator
from .layers import Layers, Shown, overlay_kind
from .nodes import (
    BLOB_KINDS,
    DOTGIT_INODE,
    FIRST_INODE,
    FIXED_INODES,
    KIND_MODES,
    Handle,
    Kind,
    Node,
    Snapshot,
)
from .overlay import EntryKind, Overlay, OverlayEntry, parent_of
from .reconcile import head_commit, moved_by_preparation, plan_move
from .walks import Scope, WalkWatch, depth

log = logging.getLogger(__name__)

CACHE_SECONDS = 300.0  # every change passes through the kernel; the gate invalidates on a new commit
SIBLING_BATCH_LIMIT = 2000
LISTING_FRESH_SECONDS = 2.0
# Names looked up and found absent, remembered so that the kernel may cache the absence: git
# looks for a .gitattributes in every directory it reads a .gitignore of, at every status.
# Past this many, absences are answered without caching (nothing to invalidate later).
NEGATIVE_ENTRIES_LIMIT = 100_000
NAME_MAX = 255
# Files git status opens and reads every time it runs: their content goes into the kernel's page
# cache as they open (see TreeFS._store_pages), up to this size.
STATUS_FILES = frozenset({b".gitignore", b".gitattributes"})
STORE_LIMIT = 64 * 1024
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# What the overlay records of its base (see TreeFS._base_for).
BASE_PREPARED, BASE_COMMIT, BASE_MTIME = "prepared", "base", "base_mtime_ns"
TYPE_BITS = {EntryKind.FILE: stat.S_IFREG, EntryKind.DIR: stat.S_IFDIR, EntryKind.LINK: stat.S_IFLNK}


def fuse_error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@contained
class TreeFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    overlay: Overlay  # given at construction, or by use_overlay before the session serves anything
    fsmonitor: Answers

    def __init__(self, gate: Gate, overlay: Overlay | None, *, fsname: str = "artifactfs",
                 owner: tuple[int, int] | None = None) -> None:  # fmt: skip
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
        self.contents: Contents | None = None  # of the git directory shown
        self.held: Counter[int] = Counter()  # content files open in handles, by id
        self.doomed: set[int] = set()  # content files no entry refers to, deleted at their last close
        # (parent inode, name) the kernel may cache as absent. Any name the kernel itself creates
        # replaces its cached absence; a name that appears otherwise (a new commit shown) must
        # have it invalidated, so every one is remembered until then.
        self.absent: set[tuple[int, bytes]] = set()
        self.lookups_served = 0  # LOOKUP requests answered: names the kernel had not cached
        self.walks = WalkWatch()  # tells walks of the tree from reads of a few files
        self.on_miss: Callable[[], None] | None = None  # told of every read that has to fetch
        # Whose every file is: the mount owner's, or the repository's owner (add-repo --owner),
        # whose git refuses a work tree another user owns.
        self.uid, self.gid = owner if owner is not None else (os.getuid(), os.getgid())
        if overlay is not None:
            self.use_overlay(overlay)

    def use_overlay(self, overlay: Overlay) -> None:
        """The overlay every change lands in. A repository with an owner opens it only once the
        mount process has become the owner (root must never open what the owner can change)."""
        self.overlay = overlay
        self.fsmonitor = Answers(overlay)

    # --- what is shown ---

    @property
    def hydrator(self) -> Hydrator | None:
        return self.snapshot.hydrator if self.snapshot is not None else None

    def show(self, git_dir: Path, head: str, hydrator: Hydrator) -> list[tuple[int, bytes]]:
        """Show commit `head` of `git_dir` under the overlay (called when the repository becomes
        ready).

        Returns the (parent inode, name) entries of the commit shown before that the kernel may
        still cache, which the caller must invalidate. Their nodes stay resolvable until the
        kernel forgets them and their last handle is closed, so a file opened before keeps reading
        the content it opened; nodes of that commit the kernel does not know go at once.
        """
        repo = pygit2.Repository(str(git_dir))
        commit = repo.get(head)
        if not isinstance(commit, pygit2.Commit):
            raise ValueError(f"{head} is not a commit in {git_dir}")
        commit, mtime_ns = self._base_for(repo, commit)
        snap = Snapshot(
            repo=repo,
            commit=commit,
            dotgit=f"gitdir: {git_dir}\n".encode(),
            mtime_ns=mtime_ns,
            hydrator=hydrator,
            contents=self._contents_of(git_dir, hydrator),
            layers=Layers(repo, str(commit.tree_id), self.overlay),
        )
        root = Node(pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE, b"", Kind.DIR, str(commit.tree_id), snap,
                    over=self.overlay.entry(b""))  # fmt: skip
        dotgit = Node(DOTGIT_INODE, pyfuse3.ROOT_INODE, b".git", Kind.DOTGIT, None, snap)
        stale: list[tuple[int, bytes]] = []
        for fixed in (root, dotgit):  # the same inodes, shown anew: the kernel's count carries over
            previous = self.nodes.get(fixed.inode)
            fixed.lookups = previous.lookups if previous is not None else 0
        stale.extend(self.absent)  # a name absent from the old commit may be in the new one
        self.absent.clear()
        superseded = [node for node in self.nodes.values() if node.inode not in FIXED_INODES]
        self.nodes[root.inode], self.nodes[dotgit.inode] = root, dotgit
        self.snapshot = snap
        for node in superseded:
            if node.lookups:
                stale.append((node.parent, node.name))
            self._drop_if_unused(node)
        return stale

    def _base_for(self, repo: pygit2.Repository, prepared: pygit2.Commit) -> tuple[pygit2.Commit, int]:
        """The commit the overlay's entries are against, and the time its files show.

        A commit newly prepared (a first mount, a refresh) becomes the base, as it is: files the
        overlay does not hold show its content. The same preparation shown again (this process
        restarted) shows the base the overlay was left against, which follows git's HEAD, so that
        the tree looks as it did before the restart."""
        state = self.overlay.state
        if state(BASE_PREPARED) == str(prepared.id):
            base = repo.get(state(BASE_COMMIT) or "")
            mtime = state(BASE_MTIME)
            if isinstance(base, pygit2.Commit) and mtime is not None and mtime.isdigit():
                return base, int(mtime)
            log.warning("%s: the overlay's base is not in the git directory; showing %s", self.fsname, prepared.id)
        mtime_ns = prepared.commit_time * 1_000_000_000
        self.overlay.set_state({BASE_PREPARED: str(prepared.id), BASE_COMMIT: str(prepared.id), BASE_MTIME: str(mtime_ns)})
        return prepared, mtime_ns

    def follow_head(self) -> None:
        """If git moved HEAD inside the mount, move the base along (reconcile.py): the overlay
        sheds what the new commit holds, and what the mount shows does not change."""
        snap = self.snapshot
        if snap is None or self.gate.state is not GateState.OPEN:
            return  # a preparation may be moving HEAD: mountd says what to show once it is done
        head = head_commit(snap.repo)
        if head is None or head.id == snap.commit.id or moved_by_preparation(snap.repo):
            return
        if not isinstance(snap.repo.get(head.tree_id), pygit2.Tree):
            log.warning("%s: HEAD %s has no tree here yet; the base stays at %s", self.fsname, head.id, snap.commit.id)
            return
        plan = plan_move(snap.repo, self.overlay, str(snap.commit.tree_id), str(head.tree_id),
                         base_mtime_ns=snap.mtime_ns, held=lambda data: self.held.get(data, 0) > 0)  # fmt: skip
        freed = self.overlay.move_base(list(plan.put.values()), sorted(plan.delete),
                                       {BASE_COMMIT: str(head.id), BASE_MTIME: str(snap.mtime_ns)})  # fmt: skip
        moved = replace(snap, commit=head, layers=Layers(snap.repo, str(head.tree_id), self.overlay))
        self.snapshot = moved
        self._carry_nodes(snap, moved, plan.visited)
        self._free(freed)
        log.info("%s: base follows HEAD to %s (%d entries rewritten, %d dropped, %d content files freed)",
                 self.fsname, head.id, len(plan.put), len(plan.delete), len(freed))  # fmt: skip

    def follow_head_safely(self) -> None:
        """follow_head, whose failure leaves the base where it was (its transaction is undone)
        and costs nothing else: git's answer does not depend on it."""
        try:
            self.follow_head()
        except Exception as exc:
            log.error("%s: could not move the base to HEAD: %s: %s", self.fsname, type(exc).__name__, exc)

    def _carry_nodes(self, old: Snapshot, new: Snapshot, visited: set[bytes]) -> None:
        """Move the nodes of the old base to the new one, keeping their inode numbers (git's index
        records them). Where the view's sources changed, read what they show again."""
        for node in list(self.nodes.values()):
            if node.snap is not old:
                continue
            node.snap = new
            if node.unlinked or node.kind is Kind.DOTGIT:
                continue
            path = self._path(node)
            if path not in visited and parent_of(path) not in visited:
                continue
            shown = new.layers.resolve(path)
            if shown is None or shown.kind is not node.kind:  # a submodule the overlay cannot keep
                parent = self.nodes[node.parent]
                self._detach(parent, node.name, node)
                pyfuse3.invalidate_entry_async(parent.inode, node.name, ignore_enoent=True)
                continue
            node.oid, node.over = shown.oid, shown.entry
            if node.is_dir and path in visited:
                node.entries = None

    def exists(self, oid: str) -> bool:
        """Whether the object store holds `oid` (ask the hydrator: it caches the answer)."""
        assert self.snapshot is not None
        return self.snapshot.repo.odb.exists(oid)

    # --- nodes and handles ---

    def _snap(self) -> Snapshot:
        if self.snapshot is None:  # gate open without a snapshot cannot happen; be loud if it does
            raise fuse_error(errno.EIO)
        return self.snapshot

    def _node(self, inode: int) -> Node:
        self._snap()
        try:
            return self.nodes[inode]
        except KeyError:
            raise fuse_error(errno.ENOENT) from None

    def _path(self, node: Node) -> bytes:
        """The node's path from the root, as it stands now (renames of a directory above move it)."""
        names = []
        while node.inode != pyfuse3.ROOT_INODE:
            names.append(node.name)
            node = self.nodes[node.parent]
        return b"/".join(reversed(names))

    def _listing(self, node: Node) -> dict[bytes, Shown]:
        """A directory's entries by name: its base tree's under the overlay's, read on first use
        and kept up to date by every change made through the mount."""
        if node.entries is not None:
            return node.entries
        entries: dict[bytes, Shown] = {}
        if node.kind is Kind.DIR:
            entries = node.snap.layers.listing(Shown(self._path(node), Kind.DIR, node.oid, node.over))
        if node.inode == pyfuse3.ROOT_INODE:
            entries[b".git"] = Shown(b".git", Kind.DOTGIT, None, None)
        node.entries = entries
        return entries

    def _child(self, parent: Node, name: bytes) -> Node | None:
        """The node of entry `name` of directory `parent`, made on first use; None if no such entry."""
        inode = parent.children.get(name)
        if inode is not None and inode in self.nodes:
            return self.nodes[inode]
        shown = self._listing(parent).get(name)
        if shown is None:
            return None
        if shown.kind is Kind.DOTGIT:
            return self.nodes[DOTGIT_INODE]
        return self._new_node(parent, name, shown.kind, shown.oid, shown.entry)

    def _new_node(self, parent: Node, name: bytes, kind: Kind, oid: str | None, over: OverlayEntry | None) -> Node:
        inode = self.next_inode
        self.next_inode += 1
        node = self.nodes[inode] = Node(inode, parent.inode, name, kind, oid, parent.snap, over=over)
        parent.children[name] = inode
        return node

    def _drop_if_unused(self, node: Node) -> None:
        """Forget a node of a commit no longer shown, or removed, once neither the kernel nor a
        handle uses it. Other nodes of the commit shown stay: their inode numbers must not change
        while it is (git's index records them, and a changed one makes git status read the file
        again)."""
        current = node.snap is self.snapshot and not node.unlinked
        if current or node.lookups > 0 or node.handles > 0 or node.inode in FIXED_INODES:
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

    def _open_handle(self, node: Node, *, writable: bool = False, append: bool = False) -> int:
        fh = self.next_handle
        self.next_handle += 1
        handle = self.handles[fh] = Handle(node, writable=writable, append=append)
        node.handles += 1
        if node.data is not None:
            self._fd(handle)  # holds the content file: it outlives an unlink of its path
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise fuse_error(errno.EBADF) from None

    def _close_handle(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        try:
            self._save_mtime(node)
        finally:
            self._release_fd(handle)
            node.handles -= 1
            self._drop_if_unused(node)

    def _fd(self, handle: Handle) -> int:
        """A descriptor on the node's content file (reopened if the file was copied up since)."""
        data = handle.node.data
        if data is None:
            raise ObjectMissing(f"{self.fsname}: no content file for inode {handle.node.inode}")
        if handle.fd is None or handle.data != data:
            self._release_fd(handle)
            handle.fd = os.open(self.overlay.data_path(data), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            handle.data = data
            self.held[data] += 1
        return handle.fd

    def _release_fd(self, handle: Handle) -> None:
        if handle.fd is None or handle.data is None:
            return
        os.close(handle.fd)
        data, handle.fd, handle.data = handle.data, None, None
        self.held[data] -= 1
        if self.held[data] <= 0:
            del self.held[data]
            if data in self.doomed:
                self.doomed.discard(data)
                self.overlay.free(data)

    def _free(self, freed: list[int]) -> None:
        """Content files no entry refers to: deleted now, or at the last close of a handle on them."""
        for data in freed:
            if self.held.get(data):
                self.doomed.add(data)
            else:
                self.overlay.free(data)

    # --- contents ---

    def _data_size(self, data: int) -> int:
        return os.stat(self.overlay.data_path(data)).st_size

    def _known_size(self, node: Node, *, probe: bool = True) -> int | None:
        if node.kind is Kind.DOTGIT:
            return len(node.snap.dotgit)
        if node.answer is not None:
            return len(node.answer)
        if node.is_dir:
            return 4096
        if node.data is not None:
            return self._data_size(node.data)
        if node.over is not None and node.over.target is not None:
            return len(node.over.target)
        if node.oid is None:
            return 0
        size = self.sizes.get(node.oid)
        hydrator = node.snap.hydrator
        if size is None and (hydrator.is_present(node.oid) if probe else hydrator.known_present(node.oid)):
            size = self.sizes[node.oid] = self._header_size(node.snap, node.oid)
        return size

    @staticmethod
    def _header_size(snap: Snapshot, oid: str) -> int:
        """A present object's size from its header: a stat must not inflate a large blob."""
        try:
            _, size = snap.repo.odb.read_header(oid)
        except KeyError:
            raise ObjectMissing.of(oid) from None
        return int(size)

    def _attr(self, node: Node, *, probe: bool = True) -> pyfuse3.EntryAttributes:
        """The node's attributes; unless `probe`, a blob's size only if it is known to be here
        already (an unknown size costs nothing: the kernel asks getattr before it relies on it)."""
        size = self._known_size(node, probe=probe)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        over = node.over
        if over is not None and over.kind in TYPE_BITS and node.kind is not Kind.LINK:
            attr.st_mode = TYPE_BITS[over.kind] | over.mode
        else:
            attr.st_mode = KIND_MODES[node.kind]
        attr.st_nlink = 1  # "unknown" to find/fts, which then read directories instead of guessing
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_rdev = 0
        attr.st_size = size or 0
        attr.st_blksize = 4096
        attr.st_blocks = (attr.st_size + 511) // 512
        mtime = node.mtime_ns or (over.mtime_ns if over is not None else node.snap.mtime_ns)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        attr.entry_timeout = CACHE_SECONDS
        # An unhydrated blob's size is unknown: a timeout of 0 makes the kernel ask (getattr)
        # before it relies on it, and that is when the blob is fetched.
        attr.attr_timeout = CACHE_SECONDS if size is not None else 0
        if node.kind is Kind.ANSWER:  # asked again, a question gets a new answer, never a cached one
            attr.entry_timeout = attr.attr_timeout = 0
        return attr

    async def _hydrate(self, node: Node, caller_tid: int | None, *, alone: bool = False) -> None:
        """Make a blob present, waiting on behalf of `caller_tid` (a signal to it ends the wait).

        The first miss in a directory fetches that blob alone; once the directory has just been
        listed, or a second of its files is needed (git status, a build, grep walking it), the
        rest of the directory comes along in the same batch, unless the blob is wanted `alone`
        (a file being edited is one file, not a walk)."""
        hydrator = node.snap.hydrator
        if not node.is_blob or node.oid is None or node.data is not None or hydrator.is_present(node.oid):
            return
        if self.on_miss is not None:
            self.on_miss()
        wanted = [node.oid]
        owner = process_of(caller_tid)
        parent = self.nodes.get(node.parent)
        # A reader of a blob that is already on its way is not a second miss: it just waits.
        if parent is not None and parent.snap is node.snap and not hydrator.is_pending(node.oid) and not alone:
            if (self._freshly_listed(parent) or parent.misses > 0) and parent.entries:
                for shown in parent.entries.values():
                    if len(wanted) >= SIBLING_BATCH_LIMIT:
                        break
                    oid = shown.oid
                    if shown.kind in BLOB_KINDS and oid is not None and oid != node.oid and not hydrator.is_present(oid):
                        wanted.append(oid)
                await self._reach_further(parent, owner)
            parent.misses += 1
        try:
            await hydrator.ensure(dict.fromkeys(wanted), caller_tid, owner=owner)
        except BlobFetchFailed as exc:
            log.error("%s: %s", self.fsname, exc)
            raise fuse_error(errno.EIO) from None

    async def _store_pages(self, node: Node) -> None:
        """Put the content of a small file that git status reads into the kernel's page cache.

        git status opens and reads every .gitignore it knows of at every run. A READ that reaches
        the mount makes the kernel take the file's atime as stale, so git's lstat of it at the
        next status costs a GETATTR round trip too. Read from the page cache, it costs neither.
        Only while no handle is open on the file: a READ in flight holds the page locks a store
        needs, and the store, sent from the loop that must answer that READ, would wait for ever."""
        oid = node.oid
        if node.name not in STATUS_FILES or node.kind is not Kind.FILE or node.data is not None or oid is None:
            return
        if node.stored == oid or node.handles > 0:
            return
        size = self._known_size(node)
        if not size or size > STORE_LIMIT:
            return
        content = await node.snap.contents.whole(oid)
        if node.handles > 0 or node.oid != oid or node.data is not None:
            return  # opened, or changed, while the content was read
        try:
            pyfuse3.notify_store(node.inode, 0, content)
        except OSError as exc:  # a kernel without stores: git reads through the mount instead
            log.debug("%s: no page-cache store for inode %d: %s", self.fsname, node.inode, exc)
            return
        node.stored = oid

    async def _reach_further(self, directory: Node, owner: int | None) -> None:
        """A batch of `directory` is about to be fetched: if the misses are a walk, queue with it
        everything missing under the subtree being walked, or at the commit (see walks.py)."""
        path = self._path(directory)
        reach = self.walks.reach(path, time.monotonic())
        if reach.scope is Scope.DIRECTORY:
            return
        top = directory
        for _ in range(depth(path) - depth(reach.path)):
            top = self.nodes[top.parent]
        if top.oid is None or top.snap is not directory.snap:
            return  # a directory the overlay made, or of an older commit: nothing of the base to fetch
        hydrator = directory.snap.hydrator
        missing = await hydrator.missing_under(top.oid)
        queued = hydrator.prefetch(missing, owner)
        log.info("%s: a walk: %d missing blobs under %s queued (%s)", self.fsname, queued,
                 reach.path.decode(errors="replace") or "the top", reach.scope.value)  # fmt: skip

    @staticmethod
    def _freshly_listed(directory: Node) -> bool:
        """A walk (ls -l, find, du) stats the files of a directory right after listing it; a
        listing long past (git status walks every directory for untracked files) says nothing
        about the next file someone opens there."""
        listed = directory.listed_at
        return listed is not None and time.monotonic() - listed < LISTING_FRESH_SECONDS

    @staticmethod
    def _object(snap: Snapshot, oid: str) -> pygit2.Object:
        obj = snap.repo.get(oid)
        if obj is None:
            raise ObjectMissing.of(oid)
        return obj

    def _contents_of(self, git_dir: Path, hydrator: Hydrator) -> Contents:
        """The contents of `git_dir`'s blobs: one for as long as that git directory is shown
        (large blobs are spooled beside the overlay, which is the mount owner's)."""
        if self.contents is None or self.contents.git_dir != git_dir:
            if self.contents is not None:
                self.contents.close()
            self.contents = Contents(git_dir, self.overlay.root / "spool", hydrator.env)
        return self.contents

    def _present_size(self, node: Node) -> tuple[str, int]:
        """The blob of a file that was hydrated, and its size; ObjectMissing if it is not here."""
        assert node.oid is not None
        size = self._known_size(node)
        if size is None:
            raise ObjectMissing.of(node.oid)
        return node.oid, size

    async def _read_blob(self, node: Node, off: int, length: int) -> bytes:
        oid, size = self._present_size(node)
        return await node.snap.contents.read(oid, size, off, length, lambda: self._blobs_after(node))

    def _blobs_after(self, node: Node) -> Iterator[str]:
        """The present blobs of the files after `node` in its directory: what a walk reads next."""
        parent = self.nodes.get(node.parent)
        if parent is None or parent.entries is None or parent.snap is not node.snap:
            return
        hydrator = node.snap.hydrator
        after = False
        for name, shown in parent.entries.items():
            if after and shown.kind in BLOB_KINDS and shown.oid is not None and hydrator.known_present(shown.oid):
                yield shown.oid
            after = after or name == node.name

    # --- changes: every one recorded in the overlay before the operation returns ---

    def _entry_of(self, node: Node, path: bytes) -> OverlayEntry:
        """The overlay record of what `node` shows now, at `path`: its own, or one naming its base
        object by reference (nothing is read or copied)."""
        mtime = node.mtime_ns
        if node.over is not None:
            entry = replace(node.over, path=path)
            return replace(entry, mtime_ns=mtime) if mtime else entry
        mtime = mtime or node.snap.mtime_ns
        if node.kind is Kind.DIR:
            return OverlayEntry(path, EntryKind.DIR, 0o755, mtime)  # its base: the parent's, by name
        if node.kind is Kind.LINK:
            return OverlayEntry(path, EntryKind.LINK, 0o777, mtime, base_oid=node.oid)
        if node.kind in (Kind.FILE, Kind.EXEC):
            return OverlayEntry(path, EntryKind.FILE, KIND_MODES[node.kind] & 0o777, mtime, base_oid=node.oid)
        raise fuse_error(errno.EPERM)  # .git and submodules are not ours to change

    def _record(self, node: Node, entry: OverlayEntry) -> None:
        """Save `entry` as the node's record, and show it."""
        self.overlay.put(entry)
        self._shows(node, entry)

    def _shows(self, node: Node, entry: OverlayEntry) -> None:
        node.over = entry
        node.mtime_ns = None
        if entry.kind is EntryKind.FILE:
            node.kind = overlay_kind(entry)  # the executable bit
            node.oid = entry.base_oid
        parent = self.nodes.get(node.parent)
        if parent is not None and parent.entries is not None and not node.unlinked:
            parent.entries[node.name] = Shown(entry.path, node.kind, node.oid, entry)

    def _save_mtime(self, node: Node) -> None:
        """Save the time of the last write (kept in memory while writes go on)."""
        if node.mtime_ns is not None and not node.unlinked and node.over is not None:
            self._record(node, self._entry_of(node, self._path(node)))

    async def _copy_up(self, node: Node, *, keep: bool, caller_tid: int | None) -> None:
        """Give a file a content file of its own, filled with its content if `keep` (hydrating it)."""
        if node.data is not None:
            return
        if node.is_dir:
            raise fuse_error(errno.EISDIR)
        if node.kind not in (Kind.FILE, Kind.EXEC):
            raise fuse_error(errno.EPERM)
        if keep and node.oid is not None:
            await self._hydrate(node, caller_tid, alone=True)
        data = self.overlay.new_data()
        try:
            path = self.overlay.data_path(data)
            if keep and node.oid is not None:
                await node.snap.contents.copy_to(*self._present_size(node), path)
            else:
                path.write_bytes(b"")
            self._record(node, replace(self._entry_of(node, self._path(node)), data=data, base_oid=None))
        except BaseException:
            self.overlay.free(data)
            raise

    def _in_base(self, parent: Node, name: bytes) -> bool:
        """Whether the base tree behind directory `parent` has `name` (a removal must hide it)."""
        return parent.snap.layers.base_child(parent.oid if parent.kind is Kind.DIR else None, name) is not None

    @staticmethod
    def _unname(parent: Node, name: bytes, node: Node) -> None:
        """Take `name` out of directory `parent` (the node itself is the caller's to keep or drop)."""
        if parent.children.get(name) == node.inode:
            del parent.children[name]
        if parent.entries is not None:
            parent.entries.pop(name, None)

    def _detach(self, parent: Node, name: bytes, node: Node) -> None:
        """`name` no longer shows `node`: it lives on only for the kernel and open handles."""
        self._unname(parent, name, node)
        node.unlinked = True
        self._drop_if_unused(node)

    def _attach(self, parent: Node, name: bytes, node: Node, entry: OverlayEntry) -> None:
        parent.children[name] = node.inode
        if parent.entries is not None:
            parent.entries[name] = Shown(entry.path, node.kind, node.oid, entry)

    def _directory(self, inode: int) -> Node:
        node = self._node(inode)
        if not node.is_dir:
            raise fuse_error(errno.ENOTDIR)
        return node

    def _new_name(self, parent: Node, name: bytes) -> bytes:
        """The path a new entry `name` of `parent` gets; EEXIST if it is taken."""
        self._check_name(parent, name)
        if self._child(parent, name) is not None:
            raise fuse_error(errno.EEXIST)
        path = self._path(parent)
        return path + b"/" + name if path else name

    @staticmethod
    def _check_name(parent: Node, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise fuse_error(errno.ENAMETOOLONG)
        if parent.inode == pyfuse3.ROOT_INODE and (name == b".git" or Answers.asks(name)):
            raise fuse_error(errno.EPERM)  # git's own (it points at the repository), or a question
        if parent.kind is Kind.GITLINK:
            raise fuse_error(errno.EPERM)  # a submodule's place, not a directory of ours

    def _made(self, parent: Node, name: bytes, entry: OverlayEntry) -> Node:
        """Record a new entry and make its node, counted as looked up (it goes to the kernel)."""
        self.overlay.put(entry)
        kind = overlay_kind(entry)
        node = self._new_node(parent, name, kind, None, entry)
        if kind is Kind.DIR:
            node.entries = {}
        self._attach(parent, name, node, entry)
        return node

    # --- kernel operations: never gated ---

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """The overlay's file system: what can still be written here is what it has free."""
        free = os.statvfs(self.overlay.root)
        sfs = pyfuse3.StatvfsData()
        sfs.f_bsize, sfs.f_frsize = free.f_bsize, free.f_frsize
        sfs.f_blocks, sfs.f_bfree, sfs.f_bavail = free.f_blocks, free.f_bfree, free.f_bavail
        sfs.f_files, sfs.f_ffree, sfs.f_favail = free.f_files, free.f_ffree, free.f_favail
        sfs.f_namemax = NAME_MAX
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
        # Nothing to do at close: every write is in its content file before it returns. ENOSYS
        # tells the kernel so, once, and it sends no flush again: a round trip less per close
        # (git status opens and closes every .gitignore each time it runs).
        raise fuse_error(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        if handle.fd is not None:
            os.fsync(handle.fd)
        self._save_mtime(handle.node)
        self.overlay.sync()

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.overlay.sync()

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        node = handle.node
        if node.kind is Kind.DOTGIT:
            return node.snap.dotgit[off : off + size]
        if node.answer is not None:
            return node.answer[off : off + size]
        if node.data is not None:
            return os.pread(self._fd(handle), size, off)
        # pyfuse3 does not say who reads: the opener's thread may not be the reader (another
        # thread, a child after fork), and its signals must not fail someone else's read. open
        # hydrated the blob already; a read that must fetch waits until the fetch deadline.
        await self._hydrate(node, None)
        return await self._read_blob(node, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise fuse_error(errno.EBADF)
        node = handle.node
        fd = self._fd(handle)
        if handle.append:
            off = os.fstat(fd).st_size
        written = os.pwrite(fd, buf, off)
        self._changed(node)
        return written

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handle(fh)
        node = handle.node
        node.listed_at = time.monotonic()
        # The names as they stood when the listing began: removals while it goes on (rm -r)
        # must not shift the offsets the kernel resumes from.
        if handle.names is None or start_id == 0:
            handle.names = sorted(self._listing(node))
        names = handle.names
        made: list[Node] = []
        accepted = 0
        try:
            for index in range(start_id, len(names)):
                child = self._child(node, names[index])
                if child is None:
                    continue  # removed since the listing began
                made.append(child)
                # A listing (git's walk for untracked files) needs names and types, not sizes.
                if not pyfuse3.readdir_reply(token, names[index], self._attr(child, probe=False), index + 1):
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
        self.lookups_served += 1
        await self.gate.wait(ctx.pid)
        parent = self._node(parent_inode)
        if name == b".":
            node: Node | None = parent
        elif name == b"..":
            node = self._node(parent.parent)
        elif not parent.is_dir:
            raise fuse_error(errno.ENOTDIR)
        elif parent_inode == pyfuse3.ROOT_INODE and Answers.asks(name):
            node = self._answer(name)
        else:
            node = self._child(parent, name)
        if node is None:
            return self._absence(parent, name)
        try:
            attr = self._attr(node)
        except BaseException:
            self._drop_unless_counted([node])
            raise
        node.lookups += 1
        return attr

    def _answer(self, name: bytes) -> Node:
        """A file that holds the fsmonitor answer the name asks for (see fsmonitor.py): made for
        this lookup alone, in no listing, gone once the kernel forgets it."""
        self.follow_head_safely()  # git asks before it uses the index: catch up with HEAD first
        snap = self._snap()
        answer = self.fsmonitor.answer_to(name, snap.repo, str(snap.commit.id))
        inode = self.next_inode
        self.next_inode += 1
        node = self.nodes[inode] = Node(inode, pyfuse3.ROOT_INODE, name, Kind.ANSWER, None, snap, unlinked=True,
                                        answer=answer)  # fmt: skip
        return node

    def _absence(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        """An absent name, which the kernel may cache (an entry with inode 0) until a new commit
        is shown: a repeated lookup of it then costs no round trip."""
        if len(self.absent) >= NEGATIVE_ENTRIES_LIMIT:
            raise fuse_error(errno.ENOENT)
        self.absent.add((parent.inode, name))
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = CACHE_SECONDS
        return attr

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self.gate.wait(ctx.pid)
        return self._open_handle(self._directory(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        await self.gate.wait(ctx.pid)
        node = self._node(inode)
        if node.kind is not Kind.LINK:
            raise fuse_error(errno.EINVAL)
        if node.over is not None and node.over.target is not None:
            return node.over.target
        await self._hydrate(node, ctx.pid)
        assert node.oid is not None
        return await node.snap.contents.whole(node.oid)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self.gate.wait(ctx.pid)
        node = self._node(inode)
        if node.is_dir:
            raise fuse_error(errno.EISDIR)
        writable = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        truncate = bool(flags & os.O_TRUNC) and writable
        if node.kind in (Kind.DOTGIT, Kind.ANSWER) and (writable or truncate):
            raise fuse_error(errno.EPERM)
        if writable:
            await self._copy_up(node, keep=not truncate, caller_tid=ctx.pid)
            if truncate and self._data_size(node.data) > 0:  # type: ignore[arg-type]
                os.truncate(self.overlay.data_path(node.data), 0)  # type: ignore[arg-type]
                self._changed(node)
        else:
            await self._hydrate(node, ctx.pid)
            await self._store_pages(node)
        fh = self._open_handle(node, writable=writable, append=bool(flags & os.O_APPEND))
        return pyfuse3.FileInfo(fh=fh, keep_cache=not truncate and node.kind is not Kind.ANSWER)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        await self.gate.wait(ctx.pid)
        node = self._make_file(self._directory(parent_inode), name, mode)
        fh = self._open_handle(node, writable=flags & os.O_ACCMODE != os.O_RDONLY, append=bool(flags & os.O_APPEND))
        attr = self._attr(node)
        node.lookups += 1
        return pyfuse3.FileInfo(fh=fh), attr

    def _make_file(self, parent: Node, name: bytes, mode: int) -> Node:
        path = self._new_name(parent, name)
        data = self.overlay.new_data()
        try:
            return self._made(parent, name, OverlayEntry(path, EntryKind.FILE, mode & 0o7777, time.time_ns(), data=data))
        except BaseException:
            self.overlay.free(data)
            raise

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self.gate.wait(ctx.pid)
        if not stat.S_ISREG(mode):
            raise fuse_error(errno.EPERM)  # a working tree holds files, directories and links
        node = self._make_file(self._directory(parent_inode), name, mode)
        node.lookups += 1
        return self._attr(node)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self.gate.wait(ctx.pid)
        parent = self._directory(parent_inode)
        path = self._new_name(parent, name)
        # Opaque: a base directory removed from this path earlier must not show through.
        node = self._made(parent, name, OverlayEntry(path, EntryKind.DIR, mode & 0o7777, time.time_ns(), opaque=True))
        node.lookups += 1
        return self._attr(node)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self.gate.wait(ctx.pid)
        parent = self._directory(parent_inode)
        path = self._new_name(parent, name)
        node = self._made(parent, name, OverlayEntry(path, EntryKind.LINK, 0o777, time.time_ns(), target=target))
        node.lookups += 1
        return self._attr(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.gate.wait(ctx.pid)
        parent = self._directory(parent_inode)
        node = self._existing(parent, name)
        if node.is_dir:
            raise fuse_error(errno.EISDIR)
        self._remove(parent, name, node)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.gate.wait(ctx.pid)
        parent = self._directory(parent_inode)
        node = self._existing(parent, name)
        if not node.is_dir:
            raise fuse_error(errno.ENOTDIR)
        if self._listing(node):
            raise fuse_error(errno.ENOTEMPTY)
        self._remove(parent, name, node)

    def _existing(self, parent: Node, name: bytes) -> Node:
        self._check_name(parent, name)
        node = self._child(parent, name)
        if node is None:
            raise fuse_error(errno.ENOENT)
        return node

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        path = self._path(node)
        self._free(self.overlay.remove(path, in_base=self._in_base(parent, name), mtime_ns=time.time_ns()))
        self._detach(parent, name, node)

    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:  # fmt: skip
        await self.gate.wait(ctx.pid)
        if flags & RENAME_EXCHANGE or flags & ~RENAME_NOREPLACE:
            raise fuse_error(errno.EINVAL)  # an exchange cannot be recorded as one overlay change
        old_parent, new_parent = self._directory(parent_inode_old), self._directory(parent_inode_new)
        node = self._existing(old_parent, name_old)
        self._check_name(new_parent, name_new)
        target = self._child(new_parent, name_new)
        if target is node:
            return
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise fuse_error(errno.EEXIST)
            if node.is_dir and not target.is_dir:
                raise fuse_error(errno.ENOTDIR)
            if target.is_dir and not node.is_dir:
                raise fuse_error(errno.EISDIR)
            if target.is_dir and self._listing(target):
                raise fuse_error(errno.ENOTEMPTY)
        new_dir_path = self._path(new_parent)
        new_path = new_dir_path + b"/" + name_new if new_dir_path else name_new
        moved = self._entry_of(node, new_path)
        if moved.kind is EntryKind.DIR and moved.base_tree is None and not moved.opaque:
            # Its base was the one at its old place: carry it along, or the base at the new
            # place would show through.
            moved = replace(moved, base_tree=node.oid, opaque=node.oid is None)
        freed = self.overlay.rename(self._path(node), new_path, moved=moved,
                                    old_in_base=self._in_base(old_parent, name_old), mtime_ns=time.time_ns())  # fmt: skip
        if target is not None:
            self._detach(new_parent, name_new, target)
        self._free(freed)
        self._unname(old_parent, name_old, node)
        node.parent, node.name = new_parent.inode, name_new
        node.over, node.mtime_ns = moved, None
        self._attach(new_parent, name_new, node, moved)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.gate.wait(ctx.pid)
        raise fuse_error(errno.EPERM)  # git has no hard links: the overlay records none

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        await self.gate.wait(ctx.pid)
        node = self._node(inode)
        if (fields.update_uid and attr.st_uid != self.uid) or (fields.update_gid and attr.st_gid != self.gid):
            raise fuse_error(errno.EPERM)  # every file here is the mount owner's
        if not (fields.update_size or fields.update_mode or fields.update_mtime):
            return self._attr(node)  # atime, ctime and an unchanged owner are not kept
        if node.kind in (Kind.DOTGIT, Kind.ANSWER):
            raise fuse_error(errno.EPERM)
        if fields.update_size:
            await self._copy_up(node, keep=attr.st_size > 0, caller_tid=ctx.pid)
            os.truncate(self.overlay.data_path(node.data), attr.st_size)  # type: ignore[arg-type]
            node.mtime_ns = time.time_ns()
        entry = self._entry_of(node, self._path(node))
        if fields.update_mode and node.kind is not Kind.LINK:
            entry = replace(entry, mode=attr.st_mode & 0o7777)
        if fields.update_mtime:
            entry = replace(entry, mtime_ns=attr.st_mtime_ns)
        self._record(node, entry)
        return self._attr(node)

    def _changed(self, node: Node) -> None:
        node.mtime_ns = time.time_ns()
        if not node.unlinked:
            self.overlay.touch(self._path(node))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> None:
        await self.gate.wait(ctx.pid)  # default_permissions: the kernel checks the modes

    # Extended attributes: git records none. ENOSYS tells the kernel so, once for each call, and it
    # answers every later one itself with EOPNOTSUPP (ENOTSUP): `ls -l` asks for two attributes
    # of every file it lists (SELinux's label and the ACL), a round trip each otherwise.

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise fuse_error(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        raise fuse_error(errno.ENOSYS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise fuse_error(errno.ENOSYS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise fuse_error(errno.ENOSYS)

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
