"""Celery tasks. Arguments name a repository and an attempt, never a URL or a secret: the worker
reads everything else from the registry. A task id is deterministic per attempt
(`prepare:<repo>:<version of the event that began it>`), and everything a job appends carries a dedupe key, so a redelivered
or duplicated job appends nothing twice."""
from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from artifactfs.config import load_settings
from artifactfs.jobs import PREPARE_TASK, PrepareOutcome, run_prepare_job

from .app import app

log = logging.getLogger("artifactfs.worker")

@app.task(name=PREPARE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def prepare(self: Task, repo: str, attempt: int, version: int, host: str) -> str:
    """Prepare `repo` on `host`: clone or fetch, index, publish READY. `attempt` counts attempts
    for people; `version`, the stream version that began the attempt, is what identifies it."""
    settings = load_settings()
    retries_left = self.request.retries < settings.job_retries
    try:
        outcome = run_prepare_job(settings, repo, version, job_id=self.request.id, may_retry=retries_left)
    except SoftTimeLimitExceeded:
        outcome = run_prepare_job(settings, repo, version, job_id=self.request.id, timed_out=True)
    if outcome is PrepareOutcome.RETRY:
        # A transient failure (connection reset, early EOF, HTTP 5xx): back off and try again.
        raise self.retry(countdown=min(2 ** self.request.retries, 60))
    return outcome.value
