"""Shared types: the states a repository goes through, the events that move it, and the errors
that name what went wrong. Every other module speaks in these terms."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


class PrepareState(str, enum.Enum):
    """Where a repository's preparation stands, as stored in the projection."""

    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


class HistoryState(str, enum.Enum):
    """Whether a ready repository's history (commits and trees) is all here (see history.py)."""

    PENDING = "pending"  # ready with one commit: the rest is still to fetch
    FETCHING = "fetching"  # a worker is fetching it
    COMPLETE = "complete"
    FAILED = "failed"  # its fetch failed: git in the mount still fetches it when it needs it


class BackfillPolicy(str, enum.Enum):
    """When a mount starts fetching, in the background, what is still missing (ARTIFACTFS_BACKFILL)."""

    USED = "used"  # at the first read that misses
    READY = "ready"  # as soon as the repository is ready
    NEVER = "never"


class BackfillState(str, enum.Enum):
    """Where a mount's backfill stands, as `status` shows it."""

    WAITING = "waiting"  # for the first read that misses
    RUNNING = "running"
    DONE = "done"  # every blob of the commit shown is here
    INCOMPLETE = "incomplete"  # it ended with blobs still missing (a fetch failed): the next start goes on
    OFF = "off"


class DisplayState(str, enum.Enum):
    """What `status` shows: READY splits into mounted and unmounted on this host."""

    PREPARING = "preparing"
    READY = "ready"  # ready on another host: whether it is mounted there cannot be seen from here
    MOUNTED = "mounted"
    UNMOUNTED = "unmounted"
    STALE = "stale"  # ready, but its mount answers "Transport endpoint is not connected"
    FAILED = "failed"


class EventType(str, enum.Enum):
    """Everything that can happen to a repository. The projection is a fold over these."""

    REGISTERED = "registered"  # name claimed: remote, ref, paths
    PREPARE_REQUESTED = "prepare_requested"  # a (new) attempt was asked for
    PHASE = "phase"  # a prepare phase started: validate, clone, fetch, ...
    READY = "ready"  # prepared: head commit known, git dir in place
    FAILED = "failed"  # preparation failed: redacted error
    HISTORY = "history"  # the background fetch of a ready repository's history: started, done, failed
    REFRESHED = "refreshed"  # the remote ref was fetched again: the outcome, the head before and after
    ADD_ABANDONED = "add_abandoned"  # a blocking add failed: the name is free again
    REMOVED = "removed"  # unregistered: the name is free again


class RefreshOutcome(str, enum.Enum):
    """How a periodic refresh (add-repo --refresh) ended."""

    MOVED = "moved"  # the ref had a new commit, and the mount shows it now
    UNCHANGED = "unchanged"  # the ref had no new commit
    KEPT = "kept"  # a new commit, not shown: the working tree has changes of its own
    FAILED = "failed"  # the fetch or a check failed: the mount keeps its commit


class Phase(str, enum.Enum):
    VALIDATE = "validate"
    CLONE = "clone"
    FETCH = "fetch"
    UPDATE_BRANCH = "update_branch"
    INDEX = "index"
    PUBLISH = "publish"
    HISTORY = "history"  # after ready: the rest of the history (history.py)


class ArtifactError(Exception):
    """Base of every error the CLI reports as a one-line message."""


class InvalidInput(ArtifactError):
    """A name, URL or option that can never work: the message says how to fix it."""


