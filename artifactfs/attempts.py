"""Appending to a repository's preparation attempt: the events of an attempt, written only while
it is still the current one, and the wake-up that tells mountd to read them. Shared by the CLI,
the workers and mountd; light on imports, since every CLI command that registers or retries
starts with it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .config import Settings
from .model import EventType, NewEvent, PrepareState, RegistryBusy, RepoState, StaleAttempt
from .registry import Registry
from .remotes import redact
from .wakeup import publish

log = logging.getLogger("artifactfs.attempts")

T = TypeVar("T")


def announce(settings: Settings, name: str) -> None:
    """Wake whoever follows the log (mountd); losing this message only delays them."""
    publish(settings.wakeup_url, name)


Guard = Callable[[RepoState | None], None]


def current_attempt(attempt_version: int, state: PrepareState = PrepareState.PREPARING) -> Guard:
    """Refuse to append for an attempt that a newer one (or a removal) has superseded, or that is
    no longer in `state` (a history fetch appends to a ready attempt)."""

    def guard(repo: RepoState | None) -> None:
        if repo is None or repo.attempt_version != attempt_version or repo.state is not state:
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


@dataclass(frozen=True)
class Patience:
    """How long to keep trying a registry that answers RegistryBusy (locked by another writer past
    the busy timeout, or its server unreachable): again after 0.5 s, 1 s, 2 s, ... (at most
    `max_delay` apart) until `seconds` have passed, then RegistryBusy goes to the caller. Every
    append that is retried carries a dedupe key or is guarded, so trying again is harmless.
    The default, no patience, is the CLI's: it reports a busy registry at once."""

    seconds: float = 0.0
    first_delay: float = 0.5
    max_delay: float = 15.0

    def retry(self, action: Callable[[], T], what: str) -> T:
        deadline = time.monotonic() + self.seconds
        delay = self.first_delay
        while True:
            try:
                return action()
            except RegistryBusy as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: the registry is busy, trying again in %gs: %s", what, delay, redact(str(exc)))
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay)


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
