"""Refreshes (add-repo --refresh INTERVAL): the repository's own host fetches its ref again every
INTERVAL, and the mount's commit moves forward only while the working tree has no changes of its
own. Each refresh ends in one REFRESHED event, whose outcome (model.RefreshOutcome) `status` shows:
moved (and the head before and after), unchanged, kept (a new commit not shown, and why) or failed
(and the error).

A refresh is no preparation: the repository stays ready and its mount open throughout, and a
refresh that fails (the remote down, a --require-commit the new commit lacks) leaves the commit
shown as it was. mountd publishes the job (publish_refresh) once per interval, on its own host's
queue; the job runs under the repository's lock, so it never overlaps a preparation. Its id names
the interval (`refresh:<host>:<repo>:<slot>`), and is the dedupe key of its event: a job delivered
twice records one refresh.

What counts as a change of the working tree's own: anything in the overlay (a file written, made,
removed or renamed, ignored ones too), or HEAD moved by git inside the mount (a commit, a
checkout). A write that lands between the check and the move is not lost: the overlay keeps it on
top of the new commit.
"""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .gitstore import PREPARE_REFLOG_MESSAGE, git_env, run_git
from .jobs import REGISTRY_PATIENCE
from .locks import repo_lock
from .logs import about
from .history import defers_history, history_pending, one_commit_first
from .model import ArtifactError, EventType, HistoryState, NewEvent, PrepareState, RefreshOutcome, RepoState, StaleAttempt
from .owners import call_as, git_dir_owner
from .attempts import Patience, current_attempt, record
from .prepare import complete_history, fetch_head, fetch_status_blobs, tree_entries, validate_remote, verify_source, write_index
from .registry import Registry, open_registry
from .remotes import redact, validate_name

log = logging.getLogger("artifactfs.refresh")

REFRESH_TASK = "artifactfs.refresh"


@dataclass(frozen=True)
class RefreshResult:
    outcome: RefreshOutcome
    head: str | None = None  # the head shown after the refresh
    detail: str = ""  # kept: why; failed: the error (redacted)
    history: bool = False  # the fetched commit's history is still to fetch, after the event

    def shown(self) -> dict[str, str]:
        """The task's result, as Flower lists it."""
        return {"outcome": self.outcome.value, **({"head": self.head} if self.head else {}),
                **({"detail": self.detail} if self.detail else {})}  # fmt: skip


