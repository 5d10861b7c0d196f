"""The lifecycle of a registered repository: add (prepare), remove, and what status shows."""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .attempts import announce, fail_attempt, record
from .config import Settings
from .gitstore import check_git_dir, configure_credential_helper, hydration_stats, store_credentials
from .history import lazy_fetches
from .locks import repo_lock
from .model import (
    DisplayState,
    DuplicateRepo,
    EventType,
    InvalidInput,
    MountRefused,
    NewEvent,
    Owner,
    PrepareFailed,
    PrepareState,
    RepoState,
    StaleAttempt,
    UnknownRepo,
)
from .mounts import check_mount_path, fuse_mounts, is_mounted, is_stale, resolve_outside, unmount, under
from .owners import lookup_owner
from .progress import Note, Report
from .progress import channel as progress_channel
from .progress import parse as parse_note
from .registry import Registry
from .remotes import (
    DEFAULT_FILTER,
    Remote,
    parse_remote,
    redact,
    validate_commit_id,
    validate_depth,
    validate_filter,
    validate_name,
    validate_ref,
    validate_refresh,
)
from .stack import running_pid

# How long remove-repo waits for mountd to take the mount down before doing it itself.
UNMOUNT_GRACE_SECONDS = 10.0
# A blocking add for another host follows the log this often, and gives up this long after the
# prepare deadline (which that host's mountd enforces, if it runs).
OUTCOME_POLL_SECONDS = 0.2
OUTCOME_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class AddRequest:
    name: str
    remote: Remote
    ref: str
    mount_path: Path
    git_dir: Path
    prepared_gitdir: bool = False  # someone else's git directory: fetch into it, never delete it
    fetch_ref: str | None = None  # what to fetch from the remote into `ref`, if not `ref` itself
    owner: Owner | None = None  # whose the mounted files and the git directory are (default: root's)
    blob_filter: str = DEFAULT_FILTER  # the clone's partial-clone filter
    elsewhere: bool = False  # registered for another host of the fleet: its mountd and worker do the rest
    require_commit: str | None = None  # a commit the fetched ref must contain (verified source)
    depth: int | None = None  # a shallow clone of this many commits
    refresh_seconds: float | None = None  # fetch the ref again this often (None: never)


def parse_add_request(
    settings: Settings,
    registry: Registry,
    name: str,
    remote: str,
    ref: str,
    mount_root: str | None,
    *,
    prepared_gitdir: bool = False,
    git_dir: str | None = None,
    fetch_ref: str | None = None,
    owner: str | None = None,
    blob_filter: str | None = None,
    require_commit: str | None = None,
    depth: str | None = None,
    refresh: str | None = None,
) -> AddRequest:
    """Validate everything a user typed before anything is written. The repository is registered
    for `registry.host`: another host than this one gets what can be checked from here alone."""
    validate_name(name)
    parsed = parse_remote(remote)
    elsewhere = registry.host != settings.host
    if elsewhere:
        _refuse_for_another_host(registry.host, prepared_gitdir=prepared_gitdir, owner=owner,
                                 credentials=parsed.has_credentials)  # fmt: skip
    full_ref = validate_ref(ref)
    checked_filter = validate_filter(blob_filter) if blob_filter is not None else DEFAULT_FILTER
    if blob_filter is not None and prepared_gitdir:
        raise InvalidInput("--filter does not go with --prepared-gitdir: that git directory keeps the filter it was cloned with")
    required = validate_commit_id(require_commit) if require_commit is not None else None
    checked_depth = validate_depth(depth) if depth is not None else None
    if checked_depth is not None and prepared_gitdir:
        raise InvalidInput("--depth does not go with --prepared-gitdir: that git directory keeps the history it has")
    refresh_seconds = validate_refresh(refresh) if refresh is not None else None
    if refresh_seconds is not None and parsed.has_credentials:
        raise InvalidInput("--refresh does not go with credentials in the remote URL: refreshes are background jobs, "
                           "which never hold them (configure a credential helper for the worker instead)")  # fmt: skip
    who = lookup_owner(owner) if owner is not None else None
    if who is not None and prepared_gitdir:
        raise InvalidInput("--owner does not go with --prepared-gitdir: that git directory already has an owner")
    if who is not None and parsed.has_credentials:
        # Their git fetches (as them): it could not read a root-only credential, and must not.
        raise InvalidInput("--owner does not go with credentials in the remote URL: give the owner their own "
                           "credential helper, or use a remote that needs none")  # fmt: skip
    if prepared_gitdir:
        if not git_dir or not fetch_ref:
            raise InvalidInput("--prepared-gitdir needs --git-dir DIR and --fetch-ref REF")
        directory = Path(git_dir).expanduser().absolute()
        check_git_dir(directory)
        fetch_ref = validate_ref(fetch_ref)
    elif git_dir or fetch_ref:
        raise InvalidInput("--git-dir and --fetch-ref only go with --prepared-gitdir")
    else:
        directory = settings.git_dir(name)
    if registry.get(name) is not None:
        raise DuplicateRepo(name)  # said before anything about its mount path (registering checks again)
    if elsewhere:
        mount_path = mount_path_elsewhere(settings, registry, name, mount_root)
    else:
        mount_path = checked_mount_path(settings, registry, name, mount_root)
    return AddRequest(
        name=name, remote=parsed, ref=full_ref, mount_path=mount_path, git_dir=directory,
        prepared_gitdir=prepared_gitdir, fetch_ref=fetch_ref, owner=who, blob_filter=checked_filter, elsewhere=elsewhere,
        require_commit=required, depth=checked_depth, refresh_seconds=refresh_seconds,
    )  # fmt: skip


