"""Walks, seen in the misses: how much one fetch should bring.

A read that misses fetches its blob; a second miss in a directory (or a miss right after the
directory was listed) brings the directory. That is right for an editor opening a few files and
ruinous for `ls -lR`, `grep -r`, `du` or an indexer, which miss in one directory after another:
one round trip per directory. WalkWatch tells the two apart by the directory batches themselves.
When they span several directories in a short time, the next batch takes the whole subtree those
directories share; when the walk goes on outside it, the next takes everything still missing at
the commit shown. A walk of any size then costs a handful of transactions.

Pure logic, no I/O: the filesystem asks, the hydrator fetches.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Directory batches closer together than this belong to one walk.
WALK_WINDOW_SECONDS = 2.0
# Distinct directories batched within the window that make a walk: the next batch takes the
# subtree they share.
SUBTREE_AFTER_DIRECTORIES = 3
# Distinct directories batched outside the walk's subtrees that make it a walk of everything.
COMMIT_AFTER_DIRECTORIES = 2


class Scope(enum.Enum):
    DIRECTORY = "directory"  # the missing blobs of one directory
    SUBTREE = "subtree"  # every missing blob under a directory
    COMMIT = "commit"  # every missing blob of the commit shown


@dataclass(frozen=True)
class Reach:
    scope: Scope
    path: bytes  # the directory (or the subtree's root); b"" is the top of the tree


def depth(path: bytes) -> int:
    """How many directories down `path` lies (b"", the top, is 0)."""
    return path.count(b"/") + 1 if path else 0


def is_under(path: bytes, top: bytes) -> bool:
    """Whether directory `path` is `top` or lies below it (b"" is the top of the tree)."""
    return not top or path == top or path.startswith(top + b"/")


def common_directory(paths: list[bytes]) -> bytes:
    """The deepest directory that holds every one of `paths` (b"" for the top)."""
    parts = [p.split(b"/") if p else [] for p in paths]
    shared: list[bytes] = []
    for names in zip(*parts):
        if any(name != names[0] for name in names):
            break
        shared.append(names[0])
    return b"/".join(shared)


@dataclass
class WalkWatch:
    window: float = WALK_WINDOW_SECONDS
    subtree_after: int = SUBTREE_AFTER_DIRECTORIES
    commit_after: int = COMMIT_AFTER_DIRECTORIES
    _recent: dict[bytes, float] = field(default_factory=dict)  # directory -> when it was batched
    _subtrees: list[bytes] = field(default_factory=list)  # taken whole during this walk
    _last: float | None = None

    def reach(self, directory: bytes, now: float) -> Reach:
        """A batch of `directory`'s missing blobs is about to be fetched: how far should it reach?"""
        if self._last is not None and now - self._last > self.window:
            self._recent.clear()  # the walk (if it was one) is over
            self._subtrees.clear()
        self._last = now
        self._recent = {d: t for d, t in self._recent.items() if now - t <= self.window}
        self._recent[directory] = now
        if self._subtrees:
            outside = [d for d in self._recent if not any(is_under(d, top) for top in self._subtrees)]
            if len(outside) >= self.commit_after:
                return Reach(Scope.COMMIT, b"")
            return Reach(Scope.DIRECTORY, directory)
        if len(self._recent) >= self.subtree_after:
            top = common_directory(list(self._recent))
            self._subtrees.append(top)
            return Reach(Scope.COMMIT, b"") if not top else Reach(Scope.SUBTREE, top)
        return Reach(Scope.DIRECTORY, directory)