def slot(repo: RepoState, now: float) -> int | None:
    """Which interval of `repo`'s refreshes the wall-clock time `now` falls in (None: it has none)."""
    if repo.refresh_seconds is None:
        return None
    return int(now // repo.refresh_seconds)


def refresh_task_id(host: str, name: str, interval_slot: int) -> str:
    return f"refresh:{host}:{name}:{interval_slot}"


def publish_refresh(settings: Settings, repo: RepoState, interval_slot: int) -> str:
    """Send the refresh job of `repo` for this interval to this host's queue."""
    from workers.app import app

    tid = refresh_task_id(settings.host, repo.name, interval_slot)
    # It expires with its interval: refreshes missed while the worker was away do not pile up.
    app.send_task(REFRESH_TASK, kwargs={"repo": repo.name, "slot": interval_slot, "host": settings.host},
                  task_id=tid, queue=settings.queue, expires=repo.refresh_seconds)  # fmt: skip
    return tid


def overlay_changes(overlay: Path) -> int:
    """How many paths the mount's overlay holds (0 if the mount never wrote one)."""
    database = overlay / "meta.db"
    if not database.is_file():
        return 0
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    finally:
        conn.close()


def own_changes(settings: Settings, repo: RepoState, git_dir: Path) -> tuple[str, str]:
    """Where git's HEAD stands, and why the working tree is not the commit shown ('' if it is).
    Read as the repository's owner: the overlay and the git directory are theirs.

    HEAD away from the commit shown is git's work in the mount (a commit, a checkout), unless its
    last move was ours: a refresh that moved it and was stopped before its event (a killed
    worker) is finished by the next one."""
    shown = repo.head or ""
    overlay = settings.overlay_dir(repo.name)
    branch = repo.ref if repo.ref.startswith("refs/heads/") else None

    def look() -> tuple[str, str]:
        at = run_git(["rev-parse", "--verify", "-q", "HEAD^{commit}"], git_dir=git_dir, check=False).stdout.decode().strip()
        if branch is not None:
            on = run_git(["symbolic-ref", "-q", "HEAD"], git_dir=git_dir, check=False).stdout.decode().strip()
            if on != branch:
                return at, f"HEAD is not on {branch} (a checkout in the mount)"
        if at != shown:
            last = run_git(["reflog", "-1", "--format=%gs", "HEAD"], git_dir=git_dir, check=False).stdout.decode()
            if not last.startswith(PREPARE_REFLOG_MESSAGE):
                return at, "git moved HEAD in the mount (a commit, a checkout or a reset)"
        changed = overlay_changes(overlay)
        return at, f"{changed} changed path(s) in the working tree" if changed else ""

    at, why = call_as(git_dir_owner(repo), look)
    return at, why


def advance(git_dir: Path, detached: bool, at: str, head: str, work_tree: Path, env: dict[str, str]) -> None:
    """Move HEAD (and the branch it is on) from `at` to `head`, and write the index of `head`.

    The blobs a status reads come first: nothing moves until they are here. The move is a
    compare-and-swap, so a commit made in the mount since the check makes it fail rather than be
    overwritten; an index that cannot be written (git in the mount holds index.lock) puts HEAD
    back. The reflog names the move as preparation's, so the mount leaves it to mountd."""
    entries = tree_entries(git_dir, head)
    fetch_status_blobs(git_dir, head, env, entries)
    how = ["--no-deref"] if detached else []
    if at != head:
        run_git(["update-ref", *how, "-m", PREPARE_REFLOG_MESSAGE, "HEAD", head, at], git_dir=git_dir)
    try:
        write_index(git_dir, head, work_tree, entries)
    except BaseException:
        if at != head:
            run_git(["update-ref", *how, "-m", PREPARE_REFLOG_MESSAGE, "HEAD", at, head], git_dir=git_dir, check=False)
        raise


def refresh_repo(settings: Settings, registry: Registry, name: str, job_id: str) -> RefreshResult | None:
    """Refresh `name` once, under its lock; None if there is nothing to refresh (not ready, no
    --refresh, removed), and nothing recorded."""
    with repo_lock(settings.lock_file(name)):
        repo = registry.get(name)
        if repo is None or repo.state is not PrepareState.READY or repo.refresh_seconds is None or repo.head is None:
            return None
        result = _refresh(settings, repo)
        payload: dict[str, object] = {"outcome": result.outcome.value, "head": result.head or repo.head}
        if result.outcome is RefreshOutcome.MOVED:
            payload["previous"] = repo.head
        if result.detail:
            payload["detail"] = result.detail
        if result.history:
            payload["history"] = HistoryState.PENDING.value
        event = NewEvent(EventType.REFRESHED, payload, job_id=job_id, dedupe_key=f"{job_id}:refreshed")
        patience = Patience(REGISTRY_PATIENCE * settings.db_busy_timeout)
        try:
            patience.retry(lambda: record(settings, registry, name, event, guard=_still(repo)), name)
        except StaleAttempt:
            return None  # prepared again or removed meanwhile: that attempt says what is shown
        level = logging.WARNING if result.outcome is RefreshOutcome.FAILED else logging.INFO
        log.log(level, "%s: refresh %s%s", name, result.outcome.value, f": {result.detail}" if result.detail else "")
        if result.history:  # the new commit is shown: now what is behind it
            guard = current_attempt(repo.attempt_version, PrepareState.READY)

            def record_history(history: dict[str, object]) -> None:
                event = NewEvent(EventType.HISTORY, history, job_id=job_id, dedupe_key=f"{job_id}:history:{history['state']}")
                patience.retry(lambda: record(settings, registry, name, event, guard=guard), name)

            try:
                complete_history(name, settings.repo_git_dir(repo), result.head or repo.head, git_dir_owner(repo), record_history)
            except StaleAttempt:
                pass  # prepared again or removed meanwhile: that attempt fetches its own
        return result


def _refresh(settings: Settings, repo: RepoState) -> RefreshResult:
    git_dir = settings.repo_git_dir(repo)
    owner = git_dir_owner(repo)
    source_ref = repo.fetch_ref or repo.ref
    env = git_env()
    shown = repo.head or ""
    try:
        head, history = call_as(owner, lambda: fetch_new_head(repo, git_dir, source_ref, env))
        at, changes = own_changes(settings, repo, git_dir)
        if head == shown and at == shown:
            return RefreshResult(RefreshOutcome.UNCHANGED, shown, history=history)
        verify_source(repo, git_dir, head, owner)
        if changes:
            return RefreshResult(RefreshOutcome.KEPT, shown, f"{head} not shown: {changes}", history)
        detached, work_tree = not repo.ref.startswith("refs/heads/"), Path(repo.mount_path)
        call_as(owner, lambda: advance(git_dir, detached, at, head, work_tree, env))
    except Exception as exc:  # every refresh ends in an event: the mount keeps its commit
        message = str(exc) if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {exc}"
        return RefreshResult(RefreshOutcome.FAILED, shown, redact(message))
    return RefreshResult(RefreshOutcome.MOVED, head, history=history)


def fetch_new_head(repo: RepoState, git_dir: Path, source_ref: str, env: dict[str, str]) -> tuple[str, bool]:
    """Fetch the ref's commit: one commit deep first, as a preparation does, its history behind it
    (history.py), unless the history must be here at once; and whether history is still to fetch."""
    def fetch(depth: int | None) -> str:
        return fetch_head(git_dir, repo.remote_url, source_ref, env, None, depth)

    if not defers_history(repo):
        return fetch(repo.depth), False
    # A depth-1 fetch of a commit that is here sends it again, with every tree of it, since the
    # repository is not shallow: an unchanged ref is told by the remote's advertisement alone.
    if repo.head is not None and validate_remote(repo.remote_url, source_ref, None) == repo.head:
        return repo.head, history_pending(git_dir)
    head, _ = one_commit_first(fetch, git_dir, repo.head)
    return head, history_pending(git_dir)


def _still(before: RepoState):  # type: ignore[no-untyped-def]
    """Append only while the repository is as the refresh found it: ready, the same attempt, the
    same head."""

    def guard(repo: RepoState | None) -> None:
        if (repo is None or repo.state is not PrepareState.READY or repo.attempt_version != before.attempt_version
                or repo.head != before.head):  # fmt: skip
            raise StaleAttempt("the repository changed while it was refreshed")

    return guard


def run_refresh_job(settings: Settings, name: str, job_id: str) -> RefreshResult | None:
    validate_name(name)  # before a lock file or a directory is derived from it
    with about(repo=name, job=job_id, phase="refresh"):
        registry = open_registry(settings.database_url, host=settings.host)
        try:
            return refresh_repo(settings, registry, name, job_id)
        finally:
            registry.close()