def _refuse_for_another_host(host: str, *, prepared_gitdir: bool, owner: str | None, credentials: bool) -> None:
    """What only the host itself can check or hold: its git directories, its users, a credential
    (which only the command that registers a repository may hold, never a job)."""
    here = f"run add-repo on {host} itself"
    if prepared_gitdir:
        raise InvalidInput(f"--prepared-gitdir names a git directory of this host, not of {host}: {here}")
    if owner is not None:
        raise InvalidInput(f"--owner names a user of this host, not of {host}: {here}")
    if credentials:
        raise InvalidInput(
            f"inline credentials cannot reach {host} (a background job must never hold them): configure a git "
            f"credential helper or an ssh key for {host}'s worker and give the URL without them, or {here}"
        )


def mount_path_elsewhere(settings: Settings, registry: Registry, name: str, mount_root: str | None) -> Path:
    """Where repository `name` will be mounted on another host: <mount root>/<name>, checked by its
    name alone against the allowed mount roots and that host's mounts (the host's mountd checks
    the file system when it mounts, and refuses what it cannot mount on)."""
    root = Path(os.path.abspath(os.path.expanduser(mount_root))) if mount_root else settings.mount_root
    path = root / name
    if not any(under(root, allowed) for allowed in settings.mount_roots):
        allowed = ":".join(str(r) for r in settings.mount_roots)
        raise MountRefused(f"mount path {path} is outside the allowed mount roots ({allowed}): choose a --mount-root "
                           "under one of them, or add it to ARTIFACTFS_ALLOWED_MOUNT_ROOTS")  # fmt: skip
    _refuse_nested(root, path, [], {Path(repo.mount_path): repo.name for repo in registry.repos()})
    return path


def checked_mount_path(settings: Settings, registry: Registry, name: str, mount_root: str | None) -> Path:
    """Where repository `name` will be mounted: <mount root>/<name>, refused unless mountd can
    mount there for good (an existing, writable directory under an allowed mount root, outside
    every repository's mount and every FUSE mount, with nothing at the mount point yet).

    Nothing inside a FUSE mount is looked at: in a repository's gated placeholder, even a stat
    waits until that repository is ready. Symbolic links are followed by hand for that reason.
    """
    root = Path(os.path.abspath(os.path.expanduser(mount_root))) if mount_root else settings.mount_root
    fuse = [Path(p) for p in fuse_mounts()]
    mounts = {Path(repo.mount_path): repo.name for repo in registry.repos()}
    _refuse_nested(root, root / name, fuse, mounts)
    resolved = _resolve_mount_root(root, fuse, mounts)
    _refuse_nested(resolved, resolved / name, fuse, mounts)
    if not resolved.is_dir():
        raise MountRefused(f"--mount-root {root} is not a directory: give a directory to mount under")
    if not os.access(resolved, os.W_OK):
        raise MountRefused(f"--mount-root {root} is read-only: give a writable directory to mount under")
    path = check_mount_path(settings, name, resolved / name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode) or any(path.iterdir()):
        raise MountRefused(
            f"{path} already exists and is not an empty directory: move it away, or pick another --name or --mount-root"
        )
    return path


