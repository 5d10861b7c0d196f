"""Ready in one commit's time: the tree first, the history behind it.

A worker's preparation clones (or a refresh fetches) one commit deep, blobless: that commit and its
trees, what the mount and `git status` need. It is then made a whole repository again, not a
shallow one: its `shallow` file goes, and the parents it lacks become missing objects that the
promisor remote will send, named in the history marker of the git directory (partial/helper.py).
The repository is published ready, and the same job fetches the rest of the history (commits and
trees, no blobs) in one transaction, as git would on its first walk of it. Until then git run in
the mount is never wrong: the first walk that reaches a missing commit asks the remote helper,
which waits for that fetch or makes it itself, and then git sees the whole history.

A blocking add, a prepared git directory, `--depth` (shallow by request) and `--require-commit`
(checked against the history, which must be here) clone the whole history at once, as before.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .model import GitError, RepoState
from .partial.helper import HISTORY_MARKER, HISTORY_SHALLOW, LAZY_FETCH_LOG, History, complete_history, pending_history

# What a remote says when it cannot serve a shallow fetch (dumb HTTP, some proxies and servers).
SHALLOW_REFUSED_MARKERS = ("does not support shallow", "shallow capabilities", "shallow file has changed")


class HistoryIncomplete(GitError):
    """A commit of the shown commit's history is still missing after the history fetch."""


def defers_history(repo: RepoState) -> bool:
    """Whether a worker's preparation of `repo` publishes ready before its history is here."""
    return repo.depth is None and repo.require_commit is None and not repo.prepared_gitdir


def shallow_refused(exc: GitError) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in SHALLOW_REFUSED_MARKERS)


def one_commit_first(get: Callable[[int | None], str], git_dir: Path, tip: str | None) -> tuple[str, bool]:
    """`get(depth)` clones or fetches the head, `depth` commits deep (None: all of them). The head
    one commit deep, its history opened behind it (open_history, negotiated from `tip`); or, if
    the remote cannot serve a shallow fetch, the whole history at once. The head, and whether the
    remote refused (the caller says so in its event)."""
    if history_pending(git_dir):
        # History still missing (an attempt stopped before its history fetch): a depth fetch
        # would write git's own shallow file, so it cannot be bounded by ours; a fetch of the
        # whole ref bounded by ours brings the commits from the boundary to the head alone.
        head = get(None)
        open_history(git_dir, head, tip)
        return head, False
    try:
        head = get(1)
    except GitError as exc:
        if not shallow_refused(exc):
            raise
        return get(None), True
    open_history(git_dir, head, tip)
    return head, False


def open_history(git_dir: Path, head: str, tip: str | None) -> int:
    """After a depth-1 clone or fetch of `head`: no longer shallow, its missing parents named in
    the marker (with those an earlier fetch left missing, and `tip`, a commit whose history is
    whole, to negotiate from), git's shallow file kept for our own fetches alone (shallow_args);
    how many commits are missing."""
    import pygit2  # libgit2 never fetches: what it does not find is not here

    boundary = _lines(git_dir / HISTORY_SHALLOW) | _lines(git_dir / "shallow")
    (git_dir / "shallow").unlink(missing_ok=True)
    repo = pygit2.Repository(str(git_dir))
    earlier = pending_history(git_dir)
    missing = [oid for oid in (earlier.missing if earlier else []) if oid not in repo]
    missing += [str(p) for p in repo[head].parent_ids if str(p) not in repo and str(p) not in missing]
    if not missing:
        (git_dir / HISTORY_MARKER).unlink(missing_ok=True)
        (git_dir / HISTORY_SHALLOW).unlink(missing_ok=True)
        return 0
    # The boundary before the marker: a fetch that sees the marker finds its bound.
    write_atomically(git_dir, HISTORY_SHALLOW, "".join(f"{oid}\n" for oid in sorted(boundary)))
    # A tip negotiates only if its history is whole: an earlier marker's tip is, the new one is
    # if nothing was missing before.
    negotiate = earlier.tip if earlier is not None else tip
    write_marker(git_dir, History(missing, negotiate if negotiate is not None and negotiate in repo else None))
    return len(missing)


def _lines(path: Path) -> set[str]:
    # utf-8, never ascii: its codec is always loaded, and a child that became the repository's
    # owner (owners.call_as) may not be able to import another.
    try:
        return set(path.read_text(encoding="utf-8").split())
    except FileNotFoundError:
        return set()


def write_marker(git_dir: Path, history: History) -> None:
    write_atomically(git_dir, HISTORY_MARKER, history.text())


def write_atomically(git_dir: Path, name: str, text: str) -> None:
    """Atomically: a helper that reads it mid-write would fetch too little."""
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.", dir=git_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, git_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_history(git_dir: Path, head: str) -> int:
    """Fetch what the marker names (unless a git in the mount did first) and check that the whole
    history of `head` is here; the number of its commits."""
    try:
        complete_history(git_dir)
    except OSError as exc:
        raise GitError(f"fetching the history failed: {exc} (see the worker's log; retry: artifactfs prepare)",
                       transient=True) from exc  # fmt: skip
    return count_commits(git_dir, head)


def count_commits(git_dir: Path, head: str) -> int:
    """The commits of `head`'s history; HistoryIncomplete if one is missing."""
    import pygit2

    repo = pygit2.Repository(str(git_dir))
    try:
        return sum(1 for _ in repo.walk(head, pygit2.enums.SortMode.NONE))
    except (KeyError, pygit2.GitError) as exc:
        raise HistoryIncomplete(f"the history of {head} is still incomplete after its fetch: {exc}") from exc


def lazy_fetches(git_dir: Path) -> int:
    """How many of git's own lazy fetches reached the remote helper (its log: a line each)."""
    try:
        with open(git_dir / LAZY_FETCH_LOG, "rb") as log:
            return sum(1 for _ in log)
    except OSError:
        return 0


def history_pending(git_dir: Path) -> bool:
    return pending_history(git_dir) is not None
