"""The lifecycle of a registered repository: add (prepare), remove, and what status shows."""
from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .gitstore import clone_blobless, hydration_stats, run_git, git_env, store_credentials
from .locks import repo_lock
from .model import DisplayState, DuplicateRepo, EventType, Phase, PrepareState, RefNotFound, RemoteUnreachable, UnknownRepo
from .mounts import is_mounted, unmount
from .model import NewEvent, RepoState
from .registry import Registry
from .remotes import Remote, parse_remote, redact, validate_name, validate_ref

# How long remove-repo waits for mountd to take the mount down before doing it itself.
UNMOUNT_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class AddRequest:
    name: str
    remote: Remote
    ref: str
    mount_path: Path


def parse_add_request(settings: Settings, name: str, remote: str, ref: str, mount_root: str | None) -> AddRequest:
    """Validate everything a user typed before anything is written."""
    validate_name(name)
    parsed = parse_remote(remote)
    full_ref = validate_ref(ref)
    root = Path(mount_root).expanduser().absolute() if mount_root else None
    return AddRequest(name=name, remote=parsed, ref=full_ref, mount_path=settings.mount_path(name, root))


def registration(settings: Settings, req: AddRequest, *, asynchronous: bool, job_id: str) -> NewEvent:
    return NewEvent(
        EventType.REGISTERED,
        {
            "remote_url": req.remote.url,
            "ref": req.ref,
            "mount_path": str(req.mount_path),
            "git_dir": str(settings.git_dir(req.name)),
            "asynchronous": asynchronous,
            "attempt": 1,
        },
        job_id=job_id,
    )


def claim(repo: RepoState | None, name: str) -> None:
    if repo is not None:
        raise DuplicateRepo(name)


def add_repo(settings: Settings, registry: Registry, req: AddRequest) -> RepoState:
    """The blocking add: register, clone, and return once the repository is ready.

    On any failure (or Ctrl-C) the clone is removed and an ADD_ABANDONED event frees the name, so
    nothing is left behind but the record of the attempt in the log.
    """
    settings.ensure_dirs()
    job_id = f"add-{req.name}-{uuid.uuid4().hex[:12]}"
    with repo_lock(settings.lock_file(req.name)):
        registry.append(
            req.name,
            lambda repo: claim(repo, req.name) or [registration(settings, req, asynchronous=False, job_id=job_id)],
        )
        git_dir = settings.git_dir(req.name)
        credential_file = settings.credential_file(req.name) if req.remote.has_credentials else None
        try:
            _discard_leftovers(settings, req.name)
            if credential_file is not None:
                store_credentials(req.remote, credential_file)
            head = prepare_clone(settings, registry, req.name, req.remote.url, req.ref, git_dir, credential_file, job_id)
        except BaseException as exc:
            _discard_leftovers(settings, req.name)
            error = redact(str(exc)) or type(exc).__name__
            registry.append(req.name, lambda _repo: [NewEvent(EventType.ADD_ABANDONED, {"error": error}, job_id=job_id)])
            raise
        del head
    return registry.require(req.name)


def prepare_clone(
    settings: Settings,
    registry: Registry,
    name: str,
    remote_url: str,
    ref: str,
    git_dir: Path,
    credential_file: Path | None,
    job_id: str,
) -> str:
    """The prepare phases of a fresh clone, each one an event: validate, clone, index, publish."""

    def phase(p: Phase) -> None:
        registry.append(name, lambda _r: [NewEvent(EventType.PHASE, {"phase": p.value}, job_id=job_id, dedupe_key=f"{job_id}:{p.value}")])

    phase(Phase.VALIDATE)
    validate_remote(remote_url, ref, credential_file)
    phase(Phase.CLONE)
    result = clone_blobless(remote_url, ref, git_dir, settings.tmp_root, credential_file=credential_file)
    phase(Phase.INDEX)
    # An index of the commit's tree: read-tree needs only trees, which a blobless clone has.
    run_git(["read-tree", result.head], git_dir=git_dir)
    phase(Phase.PUBLISH)
    registry.append(
        name,
        lambda _r: [NewEvent(EventType.READY, {"head": result.head}, job_id=job_id, dedupe_key=f"{job_id}:ready")],
    )
    return result.head


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


def _discard_leftovers(settings: Settings, name: str) -> None:
    """Remove the git dir, credentials and state of an unregistered or abandoned name."""
    shutil.rmtree(settings.git_dir(name), ignore_errors=True)
    shutil.rmtree(settings.repo_state_dir(name), ignore_errors=True)
    settings.credential_file(name).unlink(missing_ok=True)


def remove_repo(settings: Settings, registry: Registry, name: str) -> None:
    """Unregister a repository, take its mount down and delete its state."""
    validate_name(name)
    with repo_lock(settings.lock_file(name)):
        repo = registry.get(name)
        if repo is None:
            raise UnknownRepo(name)
        registry.append(name, lambda current: _removal(current, name))
        mount_path = Path(repo.mount_path)
        # mountd sees the removal and unmounts; if it does not (not running), do it here.
        deadline = time.monotonic() + UNMOUNT_GRACE_SECONDS
        while is_mounted(mount_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_mounted(mount_path) and not unmount(mount_path):
            unmount(mount_path, lazy=True)
        if not repo.prepared_gitdir:  # a prepared git dir belongs to whoever made it
            shutil.rmtree(repo.git_dir, ignore_errors=True)
        _discard_leftovers(settings, name)
        try:
            mount_path.rmdir()
        except OSError:
            pass  # not empty or not ours: leave it


def _removal(current: RepoState | None, name: str) -> list[NewEvent]:
    if current is None:
        raise UnknownRepo(name)
    return [NewEvent(EventType.REMOVED, {})]


def display_state(repo: RepoState) -> DisplayState:
    state = repo.state
    if state is PrepareState.PREPARING:
        return DisplayState.PREPARING
    if state is PrepareState.FAILED:
        return DisplayState.FAILED
    return DisplayState.MOUNTED if is_mounted(repo.mount_path) else DisplayState.UNMOUNTED


def status_row(repo: RepoState) -> dict[str, object]:
    stats = hydration_stats(Path(repo.git_dir))
    return {
        "repo": repo.name,
        "state": display_state(repo).value,
        "head": repo.head or "",
        "ref": repo.ref,
        "remote": repo.remote_url,
        "mount_path": repo.mount_path,
        "phase": repo.prepare_phase or "",
        "prepare_error": repo.prepare_error or "",
        "hydrated_blobs": stats.blobs,
        "hydrated_bytes": stats.bytes,
    }