def _refuse_nested(root: Path, mount_path: Path, fuse: list[Path], mounts: dict[Path, str]) -> None:
    """Refuse a mount root inside a repository's mount or any FUSE mount, and a mount path that
    would cover one (both by their names alone: nothing here touches the file system)."""
    for existing, other in mounts.items():
        if under(root, existing):
            raise MountRefused(
                f"--mount-root {root} is inside the mount of repository {other!r} ({existing}): "
                "give a directory outside every repository's mount"
            )
        if under(existing, mount_path):
            raise MountRefused(f"{mount_path} would cover the mount of repository {other!r} ({existing})")
    for mount in fuse:
        if under(root, mount):
            raise MountRefused(
                f"--mount-root {root} is inside the FUSE mount {mount}: give a directory outside every FUSE mount"
            )
        if under(mount, mount_path):
            raise MountRefused(
                f"{mount_path} already holds the FUSE mount {mount}: unmount it (fusermount3 -u {mount}) "
                "or pick another --name or --mount-root"
            )


def _resolve_mount_root(root: Path, fuse: list[Path], mounts: dict[Path, str]) -> Path:
    """The mount root with symbolic links resolved, refused if it is missing, a file, or leads
    into a FUSE mount or a repository's mount (through a symbolic link, say)."""

    def enclosing(path: Path) -> str | None:
        other = next((name for existing, name in mounts.items() if under(path, existing)), None)
        if other is not None:
            return f"the mount of repository {other!r}"
        inside = next((m for m in fuse if under(path, m)), None)
        return None if inside is None else f"the FUSE mount {inside}"

    try:
        return resolve_outside(root, enclosing, strict=True)
    except FileNotFoundError as exc:
        raise MountRefused(f"--mount-root {root} does not exist ({exc.filename} is missing): create it first") from None
    except NotADirectoryError as exc:
        raise MountRefused(f"--mount-root {root} is not a directory ({Path(exc.filename).parent} is a file)") from None


def registration(req: AddRequest, *, asynchronous: bool, job_id: str | None) -> NewEvent:
    return NewEvent(
        EventType.REGISTERED,
        {
            "remote_url": req.remote.url,
            "ref": req.ref,
            "fetch_ref": req.fetch_ref,
            "mount_path": str(req.mount_path),
            "git_dir": str(req.git_dir),
            "prepared_gitdir": req.prepared_gitdir,
            "asynchronous": asynchronous,
            "attempt": 1,
            "filter": req.blob_filter,
            **({"require_commit": req.require_commit} if req.require_commit is not None else {}),
            **({"depth": req.depth} if req.depth is not None else {}),
            **({"refresh_seconds": req.refresh_seconds} if req.refresh_seconds is not None else {}),
            **({"owner_uid": req.owner.uid, "owner_gid": req.owner.gid} if req.owner is not None else {}),
        },
        job_id=job_id,
    )


def register(settings: Settings, registry: Registry, req: AddRequest, *, asynchronous: bool, job_id: str | None) -> None:
    """Claim the name in the log (refused if taken) and clear what an earlier owner left behind."""

    def decide(repo: RepoState | None) -> list[NewEvent]:
        if repo is not None:
            raise DuplicateRepo(req.name)
        return [registration(req, asynchronous=asynchronous, job_id=job_id)]

    [event] = registry.append(req.name, decide)
    if not req.elsewhere:
        discard_leftovers(settings, req.name)
        _mark_registration(settings, req.name, event.created_at)
    # For another host, its mountd or its worker, whichever comes first, discards what an earlier
    # registration of the name left there (forget_earlier_registration).


