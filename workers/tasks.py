"""Celery tasks. Arguments name a repository and an attempt, never a URL or a secret: the worker
reads everything else from the registry. A task id is deterministic per attempt
(`prepare:<repo>:<version of the event that began it>`), and everything a job appends carries a
dedupe key, so a redelivered or duplicated job appends nothing twice. That is what makes the task
safe to acknowledge late and to run again (Celery's retry, a redelivery after a lost worker).

Anyone who can reach the broker can send a task, so arguments are checked like CLI input before
anything (a lock file, a directory) is derived from them."""
from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from artifactfs.config import Settings, load_settings
from artifactfs.jobs import PREPARE_TASK, PrepareOutcome, run_prepare_job
from artifactfs.model import InvalidInput, PrepareFailed, RefreshOutcome, RegistryBusy
from artifactfs.refresh import REFRESH_TASK, run_refresh_job
from artifactfs.remotes import redact, validate_name

from .app import app

log = logging.getLogger("artifactfs.worker")


def check_job_arguments(settings: Settings, kind: str, repo: object, host: object, minimum: int = 1, **numbers: object) -> str:
    """The arguments of a job, refused unless each is what mountd would send: a repository name,
    this host, and whole numbers of at least `minimum`."""
    if not isinstance(repo, str):
        raise InvalidInput(f"refused {kind} job: repo must be a name, not {type(repo).__name__}")
    validate_name(repo)
    for label, value in numbers.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise InvalidInput(f"refused {kind} job for {repo!r}: {label} must be an integer of at least {minimum}, not {value!r}")
    if host != settings.host:
        raise InvalidInput(f"refused {kind} job for {repo!r}: it is for host {host!r}, this worker serves {settings.host!r}")
    return repo


@app.task(name=PREPARE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def prepare(self: Task, repo: str, attempt: int, version: int, host: str) -> dict[str, str]:
    """Prepare `repo` on `host`: clone or fetch, index, publish READY. `attempt` counts attempts
    for people; `version`, the stream version that began the attempt, is what identifies it."""
    settings = load_settings()
    name = check_job_arguments(settings, "prepare", repo, host, attempt=attempt, version=version)
    retries_left = self.request.retries < settings.job_retries
    try:
        result = run_prepare_job(
            settings, name, version, job_id=self.request.id, may_retry=retries_left, time_limit_error=SoftTimeLimitExceeded
        )
    except RegistryBusy as exc:
        # The job waited the registry out for minutes: hand it back to the queue rather than drop it
        # (run again, it appends nothing twice). This counts as one of the task's retries.
        log.warning("%s: the registry stayed busy, the job goes back to the queue: %s", name, redact(str(exc)))
        raise self.retry(countdown=settings.db_busy_timeout) from None
    if result.outcome is PrepareOutcome.RETRY:
        # A transient failure (connection reset, early EOF, HTTP 5xx): back off and try again.
        raise self.retry(countdown=min(2 ** self.request.retries, 60))
    if result.outcome is PrepareOutcome.FAILED:
        # Recorded in the log already. Raised, it shows the job as FAILURE in Flower, with the
        # redacted error; the message is acknowledged all the same (acks_late acknowledges a task
        # that failed, task_acks_on_failure_or_timeout), so a recorded failure is never redelivered.
        raise PrepareFailed(result.error or "preparation failed")
    return result.shown()


@app.task(name=REFRESH_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def refresh(self: Task, repo: str, slot: int, host: str) -> dict[str, str]:
    """Refresh `repo` on `host` once (add-repo --refresh): fetch its ref, and show the new commit
    if the working tree has no changes of its own. `slot` names the interval (the task's id)."""
    settings = load_settings()
    name = check_job_arguments(settings, "refresh", repo, host, minimum=0, slot=slot)
    result = run_refresh_job(settings, name, self.request.id)
    if result is None:
        return {"outcome": "skipped"}
    if result.outcome is RefreshOutcome.FAILED:
        raise PrepareFailed(f"refreshing {name} failed: {result.detail}")  # FAILURE in Flower; the mount keeps its commit
    return result.shown()
