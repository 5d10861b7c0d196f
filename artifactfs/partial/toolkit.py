"""`artifactfs fsck` and `artifactfs prefetch`: a registered repository's git directory, checked or
filled ahead of need.

Both work on this host's git directory of the repository, as the user it belongs to (add-repo
--owner): root never walks a directory its owner may change under it. The work runs in a child
that has given up root (owners.call_as), and its answer comes back as plain data.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Settings
from ..gitstore import fetch_objects, git_env
from ..model import ObjectMissing, RepoNotReady, RepoState
from ..owners import call_as, git_dir_owner

if TYPE_CHECKING:
    from .plans import Plan

T = TypeVar("T")


@dataclass(frozen=True)
class PlanSpec:
    """Which planner, and its arguments (the CLI's options)."""

    paths: tuple[str, ...] = ()
    history: str | None = None
    max_count: int | None = None
    diff: tuple[str, str] | None = None
    rev: str | None = None


def local_git_dir(settings: Settings, repo: RepoState) -> Path:
    git_dir = settings.repo_git_dir(repo)
    if repo.head is None or not (git_dir / "HEAD").is_file():
        raise RepoNotReady(
            f"repository {repo.name} has no git directory yet (state {repo.prepare_state}): wait until it is "
            f"ready (artifactfs prepare --name {repo.name} --wait) and retry"
        )
    return git_dir


def as_owner(settings: Settings, repo: RepoState, action: Callable[[Path], T]) -> T:
    git_dir = local_git_dir(settings, repo)
    return call_as(git_dir_owner(repo), lambda: action(git_dir))


def fsck(settings: Settings, repo: RepoState, *, fetch_missing: bool = False) -> dict[str, Any]:
    """The connectivity report of the repository's git directory (connectivity.py); with
    `fetch_missing`, after fetching in one transaction what the shown commit lacks."""

    def run(git_dir: Path) -> dict[str, Any]:
        from .connectivity import check

        fetched = _fetch_plan(git_dir, make_plan(git_dir, PlanSpec(rev="HEAD"))) if fetch_missing else 0
        return {"head": _head(git_dir), **check(git_dir).as_dict(), "fetched": fetched}

    return as_owner(settings, repo, run)


def prefetch(settings: Settings, repo: RepoState, spec: PlanSpec, *, dry_run: bool) -> dict[str, Any]:
    """Plan (plans.py), then fetch what is missing in one transaction unless `dry_run`."""

    def run(git_dir: Path) -> dict[str, Any]:
        plan = make_plan(git_dir, spec)
        return {**plan.as_dict(), "fetched": 0 if dry_run else _fetch_plan(git_dir, plan)}

    return as_owner(settings, repo, run)


def _fetch_plan(git_dir: Path, plan: "Plan") -> int:
    """Fetch what `plan` lacks in one transaction; how many objects that was."""
    fetched = fetch_objects(git_dir, plan.missing, git_env())
    still = _absent(git_dir, plan.missing)
    if still:
        raise ObjectMissing(f"{len(still)} of {fetched} objects did not arrive from the remote, the first {still[0]}")
    return fetched


def make_plan(git_dir: Path, spec: PlanSpec) -> "Plan":
    import pygit2

    from . import plans

    repo = pygit2.Repository(str(git_dir))
    if spec.diff is not None:
        a, b = (plans.resolve_commit(repo, rev, "--diff") for rev in spec.diff)
        return plans.diff_plan(repo, a, b)
    if spec.rev is not None:
        return plans.rev_plan(repo, plans.resolve_commit(repo, spec.rev, "--rev"))
    head = plans.resolve_commit(repo, "HEAD", "HEAD")  # the shown commit
    if spec.history is not None:
        return plans.history_plan(repo, head, spec.history, spec.max_count)
    return plans.paths_plan(repo, head, spec.paths)


def _absent(git_dir: Path, oids: Sequence[str]) -> list[str]:
    import pygit2

    odb = pygit2.Repository(str(git_dir)).odb
    return [oid for oid in oids if not odb.exists(oid)]


def _head(git_dir: Path) -> str:
    import pygit2

    return str(pygit2.Repository(str(git_dir)).head.target)