def add_repo(settings: Settings, registry: Registry, req: AddRequest, report: Report | None = None) -> RepoState:
    """The blocking add: register, clone, and return once the repository is ready.

    On any failure (or Ctrl-C) the clone is removed and an ADD_ABANDONED event frees the name, so
    nothing is left behind but the record of the attempt in the log. For another host, its worker
    prepares it while this command follows the log (add_elsewhere).
    """
    if req.elsewhere:
        return add_elsewhere(settings, registry, req, report)
    settings.ensure_dirs()
    job_id = f"add:{req.name}:{uuid.uuid4().hex[:12]}"
    with repo_lock(settings.lock_file(req.name)):
        register(settings, registry, req, asynchronous=False, job_id=job_id)
        credential_file = settings.credential_file(req.name) if req.remote.has_credentials else None
        try:
            if credential_file is not None:
                store_credentials(req.remote, credential_file)
            from .prepare import Preparation  # git, libgit2 and the metrics: only where one runs here

            Preparation(settings, registry, registry.require(req.name), job_id, credential_file, report=report).run()
        except StaleAttempt:
            raise  # `prepare` handed it to a worker meanwhile: the registration is the worker's now
        except BaseException as exc:
            discard_leftovers(settings, req.name)
            error = redact(str(exc)) or type(exc).__name__
            record(settings, registry, req.name, NewEvent(EventType.ADD_ABANDONED, {"error": error}, job_id=job_id))
            raise
    return registry.require(req.name)


def add_repo_async(settings: Settings, registry: Registry, req: AddRequest) -> None:
    """Register and return at once; mountd mounts a gated placeholder and a worker prepares it."""
    if req.remote.has_credentials:
        raise InvalidInput(
            "inline credentials are refused with --async (a background job must never hold them): "
            "configure a git credential helper or an ssh key for the worker and give the URL without them"
        )
    settings.ensure_dirs()
    if req.elsewhere:
        register(settings, registry, req, asynchronous=True, job_id=None)  # the lock is the other host's
        announce(settings, req.name)
        return
    with repo_lock(settings.lock_file(req.name)):
        register(settings, registry, req, asynchronous=True, job_id=None)
    announce(settings, req.name)
    wait_for_placeholder(settings, req.mount_path)


def add_elsewhere(settings: Settings, registry: Registry, req: AddRequest, report: Report | None = None) -> RepoState:
    """The blocking add for another host: register it there, then follow the log until that host's
    worker has prepared it. If it fails, or the wait is interrupted or outlives the prepare
    deadline, the name is freed again (ADD_ABANDONED): the other host's job finds its attempt
    superseded and discards what it made, and its mountd takes the placeholder down."""
    add_repo_async(settings, registry, req)
    try:
        return follow_attempt(settings, registry, req.name, registry.require(req.name).attempt_version, report)
    except BaseException as exc:
        error = redact(str(exc)) or type(exc).__name__
        record(settings, registry, req.name, NewEvent(EventType.ADD_ABANDONED, {"error": error}))
        raise


def on_host(settings: Settings, host: str) -> str:
    """' on H' when a command acts on another host than this one."""
    return "" if host == settings.host else f" on {host}"


def follow_attempt(settings: Settings, registry: Registry, name: str, attempt_version: int,
                   report: Report | None = None) -> RepoState:  # fmt: skip
    """Wait until the attempt begun at `attempt_version` (run by a worker, maybe another host's)
    ends: the repository, ready; PrepareFailed if it failed, or outlived the prepare deadline.
    Its phases come from the log, git's percentages from the job's progress channel."""
    where = on_host(settings, registry.host)
    deadline = time.monotonic() + settings.prepare_deadline + OUTCOME_GRACE_SECONDS
    phases = _LoggedPhases(registry, name, attempt_version, report)
    with _progress_channel(settings, registry.host, name) as listen:
        while True:
            phases.show_all()
            repo = registry.require(name)
            if repo.attempt_version != attempt_version:
                raise PrepareFailed(f"the attempt to prepare {name}{where} was superseded by another (see: artifactfs events --name {name})")
            if repo.state is PrepareState.READY:
                return repo
            if repo.state is PrepareState.FAILED:
                raise PrepareFailed(f"preparing {name}{where} failed: {repo.prepare_error}")
            if time.monotonic() > deadline:
                raise PrepareFailed(
                    f"{registry.host} did not prepare {name} within {settings.prepare_deadline:g}s "
                    f"(ARTIFACTFS_PREPARE_DEADLINE): are its mountd and worker running? (artifactfs up on {registry.host})"
                )
            for note in listen(attempt_version, OUTCOME_POLL_SECONDS):
                if report is not None and note.stage is not None and phases.show_until(note.phase):
                    report(note)  # under the phase it belongs to, in the log's order


