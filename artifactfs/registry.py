"""The registry: an append-only event log and the `repos` projection folded from it.

Every change of a repository is appended to `events` in one transaction together with the update of
its `repos` row, so the projection can always be rebuilt from the log (`Registry.rebuild`). Writers
decide what to append inside the write transaction (`Registry.append(stream, decide)`), which makes
checks such as "is this name free?" atomic with the append. Versions are unique per stream, so two
writers cannot both append version 7; on SQLite, writers take the lock up front (`BEGIN IMMEDIATE`)
and wait for each other (busy timeout) instead of failing with "database is locked".
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint, event, func
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Field, Session, SQLModel, create_engine, select

from .model import ConcurrencyConflict, EventType, PrepareState, UnknownRepo


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("stream", "version", name="uq_events_stream_version"),
        UniqueConstraint("dedupe_key", name="uq_events_dedupe_key"),
    )

    id: int | None = Field(default=None, primary_key=True)  # global position in the log
    stream: str = Field(index=True)  # the repository's name
    version: int  # 1, 2, 3, ... within the stream
    type: str
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    job_id: str | None = Field(default=None, index=True)
    # Set by jobs that may run twice (at-least-once delivery): a second append is a no-op.
    dedupe_key: str | None = None


class Repo(SQLModel, table=True):
    __tablename__ = "repos"

    name: str = Field(primary_key=True)
    remote_url: str  # never holds credentials
    ref: str
    fetch_ref: str | None = None
    mount_path: str
    git_dir: str
    prepared_gitdir: bool = False
    asynchronous: bool = False
    prepare_state: str = PrepareState.PREPARING.value
    prepare_phase: str | None = None
    prepare_error: str | None = None
    prepare_attempt: int = 0
    head: str | None = None
    version: int = 0  # last stream version folded into this row
    registered_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def state(self) -> PrepareState:
        return PrepareState(self.prepare_state)


@dataclass
class NewEvent:
    type: EventType
    payload: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    dedupe_key: str | None = None


# --- projection -----------------------------------------------------------------------------


def apply_event(repo: Repo | None, ev: Event) -> Repo | None:
    """Fold one event into a repository's current state. Pure: used by appends and rebuilds alike."""
    kind = EventType(ev.type)
    p = ev.payload
    if kind is EventType.REGISTERED:
        repo = Repo(
            name=ev.stream,
            remote_url=p["remote_url"],
            ref=p["ref"],
            fetch_ref=p.get("fetch_ref"),
            mount_path=p["mount_path"],
            git_dir=p["git_dir"],
            prepared_gitdir=bool(p.get("prepared_gitdir", False)),
            asynchronous=bool(p.get("asynchronous", False)),
            prepare_state=PrepareState.PREPARING.value,
            prepare_attempt=int(p.get("attempt", 1)),
            registered_at=ev.created_at,
        )
    elif repo is None:
        return None  # history of a name that is not registered now (e.g. an abandoned add)
    elif kind is EventType.PREPARE_REQUESTED:
        repo.prepare_state = PrepareState.PREPARING.value
        repo.prepare_error = None
        repo.prepare_phase = None
        repo.prepare_attempt = int(p.get("attempt", repo.prepare_attempt + 1))
    elif kind is EventType.PHASE:
        repo.prepare_phase = p["phase"]
    elif kind is EventType.READY:
        repo.prepare_state = PrepareState.READY.value
        repo.prepare_error = None
        repo.prepare_phase = None
        repo.head = p["head"]
    elif kind is EventType.FAILED:
        repo.prepare_state = PrepareState.FAILED.value
        repo.prepare_error = p.get("error", "unknown error")
    elif kind in (EventType.REMOVED, EventType.ADD_ABANDONED):
        return None
    repo.version = ev.version
    repo.updated_at = ev.created_at
    return repo


def fold(events: Iterable[Event]) -> dict[str, Repo]:
    state: dict[str, Repo | None] = {}
    for ev in events:
        state[ev.stream] = apply_event(state.get(ev.stream), ev)
    return {name: repo for name, repo in state.items() if repo is not None}


# --- engine ---------------------------------------------------------------------------------


