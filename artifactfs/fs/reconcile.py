"""The base follows HEAD: the overlay re-expressed against another commit, the view unchanged.

When git moves HEAD inside the mount (commit, checkout, reset, merge, pull), it has already
written the work tree it wants through the mount: every file it changed is in the overlay. What
the mount shows must not change when its base moves to the new commit; only what the overlay
holds does. So the overlay is rewritten against the new base:

- what the overlay holds and the new base has at the same path, with the same content, leaves
  it: a content file equal to the new base's blob is deleted and the entry names the blob (its
  mode and time stay, so that make and git see the same file as before); an entry that adds
  nothing (the blob, the default mode, a time no later than the base's) goes altogether; a
  whiteout where the new base has nothing goes;
- what the old base showed and the new one does not (`git reset --soft`, a checkout that kept a
  file) is kept by an entry naming the old base's object, by reference: nothing is read or copied;
- a directory renamed or made anew (opaque) where the new base has a directory becomes an ordinary
  one again, with entries for whatever of the new base's tree it did not show.

Only trees are read (a blobless clone has them all), plus the content files that might equal a
new blob, which are hashed. Content files that handles hold open stay as they are: a writer keeps
writing to its file, and the next move of HEAD looks at it again.

The walk visits only the directories where the two bases differ or the overlay holds something
whose meaning depends on the base.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pygit2

from ..gitstore import PREPARE_REFLOG_MESSAGE
from .nodes import GIT_MODE_KINDS, KIND_MODES, Kind
from .overlay import EntryKind, Overlay, OverlayEntry

DEFAULT_DIR_MODE = 0o755


@dataclass(frozen=True)
class BaseEntry:
    kind: Kind
    oid: str


@dataclass
class Plan:
    """What the overlay must become for the new base, and where the view's sources changed."""

    put: dict[bytes, OverlayEntry] = field(default_factory=dict)
    delete: set[bytes] = field(default_factory=set)
    # Directories whose base tree or overlay children changed: their nodes and listings must be
    # read again (what they show is the same; where it comes from is not).
    visited: set[bytes] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not self.put and not self.delete


def join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory else name


def tree_entries(repo: pygit2.Repository, tree: str | None) -> dict[bytes, BaseEntry]:
    if tree is None:
        return {}
    obj = repo.get(tree)
    if not isinstance(obj, pygit2.Tree):
        raise KeyError(f"tree {tree} is not in the local git directory")
    found = {}
    for item in obj:
        kind = GIT_MODE_KINDS.get(item.filemode)
        if kind is not None:
            name = item.raw_name if hasattr(item, "raw_name") else item.name.encode()
            found[name] = BaseEntry(kind, str(item.id))
    return found


