"""The projection: a repository's current state as a fold over its events. Pure functions, used
alike by every append (in the same transaction) and by a rebuild from the log alone."""
from __future__ import annotations

from collections.abc import Iterable

from .model import EventRecord, EventType, HistoryState, PrepareState, RepoState


def apply_event(repo: RepoState | None, ev: EventRecord) -> RepoState | None:
    """Fold one event into a repository's state; None means "not registered"."""
    kind = ev.kind
    p = ev.payload
    if kind is EventType.REGISTERED:
        repo = RepoState(
            name=ev.stream,
            host=ev.host,
            remote_url=p["remote_url"],
            ref=p["ref"],
            mount_path=p["mount_path"],
            git_dir=p["git_dir"],
            fetch_ref=p.get("fetch_ref"),
            prepared_gitdir=bool(p.get("prepared_gitdir", False)),
            asynchronous=bool(p.get("asynchronous", False)),
            prepare_attempt=int(p.get("attempt", 1)),
            attempt_started_at=ev.created_at,
            attempt_version=ev.version,
            registered_at=ev.created_at,
            owner_uid=p.get("owner_uid"),
            owner_gid=p.get("owner_gid"),
            blob_filter=p.get("filter", "blob:none"),
            require_commit=p.get("require_commit"),
            depth=p.get("depth"),
            refresh_seconds=p.get("refresh_seconds"),
        )
    elif repo is None:
        return None  # history of a name that is not registered now (e.g. an abandoned add)
    elif kind is EventType.PREPARE_REQUESTED:
        repo.prepare_state = PrepareState.PREPARING.value
        repo.prepare_error = None
        repo.prepare_phase = None
        repo.prepare_attempt = int(p.get("attempt", repo.prepare_attempt + 1))
        repo.attempt_started_at = ev.created_at
        repo.attempt_version = ev.version
        # A worker prepares it, unless the attempt runs in the process that asked for it (a
        # repository with inline credentials: no background job may hold them).
        repo.asynchronous = bool(p.get("asynchronous", True))
    elif kind is EventType.PHASE:
        repo.prepare_phase = p["phase"]
    elif kind is EventType.READY:
        repo.prepare_state = PrepareState.READY.value
        repo.prepare_error = None
        repo.prepare_phase = None
        repo.head = p["head"]
        repo.filter_fallback = bool(p.get("filter_fallback", False))
        repo.history = p.get("history", HistoryState.COMPLETE.value)
        repo.ready_at = ev.created_at
        repo.history_seconds = None
    elif kind is EventType.HISTORY:
        repo.history = {"started": HistoryState.FETCHING, "done": HistoryState.COMPLETE}.get(
            p.get("state", ""), HistoryState.FAILED).value
        repo.history_seconds = p.get("seconds", repo.history_seconds)
    elif kind is EventType.REFRESHED:
        repo.head = p.get("head") or repo.head
        repo.refreshed_at = ev.created_at
        repo.refresh_outcome = p.get("outcome")
        repo.history = p.get("history", repo.history)
    elif kind is EventType.FAILED:
        repo.prepare_state = PrepareState.FAILED.value
        repo.prepare_error = p.get("error") or "unknown error"
    elif kind in (EventType.REMOVED, EventType.ADD_ABANDONED):
        return None
    repo.version = ev.version
    repo.updated_at = ev.created_at
    return repo


def fold(events: Iterable[EventRecord]) -> dict[tuple[str, str], RepoState]:
    """Every registered repository, by (host, name)."""
    state: dict[tuple[str, str], RepoState | None] = {}
    for ev in events:
        key = (ev.host, ev.stream)
        state[key] = apply_event(state.get(key), ev)
    return {key: repo for key, repo in state.items() if repo is not None}