class UnknownRepo(ArtifactError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no repository named {name!r} is registered (see: artifactfs list-repos)")
        self.name = name


class DuplicateRepo(ArtifactError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"a repository named {name!r} is already registered "
            f"(pick another --name, or remove it first: artifactfs remove-repo --name {name})"
        )
        self.name = name


class ConcurrencyConflict(ArtifactError):
    """Another writer appended to the same stream first (optimistic concurrency)."""


class RegistryError(ArtifactError):
    """The registry cannot be used: corrupt, truncated, read-only, on a full disk. The message
    names the file or URL and what to do."""


class RegistryBusy(RegistryError):
    """Another writer held the registry for longer than the busy timeout, or the database server
    is unreachable: worth retrying later (jobs do; the CLI reports it)."""


class RepoNotReady(ArtifactError):
    """The repository has no git directory to work on yet (still preparing, or its preparation
    failed)."""


class PrepareFailed(ArtifactError):
    """A preparation this command waited for ended in `failed`: the message holds its error."""


class PrepareTimeout(ArtifactError):
    """A prepare job ran past its time limit."""


class MountRefused(InvalidInput):
    """A mount path that artifactfs must never mount on (outside the allowed mount roots, inside
    another repository's mount, a file, read-only, missing)."""


class GitError(ArtifactError):
    """A git command failed. `transient` marks failures worth retrying (network hiccups)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class RemoteUnreachable(GitError):
    pass


class RefNotFound(GitError):
    pass


class SourceUnverified(GitError):
    """The fetched ref does not contain the commit the registration requires (--require-commit)."""


class BlobFetchFailed(GitError):
    pass


class ObjectMissing(GitError):
    """An object the commit shown needs is not in (or cannot be read from) the local git dir."""

    @classmethod
    def of(cls, oid: str) -> ObjectMissing:
        return cls(f"object {oid} is missing from the local git directory")


# --- records ----------------------------------------------------------------------------------
# Plain dataclasses, so that reading and appending need no ORM import (the CLI's lean path); the
# SQLModel tables in tables.py have exactly these columns.


@dataclass(frozen=True)
class Owner:
    """A user of this host whom a repository's mounted files and git directory belong to."""

    name: str
    uid: int
    gid: int


@dataclass
class RepoState:
    """A row of the `repos` projection: a repository's current state, folded from its events."""

    name: str
    remote_url: str  # never holds credentials
    ref: str
    mount_path: str
    git_dir: str
    # The host whose mountd mounts it and whose worker prepares it (add-repo --host). Names are
    # unique per host: the same repository may be registered on many hosts.
    host: str = ""
    fetch_ref: str | None = None
    prepared_gitdir: bool = False
    asynchronous: bool = False
    prepare_state: str = PrepareState.PREPARING.value
    prepare_phase: str | None = None
    prepare_error: str | None = None
    prepare_attempt: int = 1
    attempt_started_at: datetime | None = None  # for the overall prepare deadline
    # The stream version of the event that began the current attempt: unique for ever within the
    # stream, even when a removed name is registered again and counts attempts from 1 anew. Jobs,
    # their ids and dedupe keys are keyed on it.
    attempt_version: int = 0
    head: str | None = None
    # The user the mounted files and the git directory belong to (add-repo --owner); None: root.
    owner_uid: int | None = None
    owner_gid: int | None = None
    # The partial-clone filter of the clone (add-repo --filter): blob:none, or blob:limit=SIZE.
    blob_filter: str = "blob:none"
    # The remote ignored the filter (uploadpack.allowFilter=false): the clone is a full one, and
    # no promisor remote is configured.
    filter_fallback: bool = False
    # Verified sources (add-repo --require-commit, --depth, --refresh).
    require_commit: str | None = None  # a full commit id the fetched ref must contain
    depth: int | None = None  # a shallow clone of this many commits; None: the whole history
    refresh_seconds: float | None = None  # fetch the ref again this often; None: never
    refreshed_at: datetime | None = None
    refresh_outcome: str | None = None  # model.RefreshOutcome of the last refresh
    # The history behind the commit shown (model.HistoryState): ready in one commit's time, the
    # rest fetched after; when it was published ready, and how long the rest took.
    history: str = HistoryState.COMPLETE.value
    ready_at: datetime | None = None
    history_seconds: float | None = None
    version: int = 0  # the last stream version folded into this row
    registered_at: datetime = field(default_factory=lambda: utcnow())
    updated_at: datetime = field(default_factory=lambda: utcnow())

    @property
    def state(self) -> PrepareState:
        return PrepareState(self.prepare_state)


@dataclass
class EventRecord:
    """One entry of the append-only log."""

    stream: str  # the repository's name
    version: int  # 1, 2, 3, ... within the stream of (host, name)
    type: str
    payload: dict[str, Any]
    created_at: datetime
    job_id: str | None = None
    dedupe_key: str | None = None  # set by jobs that may run twice: a second append is a no-op
    id: int | None = None  # global position in the log, assigned on append
    host: str = ""  # a stream is a repository name on one host

    @property
    def kind(self) -> EventType:
        return EventType(self.type)


@dataclass
class NewEvent:
    """An event a command decides to append; the registry gives it a version and a position."""

    type: EventType
    payload: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    dedupe_key: str | None = None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class StaleAttempt(ArtifactError):
    """A newer preparation attempt (or a removal) superseded the one this job was running."""