class _LoggedPhases:
    """The phases of one attempt, from the log, shown in the log's order. A note of git's may
    arrive after the log has moved past its phase (notes are read in batches): the phases up to
    the note's are shown first, the later ones stay queued until the note has been shown."""

    def __init__(self, registry: Registry, name: str, attempt_version: int, report: Report | None) -> None:
        self.registry, self.name, self.attempt_version, self.report = registry, name, attempt_version, report
        self.position = 0
        self.current: str | None = None
        self.queued: list[str] = []

    def _read(self) -> None:
        for event in self.registry.events(self.name, after=self.position):
            self.position = event.id
            if event.type == EventType.PHASE.value and event.version > self.attempt_version:
                self.queued.append(str(event.payload.get("phase")))

    def _show_next(self) -> None:
        self.current = self.queued.pop(0)
        if self.report is not None:
            self.report(Note(self.current))

    def show_all(self) -> None:
        self._read()
        while self.queued:
            self._show_next()

    def show_until(self, phase: str | None) -> bool:
        """Show the queued phases up to `phase`; whether `phase` is now the one shown."""
        if phase != self.current and phase not in self.queued:
            self._read()
        if phase in self.queued:
            while self.current != phase:
                self._show_next()
        return phase == self.current


@contextmanager
def _progress_channel(settings: Settings, host: str, name: str) -> Iterator[Callable[[int, float], list[Note]]]:
    """listen(attempt_version, seconds): the Notes the job published within `seconds` (an empty
    list, after sleeping, when Redis cannot be reached: the log alone still tells the outcome)."""
    try:
        import redis

        client = redis.Redis.from_url(settings.wakeup_url, socket_timeout=5, socket_connect_timeout=2)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(progress_channel(host, name))
    except Exception:  # no broker here, or not ours: phases only
        pubsub = None

    def listen(attempt_version: int, seconds: float) -> list[Note]:
        if pubsub is None:
            time.sleep(seconds)
            return []
        notes, until = [], time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            try:
                message = pubsub.get_message(timeout=left)
            except Exception:
                time.sleep(max(until - time.monotonic(), 0))
                break
            if message is not None and (note := parse_note(message["data"], attempt_version)) is not None:
                notes.append(note)
        return notes

    try:
        yield listen
    finally:
        if pubsub is not None:
            with suppress(Exception):
                pubsub.close()


def wait_for_placeholder(settings: Settings, mount_path: Path) -> bool:
    """With mountd running, return once it has mounted the gated placeholder (milliseconds, from
    its warm spare), so a sandbox started right after `add-repo --async` finds the mount there."""
    if running_pid(settings, "mountd") is None:
        return False
    deadline = time.monotonic() + settings.placeholder_wait
    while time.monotonic() < deadline:
        if is_mounted(mount_path):
            return True
        time.sleep(0.005)
    return False


@dataclass(frozen=True)
class PrepareRequest:
    attempt: int
    version: int  # of the event that began it: what names the attempt (follow_attempt)
    head: str | None = None  # set when the attempt ran here: the commit now published as READY


def request_prepare(settings: Settings, registry: Registry, name: str, report: Report | None = None) -> PrepareRequest:
    """Ask for a new preparation attempt (after a failure, or to refresh).

    A worker prepares it; a repository registered with inline credentials is prepared here, in
    the calling process, as the blocking add does: no background job may ever hold a credential.
    """
    validate_name(name)
    if registry.host == settings.host and settings.credential_file(name).exists():
        return _prepare_here(settings, registry, name, report)

    def decide(repo: RepoState | None) -> list[NewEvent]:
        if repo is None:
            raise UnknownRepo(name)
        return [NewEvent(EventType.PREPARE_REQUESTED, {"attempt": repo.prepare_attempt + 1})]

    [event] = registry.append(name, decide)
    announce(settings, name)
    return PrepareRequest(int(event.payload["attempt"]), event.version)


