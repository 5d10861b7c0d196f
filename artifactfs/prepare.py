"""Preparation: the phases that turn a registration into a git directory the mount can show.

validate (the remote answers and has the ref) -> clone (blobless, into a temporary directory,
renamed into place) or fetch + update_branch (into an existing or someone else's prepared git
directory) -> index (read-tree: trees only, no blobs) -> publish (the READY event, with the head).

Each phase is an event, so `status` and `events` show progress while a preparation runs. Events
carry the job id and a dedupe key, so a redelivered job appends nothing twice. The same code runs
for a blocking `add-repo` and inside a worker's prepare job; callers hold the repository's lock.
"""
from __future__ import annotations

import glob
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .gitstore import clone_blobless, git_env, run_git
from .model import (
    EventType,
    InvalidInput,
    NewEvent,
    Phase,
    PrepareState,
    RefNotFound,
    RemoteUnreachable,
    RepoState,
    StaleAttempt,
)
from .registry import Registry
from .remotes import redact
from .wakeup import publish


def announce(settings: Settings, name: str) -> None:
    """Wake whoever follows the log (mountd); losing this message only delays them."""
    publish(settings.wakeup_url, name)


Guard = Callable[[RepoState | None], None]


def current_attempt(attempt_version: int) -> Guard:
    """Refuse to append for an attempt that a newer one (or a removal) has superseded."""

    def guard(repo: RepoState | None) -> None:
        if repo is None or repo.attempt_version != attempt_version or repo.state is not PrepareState.PREPARING:
            raise StaleAttempt("this preparation attempt was superseded (a newer attempt, or a removal)")

    return guard


def record(settings: Settings, registry: Registry, name: str, *events: NewEvent, guard: Guard | None = None) -> None:
    """Append events (after `guard` approved the current state) and wake mountd."""

    def decide(repo: RepoState | None) -> list[NewEvent]:
        if guard is not None:
            guard(repo)
        return list(events)

    registry.append(name, decide)
    announce(settings, name)


def fail_attempt(
    settings: Settings, registry: Registry, repo: RepoState, error: str, *, dedupe_key: str, job_id: str | None = None
) -> bool:
    """Record that `repo`'s current attempt failed (a redacted error); False if it was superseded."""
    try:
        record(
            settings, registry, repo.name,
            NewEvent(EventType.FAILED, {"error": redact(error)}, job_id=job_id, dedupe_key=dedupe_key),
            guard=current_attempt(repo.attempt_version),
        )  # fmt: skip
    except StaleAttempt:
        return False
    return True


def validate_remote(remote_url: str, ref: str, credential_file: Path | None) -> str:
    """Name an unreachable remote or a missing ref plainly, before any clone starts."""
    try:
        out = run_git(["ls-remote", "--", remote_url, ref], env=git_env(credential_file)).stdout.decode()
    except RemoteUnreachable as exc:
        raise RemoteUnreachable(
            f"cannot read remote {remote_url}: {exc} (check the URL, the network and your access rights)",
            transient=exc.transient,
        ) from None
    for line in out.splitlines():
        oid, _, name = line.partition("\t")
        if name == ref:
            return oid
    raise RefNotFound(f"ref {ref} does not exist in {remote_url} (see: git ls-remote {remote_url})")


def write_index(git_dir: Path, head: str) -> None:
    """An index of the commit's tree, every entry marked assume-unchanged.

    read-tree needs only trees, which a blobless clone has. The index holds no stat data that
    matches the mount, so git would stat and hash every tracked file, downloading the whole
    repository for one `git status`. The mounted tree is read-only: no tracked file can change,
    so telling git to trust the index is true (whatever makes the tree writable must clear the
    bit for what it changes).
    """
    run_git(["read-tree", head], git_dir=git_dir)
    # The preloading threads lstat every entry, assume-unchanged or not: turn them off.
    run_git(["config", "core.preloadIndex", "false"], git_dir=git_dir)
    paths = run_git(["ls-files", "-z"], git_dir=git_dir).stdout
    if paths:
        # update-index wants a work tree; it only flips index bits and looks at no file.
        run_git([f"--work-tree={git_dir}", "update-index", "-z", "--assume-unchanged", "--stdin"],
                git_dir=git_dir, input=paths)  # fmt: skip


