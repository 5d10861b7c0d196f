"""Prefetch planners: the objects an operation will read, computed locally, to fetch in one go.

A blobless clone has every commit and tree, so what a history walk, a diff or a checkout will
read is known before it runs: the blob ids are in the trees. Git itself asks for missing objects
one transaction at a time in those operations (blame, log -p, diff across history); a plan
gathers them first, and `gitstore.fetch_objects` brings all of them in a single transaction.

Planners read with libgit2, which never fetches: they never read a blob, only trees.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pygit2

from ..model import InvalidInput
from .connectivity import GITLINK_MODE, TREE_MODE


@dataclass(frozen=True)
class Plan:
    """What an operation needs (`needed`, blob and tree ids) and which of them are absent."""

    description: str
    commit: str
    needed: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def transactions(self) -> int:
        return 1 if self.missing else 0

    def as_dict(self) -> dict[str, object]:
        return {"plan": self.description, "commit": self.commit, "needed": len(self.needed),
                "present": len(self.needed) - len(self.missing), "missing": len(self.missing),
                "transactions": self.transactions}  # fmt: skip


def resolve_commit(repo: pygit2.Repository, rev: str, what: str) -> pygit2.Commit:
    try:
        found = repo.revparse_single(rev).peel(pygit2.Commit)
    except (KeyError, ValueError, pygit2.GitError, pygit2.InvalidSpecError):
        raise InvalidInput(f"{what} {rev!r} names no commit in the repository's git directory "
                           "(a branch, tag or commit id that `artifactfs prepare` has fetched)") from None  # fmt: skip
    assert isinstance(found, pygit2.Commit)
    return found


def _plan(repo: pygit2.Repository, description: str, commit: pygit2.Commit, needed: Iterable[str]) -> Plan:
    odb = repo.odb
    ordered = tuple(dict.fromkeys(needed))  # the order found, once each
    return Plan(description, str(commit.id), ordered, tuple(oid for oid in ordered if not odb.exists(oid)))


def tree_blobs(repo: pygit2.Repository, tree_id: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, id) of every blob under a tree, and of every subtree that is missing (a shallower
    fetch's): its blobs are unknown until it arrives, so the tree itself is what is needed."""
    odb = repo.odb
    stack = [(tree_id, prefix)]
    while stack:
        oid, path = stack.pop()
        if not odb.exists(oid):
            yield path, oid
            continue
        tree = repo[oid]
        assert isinstance(tree, pygit2.Tree)
        for entry in tree:
            if entry.filemode == GITLINK_MODE:
                continue
            entry_path = f"{path}/{entry.name}" if path else str(entry.name)
            if entry.filemode == TREE_MODE:
                stack.append((str(entry.id), entry_path))
            else:
                yield entry_path, str(entry.id)


