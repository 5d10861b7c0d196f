"""Redis as the job broker: a lost connection must cost a reconnect, never the worker.

When Redis goes away (killed, restarted by `artifactfs up`), Celery gives the connection up: it
detaches the connection's transport, then reconnects. A channel of the old connection may still be
used afterwards: closing it puts the running jobs' messages back, and a job that ends later
acknowledges its message through it (jobs are acknowledged late). kombu's Redis channel then reads
the connection parameters from the detached transport and raises AttributeError, which Celery takes
for an unrecoverable error: the worker shuts down, and no job runs on this host until someone starts
a worker again. Raised as a connection error instead, it is what Celery expects of a dead connection
there: logged and ignored. Nothing is lost by that: Redis keeps an unacknowledged message and hands
it out again after its visibility timeout, and mountd publishes the job of every preparing repository
again once the broker is back (jobs are idempotent).
"""
from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


def _connection_parameters(original: Any) -> Any:
    def connparams(channel: Any, *args: Any, **kwargs: Any) -> Any:
        if channel.connection is None or channel.connection.client is None:
            raise RedisConnectionError("this channel's broker connection was given up (the broker went away)")
        return original(channel, *args, **kwargs)

    connparams.artifactfs_guard = True  # type: ignore[attr-defined]
    return connparams


def guard_channels_of_lost_connections() -> None:
    """Make kombu's Redis channels of a given-up connection fail as a dead connection (idempotent)."""
    current = getattr(kombu_redis.Channel, "_connparams", None)
    if current is None:  # a kombu that no longer has it: nothing of this to guard
        return
    if not getattr(current, "artifactfs_guard", False):
        kombu_redis.Channel._connparams = _connection_parameters(current)
