"""A promisor-aware connectivity check: what a partial clone has, what it may ask for, what it lost.

Every object reachable from a ref, HEAD or the index is one of:
- present: in the object database;
- missing but promised: absent, and named by an object that came from the promisor remote (an
  object of a promisor pack), which will send it on demand — git's own rule (is_promisor_object);
- missing and not promised: a hole. Nothing named it but local objects (a tree made here that
  names an absent blob, a ref to a commit that is gone): no fetch by git will ever fill it.

Present commits, trees and tags are read (and so checked) to walk on; every present object's
header is read for its type and size. Gitlinks (submodule commits) belong to another repository
and are not followed, as in git. A shallow repository's walk stops at its shallow commits.

libgit2 reads here, never git: git would lazily fetch a missing object it was asked about.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pygit2

from .packs import promisor_objects

GITLINK_MODE = pygit2.enums.FileMode.COMMIT  # a submodule's commit, in another repository
TREE_MODE = pygit2.enums.FileMode.TREE
HOLES_SHOWN = 20  # how many holes a report names (the counts are always whole)


class ObjectKind(str, enum.Enum):
    COMMIT = "commit"
    TREE = "tree"
    BLOB = "blob"
    TAG = "tag"


KIND_OF_TYPE = {
    pygit2.enums.ObjectType.COMMIT: ObjectKind.COMMIT,
    pygit2.enums.ObjectType.TREE: ObjectKind.TREE,
    pygit2.enums.ObjectType.BLOB: ObjectKind.BLOB,
    pygit2.enums.ObjectType.TAG: ObjectKind.TAG,
}


@dataclass(frozen=True)
class Missing:
    """An absent object: what the walk expected it to be, and where it was first seen."""

    oid: str
    kind: ObjectKind | None  # None: a ref's or a tag's target, which may be anything
    path: str  # the path in the tree that named it ("" for a commit, a tag, a ref's target)
    referrer: str  # the object (or ref, or "index") that named it


@dataclass
class KindTotals:
    count: int = 0
    bytes: int = 0


@dataclass
class ConnectivityReport:
    present: dict[ObjectKind, KindTotals] = field(default_factory=lambda: {k: KindTotals() for k in ObjectKind})
    promised: list[Missing] = field(default_factory=list)
    holes: list[Missing] = field(default_factory=list)
    corrupt: list[Missing] = field(default_factory=list)  # present but unreadable

    @property
    def present_count(self) -> int:
        return sum(t.count for t in self.present.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "present": self.present_count,
            "missing_promised": len(self.promised),
            "missing_unpromised": len(self.holes),
            "corrupt": len(self.corrupt),
            "present_by_type": {k.value: {"count": t.count, "bytes": t.bytes} for k, t in self.present.items()},
            "holes": [describe(m) for m in self.holes[:HOLES_SHOWN]],
            "corrupt_objects": [describe(m) for m in self.corrupt[:HOLES_SHOWN]],
        }


def describe(missing: Missing) -> dict[str, str]:
    kind = missing.kind.value if missing.kind is not None else "unknown"
    return {"id": missing.oid, "type": kind, "path": missing.path, "referenced_by": missing.referrer}


@dataclass(frozen=True)
class _Visit:
    oid: str
    kind: ObjectKind | None  # None: a ref's target, whatever it is
    path: str
    referrer: str
    promised: bool  # named by an object of a promisor pack


def check(git_dir: Path) -> ConnectivityReport:
    """Walk every ref, HEAD and the index of `git_dir`, and classify every object they reach."""
    repo = pygit2.Repository(str(git_dir))
    sha256 = _object_format(repo) == "sha256"
    walk = _Walk(repo, promisor_objects(git_dir, 32 if sha256 else 20), shallow_commits(git_dir))
    for name, oid in tips(repo):
        walk.visit(_Visit(oid, None, "", name, False))
    walk.run()
    for path, oid in index_blobs(repo):
        walk.visit(_Visit(oid, ObjectKind.BLOB, path, "index", False))
    walk.run()
    return walk.report()


def _object_format(repo: pygit2.Repository) -> str:
    try:
        return str(repo.config["extensions.objectformat"]).lower()
    except KeyError:
        return "sha1"


def tips(repo: pygit2.Repository) -> Iterator[tuple[str, str]]:
    """(name, object id) of HEAD and every ref; a symbolic ref counts as its target."""
    names = ["HEAD", *repo.references]
    for name in names:
        try:
            ref = repo.references[name].resolve()
        except (KeyError, pygit2.GitError):
            continue  # HEAD of a branch yet unborn, or a symbolic ref to nothing
        yield name, str(ref.target)


def index_blobs(repo: pygit2.Repository) -> Iterator[tuple[str, str]]:
    if repo.is_bare and not (Path(repo.path) / "index").is_file():
        return
    for entry in repo.index:
        if entry.mode != GITLINK_MODE:
            yield entry.path, str(entry.id)


def shallow_commits(git_dir: Path) -> frozenset[str]:
    try:
        return frozenset((git_dir / "shallow").read_text().split())
    except FileNotFoundError:
        return frozenset()


class _Walk:
    def __init__(self, repo: pygit2.Repository, promisor: frozenset[str], shallow: frozenset[str]) -> None:
        self.repo = repo
        self.odb = repo.odb
        self.promisor = promisor
        self.shallow = shallow
        self.pending: list[_Visit] = []
        self.seen: set[str] = set()
        self.missing: dict[str, tuple[Missing, bool]] = {}  # oid -> (first sighting, promised)
        self.totals = {k: KindTotals() for k in ObjectKind}
        self.corrupt: list[Missing] = []

    def visit(self, visit: _Visit) -> None:
        self.pending.append(visit)

    def run(self) -> None:
        while self.pending:
            self._step(self.pending.pop())

    def _step(self, visit: _Visit) -> None:
        oid = visit.oid
        if oid in self.seen:
            found = self.missing.get(oid)
            if found is not None and visit.promised and not found[1]:
                self.missing[oid] = (found[0], True)  # any promisor object naming it promises it
            return
        self.seen.add(oid)
        if not self.odb.exists(oid):
            self.missing[oid] = (Missing(oid, visit.kind, visit.path, visit.referrer), visit.promised)
            return
        try:
            type_, size = self.odb.read_header(oid)
            kind = KIND_OF_TYPE[pygit2.enums.ObjectType(type_)]
            if kind is not ObjectKind.BLOB:
                self._follow(oid, kind, visit.path)
        except (pygit2.GitError, KeyError, ValueError) as exc:
            self.corrupt.append(Missing(oid, visit.kind, visit.path, f"{visit.referrer} ({exc})"))
            return
        totals = self.totals[kind]
        totals.count += 1
        totals.bytes += size

    def _follow(self, oid: str, kind: ObjectKind, path: str) -> None:
        """Queue what a present commit, tree or tag names."""
        obj = self.repo[oid]
        promised = oid in self.promisor
        if kind is ObjectKind.COMMIT:
            assert isinstance(obj, pygit2.Commit)
            self.visit(_Visit(str(obj.tree_id), ObjectKind.TREE, "", oid, promised))
            if oid not in self.shallow:
                for parent in obj.parent_ids:
                    self.visit(_Visit(str(parent), ObjectKind.COMMIT, "", oid, promised))
        elif kind is ObjectKind.TREE:
            assert isinstance(obj, pygit2.Tree)
            for entry in obj:
                if entry.filemode == GITLINK_MODE:
                    continue
                child = ObjectKind.TREE if entry.filemode == TREE_MODE else ObjectKind.BLOB
                entry_path = f"{path}/{entry.name}" if path else str(entry.name)
                self.visit(_Visit(str(entry.id), child, entry_path, oid, promised))
        elif kind is ObjectKind.TAG:
            assert isinstance(obj, pygit2.Tag)
            self.visit(_Visit(str(obj.target), None, path, oid, promised))

    def report(self) -> ConnectivityReport:
        result = ConnectivityReport(present=self.totals, corrupt=list(self.corrupt))
        for found, promised in self.missing.values():
            (result.promised if promised else result.holes).append(found)
        return result
