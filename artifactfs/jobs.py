"""Prepare jobs, apart from Celery: what a job does (run_prepare_job) and how mountd hands one to
this host's queue (publish_prepare). The Celery task in workers/tasks.py is a thin shell."""
from __future__ import annotations

import enum
import logging
import shutil

from .config import Settings
from .locks import repo_lock
from .model import ArtifactError, GitError, PrepareState, RepoState, StaleAttempt
from .prepare import Preparation, fail_attempt
from .registry import Registry, open_registry
from .remotes import redact, validate_name

log = logging.getLogger("artifactfs.jobs")

PREPARE_TASK = "artifactfs.prepare"


class PrepareOutcome(str, enum.Enum):
    READY = "ready"
    FAILED = "failed"
    RETRY = "retry"  # transient failure: the caller backs off and runs the job again
    SKIPPED = "skipped"  # nothing to do: removed, already prepared, or superseded


def task_id(name: str, attempt_version: int) -> str:
    """Deterministic per attempt: a duplicate publish of the same attempt is the same job."""
    return f"prepare:{name}:{attempt_version}"


def publish_prepare(settings: Settings, repo: RepoState) -> str:
    """Send the prepare job of `repo`'s current attempt to this host's queue."""
    from workers.app import app

    tid = task_id(repo.name, repo.attempt_version)
    app.send_task(
        PREPARE_TASK,
        kwargs={"repo": repo.name, "attempt": repo.prepare_attempt, "version": repo.attempt_version, "host": settings.host},
        task_id=tid,
        queue=settings.queue,
    )
    return tid


def run_prepare_job(
    settings: Settings,
    name: str,
    attempt_version: int,
    *,
    job_id: str,
    may_retry: bool = False,
    timed_out: bool = False,
) -> PrepareOutcome:
    validate_name(name)  # before a lock file or a directory is derived from it
    registry = open_registry(settings.database_url)
    try:
        with repo_lock(settings.lock_file(name)):
            repo = registry.get(name)
            if repo is None or repo.attempt_version != attempt_version or repo.state is not PrepareState.PREPARING:
                state = repo.prepare_state if repo else "removed"
                log.info("%s: the attempt begun at version %d has nothing to do (%s)", name, attempt_version, state)
                return PrepareOutcome.SKIPPED
            if timed_out:
                return _fail(settings, registry, repo, job_id, "preparation exceeded its time limit")
            credential_file = settings.credential_file(name)
            credentials = credential_file if credential_file.exists() else None
            try:
                Preparation(settings, registry, repo, job_id, credentials).run()
                return PrepareOutcome.READY
            except StaleAttempt:
                if registry.get(name) is None and not repo.prepared_gitdir:
                    shutil.rmtree(settings.git_dir(name), ignore_errors=True)  # removed while we cloned
                return PrepareOutcome.SKIPPED
            except GitError as exc:
                if exc.transient and may_retry:
                    log.warning("%s: transient failure, will retry: %s", name, redact(str(exc)))
                    return PrepareOutcome.RETRY
                return _fail(settings, registry, repo, job_id, str(exc))
            except ArtifactError as exc:
                return _fail(settings, registry, repo, job_id, str(exc))
            except Exception as exc:  # a bug must still fail the repository, not leave it preparing
                log.exception("%s: preparation crashed", name)
                return _fail(settings, registry, repo, job_id, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        registry.close()


def _fail(settings: Settings, registry: Registry, repo: RepoState, job_id: str, error: str) -> PrepareOutcome:
    log.error("%s: preparation failed: %s", repo.name, redact(error))
    if fail_attempt(settings, registry, repo, error, job_id=job_id, dedupe_key=f"{job_id}:failed"):
        return PrepareOutcome.FAILED
    return PrepareOutcome.SKIPPED