class Planner:
    """Plans the move of one overlay from base tree `old` to base tree `new` (see the module)."""

    def __init__(self, repo: pygit2.Repository, overlay: Overlay, *, base_mtime_ns: int,
                 held: Callable[[int], bool]) -> None:  # fmt: skip
        self.repo = repo
        self.overlay = overlay
        self.base_mtime_ns = base_mtime_ns  # what an entry-less file shows as its time
        self.held = held  # whether a content file is open in a handle
        self.plan = Plan()

    def run(self, old: str, new: str) -> Plan:
        self._walk(b"", old, new)
        return self.plan

    def _walk(self, directory: bytes, old: str | None, new: str | None) -> None:
        """Directory `directory` showed base tree `old` under its overlay entries; make it show the
        same with base tree `new`."""
        self.plan.visited.add(directory)
        before, after = tree_entries(self.repo, old), tree_entries(self.repo, new)
        entries = self.overlay.children(directory)
        for name in sorted(before.keys() | after.keys() | entries.keys()):
            path = join(directory, name)
            a, b, entry = before.get(name), after.get(name), entries.get(name)
            if entry is None:
                self._plain(path, a, b)
            elif entry.kind is EntryKind.DIR:
                self._directory(entry, a, b)
            elif entry.kind is EntryKind.WHITEOUT:
                if b is None:
                    self.plan.delete.add(path)
            elif entry.kind is EntryKind.FILE:
                self._file(entry, b)
            elif entry.kind is EntryKind.LINK:
                self._link(entry, b)

    def _plain(self, path: bytes, a: BaseEntry | None, b: BaseEntry | None) -> None:
        """A path the overlay does not hold: it showed the old base's entry, and must go on doing so."""
        if a == b:
            return
        if a is not None and b is not None and a.kind is Kind.DIR and b.kind is Kind.DIR:
            self._walk(path, a.oid, b.oid)
            return
        kept = self._keep(path, a)
        if kept is not None:
            self.plan.put[path] = kept

    def _keep(self, path: bytes, a: BaseEntry | None) -> OverlayEntry | None:
        """An entry showing what the old base had at `path` (by reference), or a whiteout."""
        mtime = self.base_mtime_ns
        if a is None:
            return OverlayEntry(path, EntryKind.WHITEOUT, 0, mtime)
        if a.kind in (Kind.FILE, Kind.EXEC):
            return OverlayEntry(path, EntryKind.FILE, KIND_MODES[a.kind] & 0o777, mtime, base_oid=a.oid)
        if a.kind is Kind.LINK:
            return OverlayEntry(path, EntryKind.LINK, 0o777, mtime, base_oid=a.oid)
        if a.kind is Kind.DIR:
            return OverlayEntry(path, EntryKind.DIR, DEFAULT_DIR_MODE, mtime, base_tree=a.oid)
        return None  # a submodule cannot be recorded in the overlay: the new base's shows

    def _directory(self, entry: OverlayEntry, a: BaseEntry | None, b: BaseEntry | None) -> None:
        if entry.base_tree is not None:
            shown: str | None = entry.base_tree
        elif entry.opaque:
            shown = None
        else:  # follows the base at its path: the old one's tree, if it had one
            shown = a.oid if a is not None and a.kind is Kind.DIR else None
        if b is not None and b.kind is Kind.DIR:
            if shown != b.oid:
                self._walk(entry.path, shown, b.oid)
            else:
                self.plan.visited.add(entry.path)
            if self._adds_nothing(entry, DEFAULT_DIR_MODE):
                self.plan.delete.add(entry.path)
            elif entry.base_tree is not None or entry.opaque:
                self.plan.put[entry.path] = replace(entry, base_tree=None, opaque=False)
        elif entry.base_tree is None and not entry.opaque and shown is not None:
            # The new base has no directory here: keep showing the old one's by reference.
            self.plan.put[entry.path] = replace(entry, base_tree=shown)

    def _file(self, entry: OverlayEntry, b: BaseEntry | None) -> None:
        if b is None or b.kind not in (Kind.FILE, Kind.EXEC):
            return
        if entry.data is not None:
            if self.held(entry.data) or not self._same_content(entry.data, b.oid):
                return
            named = replace(entry, data=None, base_oid=b.oid)
        elif entry.base_oid == b.oid:
            named = entry
        else:
            return
        if self._adds_nothing(entry, KIND_MODES[b.kind] & 0o777):
            self.plan.delete.add(entry.path)
        elif named != entry:
            self.plan.put[entry.path] = named

    def _link(self, entry: OverlayEntry, b: BaseEntry | None) -> None:
        if b is None or b.kind is not Kind.LINK:
            return
        oid = entry.base_oid if entry.target is None else str(pygit2.hash(entry.target))
        if oid == b.oid and self._adds_nothing(entry, 0o777):
            self.plan.delete.add(entry.path)

    def _adds_nothing(self, entry: OverlayEntry, mode: int) -> bool:
        """Whether the base's entry would show the same: mode, and a time no later (a file's time
        may move forward, never back: make would take an older source for built)."""
        return entry.mode == mode and entry.mtime_ns <= self.base_mtime_ns

    def _same_content(self, data: int, oid: str) -> bool:
        path = self.overlay.data_path(data)
        if self.repo.odb.exists(oid):
            _, size = self.repo.odb.read_header(oid)
            if os.stat(path).st_size != size:
                return False
        return str(pygit2.hashfile(str(path))) == oid


def plan_move(repo: pygit2.Repository, overlay: Overlay, old_tree: str, new_tree: str, *,
              base_mtime_ns: int, held: Callable[[int], bool]) -> Plan:  # fmt: skip
    """The overlay's entries for base tree `new_tree` that show what it shows over `old_tree`."""
    return Planner(repo, overlay, base_mtime_ns=base_mtime_ns, held=held).run(old_tree, new_tree)


def head_commit(repo: pygit2.Repository) -> pygit2.Commit | None:
    """The commit HEAD names now, or None (unborn, or a ref git is in the middle of writing)."""
    try:
        commit = repo.head.peel(pygit2.Commit)
    except (pygit2.GitError, KeyError, ValueError):
        return None
    return commit if isinstance(commit, pygit2.Commit) else None


def moved_by_preparation(repo: pygit2.Repository) -> bool:
    """Whether HEAD's last move was preparation's (a refresh): that move is not git's inside the
    mount, and the mount hears of it from mountd, which shows the new commit as it is."""
    try:
        for entry in repo.references["HEAD"].log():
            return bool(entry.message and entry.message.startswith(PREPARE_REFLOG_MESSAGE))
    except (pygit2.GitError, KeyError, ValueError):
        pass
    return False