def _sqlite_engine(url: str, begin: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when a transaction begins (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


class Registry:
    """The event log and its projection behind one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            # Writers lock up front so that read-then-append never upgrades a shared lock (which
            # SQLite answers with SQLITE_BUSY at once, whatever the busy timeout).
            self._write_engine = _sqlite_engine(url, "BEGIN IMMEDIATE")
            self._read_engine = _sqlite_engine(url, "BEGIN")
        else:
            self._write_engine = self._read_engine = create_engine(url, pool_pre_ping=True)
        SQLModel.metadata.create_all(self._write_engine)

    def close(self) -> None:
        self._write_engine.dispose()
        self._read_engine.dispose()

    # --- writing ---

    def append(
        self,
        stream: str,
        decide: Callable[[Repo | None], list[NewEvent]],
        *,
        expected_version: int | None = None,
    ) -> list[Event]:
        """Append what `decide(current)` returns to `stream`, atomically with the projection.

        `decide` runs inside the write transaction and may raise to refuse (e.g. DuplicateRepo).
        Events whose dedupe_key is already in the log are skipped, so a redelivered job is a no-op.
        """
        for attempt in range(50):
            try:
                return self._append_once(stream, decide, expected_version)
            except IntegrityError:
                # Another writer took our version first (PostgreSQL has no BEGIN IMMEDIATE): decide
                # again on the new state, unless the caller pinned the version it expected.
                if expected_version is not None:
                    raise ConcurrencyConflict(f"stream {stream!r} moved past version {expected_version}")
                time.sleep(0.01 * (attempt + 1))
            except OperationalError as exc:  # pragma: no cover - only under extreme contention
                if "locked" not in str(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise ConcurrencyConflict(f"could not append to stream {stream!r}: too much contention")

    def _append_once(
        self, stream: str, decide: Callable[[Repo | None], list[NewEvent]], expected_version: int | None
    ) -> list[Event]:
        with Session(self._write_engine, expire_on_commit=False) as session:
            current_version = session.exec(
                select(func.max(Event.version)).where(Event.stream == stream)
            ).one() or 0
            if expected_version is not None and current_version != expected_version:
                raise ConcurrencyConflict(
                    f"stream {stream!r} is at version {current_version}, expected {expected_version}"
                )
            repo = session.get(Repo, stream)
            new_events = decide(repo)
            keys = [e.dedupe_key for e in new_events if e.dedupe_key]
            seen = set(
                session.exec(select(Event.dedupe_key).where(Event.dedupe_key.in_(keys))).all()  # type: ignore[union-attr]
            ) if keys else set()
            appended: list[Event] = []
            version = current_version
            for new in new_events:
                if new.dedupe_key and new.dedupe_key in seen:
                    continue
                version += 1
                ev = Event(
                    stream=stream,
                    version=version,
                    type=new.type.value,
                    payload=new.payload,
                    job_id=new.job_id,
                    dedupe_key=new.dedupe_key,
                )
                session.add(ev)
                appended.append(ev)
                repo = self._project(session, repo, ev)
            session.commit()
            return appended

    @staticmethod
    def _project(session: Session, repo: Repo | None, ev: Event) -> Repo | None:
        existed = repo is not None and repo in session
        new = apply_event(repo, ev)
        if new is None:
            if existed:
                session.delete(repo)
                session.flush()
            return None
        if new is not repo and existed:
            # Re-registration after removal in the same transaction: replace the row.
            session.delete(repo)
            session.flush()
        session.add(new)
        return new

    def rebuild(self) -> None:
        """Replace the projection by a fresh fold of the whole log."""
        with Session(self._write_engine) as session:
            state = fold(session.exec(select(Event).order_by(Event.id)).all())
            for row in session.exec(select(Repo)).all():
                session.delete(row)
            session.flush()
            for repo in state.values():
                session.add(repo)
            session.commit()

    # --- reading ---

    def get(self, name: str) -> Repo | None:
        with Session(self._read_engine, expire_on_commit=False) as session:
            return session.get(Repo, name)

    def require(self, name: str) -> Repo:
        repo = self.get(name)
        if repo is None:
            raise UnknownRepo(name)
        return repo

    def repos(self) -> list[Repo]:
        with Session(self._read_engine, expire_on_commit=False) as session:
            return list(session.exec(select(Repo).order_by(Repo.name)).all())

    def events(self, stream: str | None = None, *, after: int = 0) -> list[Event]:
        with Session(self._read_engine, expire_on_commit=False) as session:
            query = select(Event).where(Event.id > after).order_by(Event.id)
            if stream is not None:
                query = query.where(Event.stream == stream)
            return list(session.exec(query).all())

    def position(self) -> int:
        """The global position of the newest event (0 for an empty log)."""
        with Session(self._read_engine) as session:
            return session.exec(select(func.max(Event.id))).one() or 0

    def folded(self) -> dict[str, Repo]:
        """The projection as the log alone says it should be (for checks and repairs)."""
        return fold(self.events())