def matches(path: str, globs: Sequence[str]) -> bool:
    """A glob matches a whole path (`*` crosses slashes, as in git's pathspecs), or one of its
    parent directories: `docs` means everything under docs/."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(c, g.rstrip("/")) for g in globs for c in candidates)


def paths_plan(repo: pygit2.Repository, commit: pygit2.Commit, globs: Sequence[str]) -> Plan:
    """The blobs at `commit` whose paths match `globs`."""
    if not globs:
        raise InvalidInput("--paths needs at least one GLOB (e.g. 'src/*.py', or docs for all of docs/)")
    needed = (oid for path, oid in tree_blobs(repo, str(commit.tree_id)) if matches(path, globs))
    return _plan(repo, f"paths {' '.join(globs)}", commit, needed)


def rev_plan(repo: pygit2.Repository, commit: pygit2.Commit) -> Plan:
    """Everything a checkout of `commit` writes: every blob of its tree."""
    return _plan(repo, f"rev {commit.id}", commit, (oid for _, oid in tree_blobs(repo, str(commit.tree_id))))


def blob_at(repo: pygit2.Repository, commit: pygit2.Commit, path: str) -> str | None:
    try:
        entry = commit.tree[path]
    except (KeyError, pygit2.GitError):
        return None
    return None if entry.filemode in (TREE_MODE, GITLINK_MODE) else str(entry.id)


def history_plan(repo: pygit2.Repository, commit: pygit2.Commit, path: str, max_count: int | None) -> Plan:
    """Every version of `path` that `git blame` or `git log -p` reads from `commit` back: the
    blob at each commit that changed it and at that commit's parents (what the change is
    compared with), over at most `max_count` changing commits. Missing parents (a history not
    yet here) end the walk; their versions arrive with them."""
    path = path.strip("/")
    if not path:
        raise InvalidInput("--history needs a file's path in the repository (e.g. src/app.py)")
    if max_count is not None and max_count < 1:
        raise InvalidInput(f"--max-count must be a positive number of commits, not {max_count}")
    odb = repo.odb
    needed: list[str] = []
    changes = 0
    walker = repo.walk(commit.id, pygit2.enums.SortMode.TOPOLOGICAL | pygit2.enums.SortMode.TIME)
    while True:
        try:
            current = next(walker)
        except StopIteration:
            break
        except pygit2.GitError:
            break  # a parent that is not here (a shallow or still arriving history)
        blob = blob_at(repo, current, path)
        parents = [p for p in current.parent_ids if odb.exists(p)]
        before = [blob_at(repo, repo[p], path) for p in parents]  # type: ignore[arg-type]
        if blob is None and not any(before):
            continue
        if parents and all(b == blob for b in before):
            continue  # the same version as a parent's: not a change of this path
        changes += 1
        needed.extend(oid for oid in (blob, *before) if oid is not None)
        if max_count is not None and changes >= max_count:
            break
    if not changes:
        raise InvalidInput(f"--history {path!r}: no commit from {commit.id} back touches that path")
    suffix = f" --max-count {max_count}" if max_count is not None else ""
    return _plan(repo, f"history {path}{suffix}", commit, needed)


Change = tuple[str, "str | None", "str | None"]  # (path, blob before, blob after); None: no blob there


def changes(repo: pygit2.Repository, a: str | None, b: str | None, prefix: str = "") -> Iterator[Change]:
    """Every blob that differs between trees `a` and `b` (None: an empty tree), by path,
    descending only into subtrees whose ids differ: an unchanged directory costs nothing. A file
    that became a directory (or the reverse) is a change of each blob on either side."""
    if a == b:
        return
    left, right = _entries(repo, a), _entries(repo, b)
    for name in sorted(left.keys() | right.keys()):
        old, new = left.get(name), right.get(name)
        if old == new:
            continue
        path = f"{prefix}/{name}" if prefix else name
        old_tree = old[0] if old is not None and old[1] == TREE_MODE else None
        new_tree = new[0] if new is not None and new[1] == TREE_MODE else None
        if old_tree is not None or new_tree is not None:
            yield from changes(repo, old_tree, new_tree, path)
        old_blob = old[0] if old is not None and old[1] not in (TREE_MODE, GITLINK_MODE) else None
        new_blob = new[0] if new is not None and new[1] not in (TREE_MODE, GITLINK_MODE) else None
        if old_blob != new_blob:
            yield path, old_blob, new_blob


def _entries(repo: pygit2.Repository, tree_id: str | None) -> dict[str, tuple[str, int]]:
    if tree_id is None:
        return {}
    tree = repo[tree_id]
    assert isinstance(tree, pygit2.Tree)
    return {str(e.name): (str(e.id), e.filemode) for e in tree}


def diff_plan(repo: pygit2.Repository, a: pygit2.Commit, b: pygit2.Commit) -> Plan:
    """Both sides of every blob that changed between commits `a` and `b` (git diff A B)."""
    needed = (oid for _, *sides in changes(repo, str(a.tree_id), str(b.tree_id)) for oid in sides if oid is not None)
    return _plan(repo, f"diff {a.id} {b.id}", b, needed)