def check_git_dir(path: Path) -> None:
    """A prepared git directory must exist and be a git directory (not a work tree)."""
    if not (path / "HEAD").is_file() or not (path / "objects").is_dir():
        raise InvalidInput(f"{path} is not a git directory (expected HEAD and objects/ inside it)")


@dataclass
class Preparation:
    settings: Settings
    registry: Registry
    repo: RepoState
    job_id: str
    credential_file: Path | None = None

    def phase(self, phase: Phase) -> None:
        record(
            self.settings, self.registry, self.repo.name,
            NewEvent(EventType.PHASE, {"phase": phase.value}, job_id=self.job_id, dedupe_key=f"{self.job_id}:{phase.value}"),
            guard=current_attempt(self.repo.attempt_version),
        )  # fmt: skip

    def run(self) -> str:
        """Run every phase; return the head commit now published as READY."""
        repo = self.repo
        git_dir = self.settings.repo_git_dir(repo)
        source_ref = repo.fetch_ref or repo.ref
        self.phase(Phase.VALIDATE)
        validate_remote(repo.remote_url, source_ref, self.credential_file)
        if repo.prepared_gitdir:
            check_git_dir(git_dir)
            head = self._fetch(git_dir, source_ref)
        elif (git_dir / "HEAD").is_file():
            head = self._fetch(git_dir, source_ref)  # a retry or refresh: the clone is there
        else:
            self._discard_temporaries()
            self.phase(Phase.CLONE)
            head = clone_blobless(
                repo.remote_url, repo.ref, git_dir, self.settings.tmp_root, credential_file=self.credential_file
            ).head
        self.phase(Phase.INDEX)
        write_index(git_dir, head)
        self.phase(Phase.PUBLISH)
        record(
            self.settings, self.registry, repo.name,
            NewEvent(EventType.READY, {"head": head}, job_id=self.job_id, dedupe_key=f"{self.job_id}:ready"),
            guard=current_attempt(self.repo.attempt_version),
        )  # fmt: skip
        return head

    def _fetch(self, git_dir: Path, source_ref: str) -> str:
        repo = self.repo
        self.phase(Phase.FETCH)
        env = git_env(self.credential_file)
        promisor = run_git(["config", "--get", "remote.origin.promisor"], git_dir=git_dir, env=env, check=False)
        # Keep a partial clone partial: fetch through its promisor remote, without blobs.
        options, source = (["--filter=blob:none"], "origin") if promisor.stdout.strip() == b"true" else ([], repo.remote_url)
        run_git(["fetch", "--quiet", "--no-tags", "--recurse-submodules=no", *options, "--", source, source_ref], git_dir=git_dir, env=env)
        head = run_git(["rev-parse", "--verify", "FETCH_HEAD^{commit}"], git_dir=git_dir).stdout.decode().strip()
        self.phase(Phase.UPDATE_BRANCH)
        run_git(["update-ref", repo.ref, head], git_dir=git_dir)
        if repo.ref.startswith("refs/heads/"):
            run_git(["symbolic-ref", "HEAD", repo.ref], git_dir=git_dir)
        else:
            run_git(["update-ref", "--no-deref", "HEAD", head], git_dir=git_dir)
        return head

    def _discard_temporaries(self) -> None:
        """Temporary clones of this repository left by a killed attempt (we hold its lock)."""
        for path in glob.glob(str(self.settings.tmp_root / f"{glob.escape(self.settings.git_dir(self.repo.name).name)}.*")):
            shutil.rmtree(path, ignore_errors=True)