def _prepare_here(settings: Settings, registry: Registry, name: str, report: Report | None) -> PrepareRequest:
    job_id = f"prepare:{name}:local-{uuid.uuid4().hex[:12]}"

    def decide(repo: RepoState | None) -> list[NewEvent]:
        if repo is None:
            raise UnknownRepo(name)
        payload = {"attempt": repo.prepare_attempt + 1, "asynchronous": False}
        return [NewEvent(EventType.PREPARE_REQUESTED, payload, job_id=job_id)]

    with repo_lock(settings.lock_file(name)):
        [event] = registry.append(name, decide)
        announce(settings, name)
        repo = registry.require(name)
        credential_file = settings.credential_file(name)
        try:
            if repo.owner_uid is None and (settings.repo_git_dir(repo) / "HEAD").is_file():
                # A clone made by an older version asks git's store helper, which forgets the
                # credential at the first 401: ask ours instead.
                configure_credential_helper(settings.repo_git_dir(repo), credential_file)
            from .prepare import Preparation

            head = Preparation(settings, registry, repo, job_id, credential_file, report=report).run()
        except StaleAttempt:
            raise
        except BaseException as exc:
            error = redact(str(exc)) or type(exc).__name__
            fail_attempt(settings, registry, repo, error, job_id=job_id, dedupe_key=f"{job_id}:failed")
            raise
    return PrepareRequest(int(event.payload["attempt"]), event.version, head)


def _mark_registration(settings: Settings, name: str, registered_at: datetime) -> None:
    """Record, in the repository's state directory, which registration its state belongs to."""
    mark = settings.registration_mark(name)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(_registration_id(registered_at))


def _registration_id(registered_at: datetime) -> str:
    return registered_at.astimezone(timezone.utc).isoformat()


def nothing_to_forget(settings: Settings, repo: RepoState) -> bool:
    """Whether forget_earlier_registration would discard nothing here: the state is marked as
    `repo`'s registration's, or has no mark (kept as this one's)."""
    try:
        return settings.registration_mark(repo.name).read_text() == _registration_id(repo.registered_at)
    except FileNotFoundError:
        return True


def forget_earlier_registration(settings: Settings, repo: RepoState) -> bool:
    """Before this host first mounts or prepares `repo`, discard the git directory, overlay and
    state that an earlier registration of its name left here: a registration made from another
    host, after a removal made from another host, finds them still here. The caller holds the
    repository's lock. State with no mark (made before marks existed) is kept: it is this one's.
    Returns whether something was discarded."""
    mark = settings.registration_mark(repo.name)
    try:
        recorded = mark.read_text()
    except FileNotFoundError:
        recorded = None
    if recorded == _registration_id(repo.registered_at):
        return False
    if recorded is not None:
        discard_leftovers(settings, repo.name)
    _mark_registration(settings, repo.name, repo.registered_at)
    return recorded is not None


def discard_leftovers(settings: Settings, name: str) -> None:
    """Remove the git dir, credentials and state of an unregistered or abandoned name (never a
    prepared git dir: those live elsewhere and belong to whoever made them)."""
    shutil.rmtree(settings.git_dir(name), ignore_errors=True)
    shutil.rmtree(settings.repo_state_dir(name), ignore_errors=True)
    settings.credential_file(name).unlink(missing_ok=True)


