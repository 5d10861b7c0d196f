"""The Celery application: one queue per host, jobs that survive a lost worker.

Prepare jobs are at least once: acknowledged only when done (acks_late), put back when the process
running them dies (reject_on_worker_lost), one at a time per worker process (prefetch 1), and
bounded by soft and hard time limits that stay under the broker's visibility timeout, so a slow job
is never handed to a second worker while the first still runs it. Workers send task events, so
Flower shows every job with its state, worker and runtime. What a job does, and how it fails, is
artifactfs/jobs.py.
"""
from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from artifactfs.config import Settings, load_settings

from .broker import guard_channels_of_lost_connections


def broker_url(redis_url: str) -> str:
    """kombu spells a Redis Unix socket redis+socket:///path."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


def make_app(settings: Settings) -> Celery:
    guard_channels_of_lost_connections()  # a Redis restart must not end the worker (see broker.py)
    app = Celery("artifactfs", broker=broker_url(settings.wakeup_url), include=["workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_limit,
        task_time_limit=settings.job_hard_limit,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # The job of a worker killed outright (SIGKILL, OOM, power) goes back to the queue once
            # its visibility timeout has passed: look for such jobs every 10 s (kombu's sweep period
            # is 10 s times this throttle, 100 s by default) so that it is not much later than that.
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_ignore_result=True,  # the event log, not a result backend, holds the outcome
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


app = make_app(load_settings())


@worker_process_init.connect
def _take_metrics_files(**_: object) -> None:
    """Each pool process writes metrics files of its own: take them as it starts, not at its first
    count, which may come when the disk is full (metrics.allocate_files)."""
    from artifactfs.metrics import open_files

    open_files()