def remove_repo(settings: Settings, registry: Registry, name: str) -> None:
    """Unregister a repository, take its mount down and delete its state. Another host's is
    unregistered here, and its own mountd takes the mount down and deletes the state there."""
    validate_name(name)
    if registry.host != settings.host:
        registry.append(name, lambda current: _removal(current, name))
        announce(settings, name)
        return
    # A running prepare job holds the lock for as long as its clone takes; removal does not wait
    # for it: the job finds its attempt superseded at its next phase and discards what it made.
    with repo_lock(settings.lock_file(name), blocking=False):
        repo = registry.get(name)
        if repo is None:
            raise UnknownRepo(name)
        registry.append(name, lambda current: _removal(current, name))
        announce(settings, name)
        try:
            mount_path: Path | None = check_mount_path(settings, name, repo.mount_path)
        except MountRefused:
            mount_path = None  # not a path artifactfs mounts on (the mount roots changed): leave it alone
        if mount_path is not None:
            # mountd sees the removal and unmounts; if it does not (not running), do it here.
            deadline = time.monotonic() + UNMOUNT_GRACE_SECONDS
            while is_mounted(mount_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            if is_mounted(mount_path) and not unmount(mount_path):
                unmount(mount_path, lazy=True)
        discard_leftovers(settings, name)  # never a prepared git dir: it belongs to whoever made it
        if mount_path is not None and not is_mounted(mount_path):
            try:
                mount_path.rmdir()  # the mount point mountd made, if empty
            except OSError:
                pass  # not empty, or gone already: leave it


def _removal(current: RepoState | None, name: str) -> list[NewEvent]:
    if current is None:
        raise UnknownRepo(name)
    return [NewEvent(EventType.REMOVED, {})]


def display_state(settings: Settings, repo: RepoState) -> DisplayState:
    state = repo.state
    if state is PrepareState.PREPARING:
        return DisplayState.PREPARING
    if state is PrepareState.FAILED:
        return DisplayState.FAILED
    if repo.host != settings.host:
        return DisplayState.READY
    if not is_mounted(repo.mount_path):
        return DisplayState.UNMOUNTED
    return DisplayState.STALE if is_stale(repo.mount_path) else DisplayState.MOUNTED


def problem(repo: RepoState, state: DisplayState, host_option: str = "") -> str:
    """What is wrong with a repository, and how to recover, in one line ('' if nothing)."""
    if state is DisplayState.STALE:
        return (f"the mount at {repo.mount_path} is stale (its mount process is gone): start mountd "
                f"(artifactfs up) to remount it, or unmount it with fusermount3 -u {repo.mount_path}")
    if state is DisplayState.FAILED:
        return f"preparation failed: retry with artifactfs prepare --name {repo.name}{host_option}"
    return ""


def mount_record(settings: Settings, name: str) -> dict[str, Any]:
    """What the repository's mount process last recorded (fetch statistics, the backfill's
    progress); {} if it recorded nothing (not mounted yet, or an owner's mount)."""
    try:
        record = json.loads(settings.stats_file(name).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def backfill_columns(record: dict[str, Any]) -> dict[str, object]:
    backfill = record.get("backfill")
    if not isinstance(backfill, dict):
        return {"backfill": "", "backfill_blobs": "", "backfill_bytes": ""}
    return {
        "backfill": backfill.get("state", ""),
        "backfill_blobs": f"{backfill.get('present', 0)}/{backfill.get('total', 0)}" if backfill.get("total") else "",
        "backfill_bytes": backfill.get("present_bytes", 0) if backfill.get("total") else "",
    }


def clone_kind(repo: RepoState) -> str:
    """What kind of clone the git directory is, as status says it."""
    if repo.prepared_gitdir:
        return "prepared"
    kind = "full (the remote does not support filters)" if repo.filter_fallback else "partial"
    return f"{kind}, shallow (depth {repo.depth})" if repo.depth is not None else kind


def ready_seconds(repo: RepoState) -> str:
    """From the attempt's start to ready: what a sandbox waited at the gate, at most."""
    if repo.ready_at is None or repo.attempt_started_at is None or repo.state is not PrepareState.READY:
        return ""
    return f"{max((repo.ready_at - repo.attempt_started_at).total_seconds(), 0):.3f}"


def status_row(settings: Settings, repo: RepoState) -> dict[str, object]:
    """What `status` shows of `repo`; what lives on the host's disk (hydration, backfill) only
    for this host's repositories."""
    here = repo.host == settings.host
    stats = hydration_stats(settings.repo_git_dir(repo)) if here else None
    state = display_state(settings, repo)
    return {
        "repo": repo.name,
        "host": repo.host,
        "state": state.value,
        "head": repo.head or "",
        "ref": repo.ref,
        "remote": repo.remote_url,
        "filter": repo.blob_filter,
        "clone": clone_kind(repo),
        "require_commit": repo.require_commit or "",
        "refresh": f"{repo.refresh_seconds:g}s" if repo.refresh_seconds is not None else "never",
        "refreshed_at": repo.refreshed_at.isoformat() if repo.refreshed_at is not None else "",
        "refresh_outcome": repo.refresh_outcome or "",
        "mount_path": repo.mount_path,
        "phase": repo.prepare_phase or "",
        "prepare_error": repo.prepare_error or "",
        "problem": problem(repo, state, "" if here else f" --host {repo.host}"),
        "history": repo.history if repo.state is PrepareState.READY else "",  # of the commit shown
        "ready_seconds": ready_seconds(repo),
        "history_seconds": f"{repo.history_seconds:g}" if repo.history_seconds is not None else "",
        "lazy_fetches": lazy_fetches(settings.repo_git_dir(repo)) if here else "",
        "hydrated_blobs": stats.blobs if stats else "",
        "hydrated_bytes": stats.bytes if stats else "",
        **backfill_columns(mount_record(settings, repo.name) if here else {}),
    }
