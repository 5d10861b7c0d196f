"""The registry: the append-only event log and the `repos` projection folded from it.

A stream is a repository name on one host: every event and every projection row names its host,
and a Registry object reads and writes one host's repositories (`for_host` gives another's view,
`all_hosts=True` reads every host's).

Every change of a repository is appended to `events` in one transaction together with the update
of its `repos` row, so the projection can always be rebuilt from the log (`Registry.rebuild`).
Writers decide what to append inside the write transaction (`Registry.append(stream, decide)`),
which makes checks such as "is this name free?" atomic with the append. Versions are unique per
stream, so two writers cannot both append version 7.

Two drivers serve the same tables (defined once, as SQLModel tables, in tables.py):
- SQLite, the embedded default, through the standard library: WAL, a busy timeout, and writers
  that take the lock up front (`BEGIN IMMEDIATE`), so concurrent processes wait instead of failing
  with "database is locked". Importing SQLAlchemy and pydantic costs more than half a second on
  these machines, which a CLI that must answer in milliseconds cannot pay on every call.
- Any other URL (PostgreSQL for a fleet) through SQLAlchemy on the SQLModel tables.
The append algorithm and the projection are shared; a driver only moves rows.

Followers read the log by position (`events(after=N)`), so positions must become visible in
order: a reader that has seen position N must never later find a smaller one committed. SQLite
has one writer at a time, so that holds by itself. PostgreSQL hands out positions from a sequence
at insert time, while transactions commit in any order; there every append takes one advisory
lock for its transaction, so that positions are assigned and committed in the same order.
Appends are a few milliseconds each, and one at a time across the fleet is far from a limit.

Opening a registry checks its schema's revision (schema.py): a new database is created at once,
one made by an older artifactfs waits for `artifactfs migrate`.

Both drivers turn their database errors into the named errors of model.py, each message naming
the file or (redacted) URL and what to do: RegistryBusy for what is worth retrying (locked for
longer than the busy timeout, a server that does not answer), RegistryError for what is not
(corrupt, read-only, full disk).
"""
from __future__ import annotations

import copy
import errno
import json
import os
import sqlite3
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .model import (
    ConcurrencyConflict,
    EventRecord,
    NewEvent,
    RegistryBusy,
    RegistryError,
    RepoState,
    UnknownRepo,
    utcnow,
)
from . import schema
from .projection import apply_event, fold
from .remotes import redact

REPO_COLUMNS = tuple(f.name for f in fields(RepoState))
EVENT_COLUMNS = tuple(f.name for f in fields(EventRecord))
APPEND_ATTEMPTS = 50
APPEND_LOCK_KEY = 0x61667331  # PostgreSQL's advisory lock that appends take ("afs1")

Decide = Callable[[RepoState | None], Sequence[NewEvent]]


class Tx(ABC):
    """The row moves a driver provides, inside one transaction."""

    @abstractmethod
    def current_version(self, host: str, stream: str) -> int: ...

    @abstractmethod
    def seen(self, dedupe_keys: list[str]) -> set[str]: ...

    @abstractmethod
    def insert_event(self, ev: EventRecord) -> int: ...

    @abstractmethod
    def get_repo(self, host: str, name: str) -> RepoState | None: ...

    @abstractmethod
    def list_repos(self, host: str | None) -> list[RepoState]:
        """One host's repositories (every host's if None), by host and name."""

    @abstractmethod
    def put_repo(self, repo: RepoState) -> None: ...

    @abstractmethod
    def delete_repo(self, host: str, name: str) -> None: ...

    @abstractmethod
    def list_events(self, host: str | None, stream: str | None, after: int) -> list[EventRecord]:
        """Events after position `after`, in log order: of one host (every host's if None), of
        one stream (every stream's if None)."""

    @abstractmethod
    def position(self) -> int: ...


class Registry(ABC):
    """The event log and its projection behind one database URL, as one host sees it."""

    url: str
    host: str

    def for_host(self, host: str) -> Registry:
        """The same registry (and connection) as host `host` sees it. Closing the original closes it."""
        view = copy.copy(self)
        view.host = host
        return view

    @abstractmethod
    def _write(self) -> Any:
        """Context manager: a write transaction (committed on success)."""

    @abstractmethod
    def _read(self) -> Any:
        """Context manager: a consistent read."""

    @abstractmethod
    def close(self) -> None: ...

    # --- writing ---

    def append(self, stream: str, decide: Decide, *, expected_version: int | None = None) -> list[EventRecord]:
        """Append what `decide(current)` returns to `stream`, atomically with the projection.

        `decide` runs inside the write transaction and may raise to refuse (e.g. DuplicateRepo).
        Events whose dedupe_key is already in the log are skipped, so a redelivered job is a no-op.
        """
        for attempt in range(APPEND_ATTEMPTS):
            try:
                with self._write() as tx:
                    return self._append(tx, self.host, stream, decide, expected_version)
            except self._version_clash_errors() as exc:
                # Another writer took our version first (only where writers do not lock up front):
                # decide again on the new state, unless the caller pinned the version it expected.
                if expected_version is not None:
                    raise ConcurrencyConflict(f"stream {stream!r} moved past version {expected_version}") from exc
                time.sleep(0.005 * (attempt + 1))
        raise ConcurrencyConflict(f"could not append to stream {stream!r}: too much contention")

    @staticmethod
    def _append(tx: Tx, host: str, stream: str, decide: Decide, expected_version: int | None) -> list[EventRecord]:
        version = tx.current_version(host, stream)
        if expected_version is not None and version != expected_version:
            raise ConcurrencyConflict(f"stream {stream!r} is at version {version}, expected {expected_version}")
        repo = tx.get_repo(host, stream)
        new_events = list(decide(repo))
        seen = tx.seen([e.dedupe_key for e in new_events if e.dedupe_key])
        appended: list[EventRecord] = []
        now = utcnow()
        for new in new_events:
            if new.dedupe_key and new.dedupe_key in seen:
                continue
            version += 1
            ev = EventRecord(stream, version, new.type.value, new.payload, now, new.job_id, new.dedupe_key, host=host)
            ev.id = tx.insert_event(ev)
            appended.append(ev)
            repo = apply_event(repo, ev)
        if appended:
            if repo is None:
                tx.delete_repo(host, stream)
            else:
                tx.put_repo(repo)
        return appended

    def _version_clash_errors(self) -> tuple[type[BaseException], ...]:
        return ()

    def rebuild(self) -> None:
        """Replace the projection by a fresh fold of the whole log."""
        with self._write() as tx:
            self._refold(tx)

    @staticmethod
    def _refold(tx: Tx) -> None:
        state = fold(tx.list_events(None, None, 0))
        for repo in tx.list_repos(None):
            tx.delete_repo(repo.host, repo.name)
        for repo in state.values():
            tx.put_repo(repo)

    # --- reading ---

    def get(self, name: str) -> RepoState | None:
        with self._read() as tx:
            return tx.get_repo(self.host, name)

    def require(self, name: str) -> RepoState:
        repo = self.get(name)
        if repo is None:
            raise UnknownRepo(name)
        return repo

    def repos(self, *, all_hosts: bool = False) -> list[RepoState]:
        with self._read() as tx:
            return tx.list_repos(None if all_hosts else self.host)

    def events(self, stream: str | None = None, *, after: int = 0, all_hosts: bool = False) -> list[EventRecord]:
        with self._read() as tx:
            return tx.list_events(None if all_hosts else self.host, stream, after)

    def position(self) -> int:
        """The global position of the newest event of every host (0 for an empty log)."""
        with self._read() as tx:
            return tx.position()

    def folded(self) -> dict[tuple[str, str], RepoState]:
        """The projection as the log alone says it should be, by (host, name) (for checks)."""
        return fold(self.events(all_hosts=True))


# --- SQLite through the standard library ----------------------------------------------------------


def _to_db(value: Any) -> Any:
    if isinstance(value, datetime):
        # UTC without an offset, as SQLAlchemy stores timezone-aware datetimes in SQLite.
        return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _from_db_time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)


# SQLite hands booleans back as integers and times as text: the columns to convert, by their types.
_BOOL_COLUMNS = tuple(f.name for f in fields(RepoState) if f.type == "bool")
_TIME_COLUMNS = tuple(f.name for f in fields(RepoState) if str(f.type).startswith("datetime"))


def _repo_from_sqlite(row: sqlite3.Row) -> RepoState:
    data = dict(row)
    for key in _BOOL_COLUMNS:
        data[key] = bool(data[key])
    for key in _TIME_COLUMNS:
        if data[key] is not None:
            data[key] = _from_db_time(data[key])
    return RepoState(**data)


def _event_from_sqlite(row: sqlite3.Row) -> EventRecord:
    data = dict(row)
    data["payload"] = json.loads(data["payload"])
    data["created_at"] = _from_db_time(data["created_at"])
    return EventRecord(**data)


def _where(*conditions: tuple[str, object]) -> tuple[str, list[object]]:
    """A WHERE clause of the conditions ("host = ?", value) whose value is not None (None: any),
    and its arguments."""
    given = [(condition, value) for condition, value in conditions if value is not None]
    if not given:
        return "", []
    return " WHERE " + " AND ".join(condition for condition, _ in given), [value for _, value in given]


class SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def current_version(self, host: str, stream: str) -> int:
        return self.conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM events WHERE host = ? AND stream = ?", (host, stream)
        ).fetchone()[0]

    def seen(self, dedupe_keys: list[str]) -> set[str]:
        if not dedupe_keys:
            return set()
        marks = ",".join("?" * len(dedupe_keys))
        rows = self.conn.execute(f"SELECT dedupe_key FROM events WHERE dedupe_key IN ({marks})", dedupe_keys)
        return {r[0] for r in rows}

    def insert_event(self, ev: EventRecord) -> int:
        columns = [c for c in EVENT_COLUMNS if c != "id"]
        cur = self.conn.execute(
            f"INSERT INTO events ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            [_to_db(getattr(ev, c)) for c in columns],
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def get_repo(self, host: str, name: str) -> RepoState | None:
        row = self.conn.execute("SELECT * FROM repos WHERE host = ? AND name = ?", (host, name)).fetchone()
        return _repo_from_sqlite(row) if row else None

    def list_repos(self, host: str | None) -> list[RepoState]:
        where, args = _where(("host = ?", host))
        return [_repo_from_sqlite(r) for r in self.conn.execute(f"SELECT * FROM repos{where} ORDER BY host, name", args)]

    def put_repo(self, repo: RepoState) -> None:
        values = asdict(repo)
        self.conn.execute(
            f"INSERT OR REPLACE INTO repos ({', '.join(REPO_COLUMNS)}) VALUES ({', '.join('?' * len(REPO_COLUMNS))})",
            [_to_db(values[c]) for c in REPO_COLUMNS],
        )

    def delete_repo(self, host: str, name: str) -> None:
        self.conn.execute("DELETE FROM repos WHERE host = ? AND name = ?", (host, name))

    def list_events(self, host: str | None, stream: str | None, after: int) -> list[EventRecord]:
        where, args = _where(("id > ?", after), ("host = ?", host), ("stream = ?", stream))
        rows = self.conn.execute(f"SELECT * FROM events{where} ORDER BY id", args)
        return [_event_from_sqlite(r) for r in rows]

    def position(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]


def _write_protected(path: Path) -> str | None:
    """Why the registry at `path` must not be written, or None.

    Root writes whatever it likes, so for root the write bits are honoured as what they mean to
    an operator (as rm and editors do): a registry or directory no one may write is frozen. A
    read-only file system refuses everyone (os.access says so even for root).
    """
    for target, what in ((path, "the file"), (path.parent, "its directory")):
        try:
            mode = os.stat(target).st_mode
        except FileNotFoundError:
            continue
        if not os.access(target, os.W_OK):
            return f"{what} is not writable"
        if not mode & 0o222:
            return f"{what} is write-protected (mode {stat.S_IMODE(mode):04o})"
    return None


def _tighten(path: Path) -> None:
    """The registry and its -wal/-shm files are root's alone (0600): an older version, or a
    permissive umask, left them readable by everyone. Only bits are removed, never added, so a
    write-protected registry stays write-protected."""
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = os.stat(file, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & ~0o600:
                os.chmod(file, stat.S_IMODE(st.st_mode) & 0o600)
        except FileNotFoundError:
            continue
        except OSError:
            continue  # a read-only file system: nothing to tighten there, and it is not ours to fix


# Primary SQLite result codes (the low byte of an extended one).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT = 5, 6, 8, 10, 11
SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 13, 14, 26


def primary_code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of `exc` (the low byte of its extended code; 0 if none)."""
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def sqlite_failure(exc: sqlite3.Error, path: Path, busy_timeout: float, read_only: str | None = None) -> RegistryError:
    """The named error, with what to do, for what SQLite reported about the registry at `path`."""
    code = primary_code(exc)
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return RegistryBusy(
            f"the registry {path} stayed locked by another process for more than {busy_timeout:g}s: "
            "retry, or give writers longer with ARTIFACTFS_DB_BUSY_TIMEOUT"
        )
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return RegistryError(
            f"the registry {path} is damaged ({exc}): restore it from a backup, or move it aside "
            "to start an empty registry (then add the repositories again)"
        )
    if code == SQLITE_READONLY or (read_only and code == SQLITE_CANTOPEN):
        why = f" ({read_only})" if read_only else ""
        return RegistryError(
            f"the registry {path} is read-only{why}: make it and its directory writable "
            f"(chmod u+w {path} {path.parent}) and retry"
        )
    if code == SQLITE_FULL or (code == SQLITE_IOERR and _disk_full(path)):
        return RegistryError(f"cannot write the registry {path}: its file system is full: free some space and retry")
    if code == SQLITE_CANTOPEN:
        return RegistryError(
            f"cannot open the registry {path}: it must be a file in a directory that exists "
            "(check ARTIFACTFS_ROOT or ARTIFACTFS_DATABASE_URL)"
        )
    return RegistryError(f"the registry {path} cannot be used: {exc}")


def _disk_full(path: Path) -> bool:
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < 64 * 1024


def _prepare_file(file: Path, busy_timeout: float) -> str | None:
    """Create a missing SQLite registry 0600 and tighten an existing one's mode (even a
    write-protected one's: that only takes bits away); why it must not be written, or None."""
    read_only = _write_protected(file)
    try:
        if read_only is None:
            SqliteRegistry._create(file)
        _tighten(file)
    except sqlite3.Error as exc:
        raise sqlite_failure(exc, file, busy_timeout, read_only) from None
    return read_only


class SqliteRegistry(Registry):
    def __init__(self, url: str, host: str, busy_timeout: float = 30.0) -> None:
        self.url = url
        self.host = host
        self.path = url.removeprefix("sqlite:///")
        self.busy_timeout = busy_timeout
        self._lock = threading.RLock()
        file = Path(self.path)
        self.read_only = _prepare_file(file, busy_timeout)
        with self._errors():
            self.conn = self._connect(file)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            if self.read_only is None:
                self._enable_wal()
                self.conn.execute("PRAGMA synchronous=NORMAL")
            self._check_schema()

    def _enable_wal(self) -> None:
        """Put the registry in WAL mode (persistent: once per file). The switch needs the file
        to itself, and SQLite answers SQLITE_BUSY at once, without its busy handler, while
        another process is opening the same new registry: so wait here, as the handler would."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if primary_code(exc) not in (SQLITE_BUSY, SQLITE_LOCKED) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @staticmethod
    def _create(file: Path) -> None:
        """Create a missing registry 0600 ourselves: SQLite would follow the umask."""
        try:
            os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise sqlite3.OperationalError("database or disk is full") from None
            raise sqlite3.OperationalError(f"unable to open database file: {exc.strerror}") from None

    def _connect(self, file: Path) -> sqlite3.Connection:
        if self.read_only is None:
            return sqlite3.connect(file, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        # Read-only: reads still work, writes fail with a clear error. With no write-ahead log
        # left over the file alone is the whole database: open it immutable, so that SQLite
        # creates nothing next to it (no -shm) where nothing may be written.
        wal = Path(f"{file}-wal")
        flags = "mode=ro" if wal.exists() and wal.stat().st_size else "mode=ro&immutable=1"
        return sqlite3.connect(
            f"file:{quote(str(file))}?{flags}", uri=True, timeout=self.busy_timeout, isolation_level=None,
            check_same_thread=False,
        )  # fmt: skip

    def _check_schema(self) -> None:
        """Create a new registry's schema (the first use only: that imports SQLAlchemy and
        Alembic); refuse one at another revision than this artifactfs's (schema.py)."""
        tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        recorded = None
        if schema.VERSION_TABLE in tables:
            row = self.conn.execute(f"SELECT version_num FROM {schema.VERSION_TABLE}").fetchone()
            recorded = row[0] if row else None
        schema.open_at(schema.revision_of(tables, recorded), self.path, self._create_schema)

    def _create_schema(self) -> None:
        if self.read_only is not None:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        schema.upgrade(self.url, self.host, self.busy_timeout)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as the named ones; IntegrityError stays itself (a version clash,
        which `append` retries)."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise sqlite_failure(exc, Path(self.path), self.busy_timeout, self.read_only) from None

    @contextmanager
    def _write(self) -> Iterator[SqliteTx]:
        # IMMEDIATE: take the write lock before reading, so a read-then-append never has to
        # upgrade a shared lock (which SQLite answers with SQLITE_BUSY at once, timeout or not).
        with self._lock, self._errors():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteTx(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    @contextmanager
    def _read(self) -> Iterator[SqliteTx]:
        with self._lock, self._errors():
            self.conn.execute("BEGIN")
            try:
                yield SqliteTx(self.conn)
            except BaseException:
                self._rollback()
                raise
            self.conn.execute("COMMIT")

    def _rollback(self) -> None:
        """End a failed transaction (a failed COMMIT may leave it open), so that the connection
        serves the next one; the error that got us here is the one to report."""
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _version_clash_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.IntegrityError,)

    def close(self) -> None:
        self.conn.close()


# --- any database through SQLAlchemy --------------------------------------------------------------


class SqlAlchemyTx(Tx):
    def __init__(self, conn: Any) -> None:
        from .tables import EventRow, RepoRow

        self.conn = conn
        self.events = EventRow.__table__  # type: ignore[attr-defined]
        self.repos = RepoRow.__table__  # type: ignore[attr-defined]

    def current_version(self, host: str, stream: str) -> int:
        from sqlalchemy import func, select

        c = self.events.c
        return self.conn.execute(
            select(func.coalesce(func.max(c.version), 0)).where(c.host == host, c.stream == stream)
        ).scalar_one()

    def seen(self, dedupe_keys: list[str]) -> set[str]:
        from sqlalchemy import select

        if not dedupe_keys:
            return set()
        rows = self.conn.execute(select(self.events.c.dedupe_key).where(self.events.c.dedupe_key.in_(dedupe_keys)))
        return {r[0] for r in rows}

    def insert_event(self, ev: EventRecord) -> int:
        values = {c: getattr(ev, c) for c in EVENT_COLUMNS if c != "id"}
        return int(self.conn.execute(self.events.insert().values(**values)).inserted_primary_key[0])

    def get_repo(self, host: str, name: str) -> RepoState | None:
        c = self.repos.c
        row = self.conn.execute(self.repos.select().where(c.host == host, c.name == name)).mappings().first()
        return RepoState(**row) if row else None

    def list_repos(self, host: str | None) -> list[RepoState]:
        c = self.repos.c
        query = self.repos.select().order_by(c.host, c.name)
        if host is not None:
            query = query.where(c.host == host)
        return [RepoState(**r) for r in self.conn.execute(query).mappings()]

    def put_repo(self, repo: RepoState) -> None:
        self.delete_repo(repo.host, repo.name)
        self.conn.execute(self.repos.insert().values(**asdict(repo)))

    def delete_repo(self, host: str, name: str) -> None:
        self.conn.execute(self.repos.delete().where(self.repos.c.host == host, self.repos.c.name == name))

    def list_events(self, host: str | None, stream: str | None, after: int) -> list[EventRecord]:
        c = self.events.c
        query = self.events.select().where(c.id > after).order_by(c.id)
        if host is not None:
            query = query.where(c.host == host)
        if stream is not None:
            query = query.where(c.stream == stream)
        return [EventRecord(**r) for r in self.conn.execute(query).mappings()]

    def position(self) -> int:
        from sqlalchemy import func, select

        return self.conn.execute(select(func.coalesce(func.max(self.events.c.id), 0))).scalar_one()


# SQLSTATE classes and codes (PostgreSQL) worth retrying: the connection, a lock wait that ran
# out (lock_timeout), a server shutting down or starting, serialization failures and deadlocks.
RETRYABLE_SQLSTATES = ("08", "55P03", "57P01", "57P02", "57P03", "40001", "40P01")


def sqlalchemy_failure(exc: Exception, url: str, busy_timeout: float) -> RegistryError:
    """The named error for what SQLAlchemy (or its driver) reported about the database at `url`."""
    from sqlalchemy import exc as sa

    shown = redact(url)
    orig = getattr(exc, "orig", None)
    if isinstance(orig, sqlite3.Error) and url.startswith("sqlite:///"):
        return sqlite_failure(orig, Path(url.removeprefix("sqlite:///")), busy_timeout)
    detail = redact(str(orig if orig is not None else exc)).strip().splitlines()
    reason = detail[0] if detail else type(exc).__name__
    if isinstance(exc, (sa.ArgumentError, sa.NoSuchModuleError)):
        return RegistryError(f"ARTIFACTFS_DATABASE_URL {shown} is not a database URL SQLAlchemy can use ({reason})")
    sqlstate = getattr(orig, "sqlstate", None) or ""
    retryable = sqlstate.startswith(RETRYABLE_SQLSTATES) or (
        not sqlstate and isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.TimeoutError))
    )
    if retryable:
        return RegistryBusy(
            f"the registry database {shown} did not answer, or stayed locked, within {busy_timeout:g}s "
            f"({reason}): check that the server is up and retry"
        )
    return RegistryError(f"the registry database {shown} cannot be used: {reason}")


class SqlAlchemyRegistry(Registry):
    def __init__(self, url: str, host: str, busy_timeout: float = 30.0) -> None:
        self.url = url
        self.host = host
        self.busy_timeout = busy_timeout
        if url.startswith("sqlite:///"):
            _prepare_file(Path(url.removeprefix("sqlite:///")), busy_timeout)
        with self._errors():
            from sqlmodel import create_engine

            from . import tables  # noqa: F401  (registers the tables)

            self.engine = create_engine(url, pool_pre_ping=True, connect_args=self._connect_args(url))
            self._check_schema()

    def _check_schema(self) -> None:
        """Create a new database's schema; refuse one at another revision (schema.py). A database
        at the newest revision gets no DDL at all: a role with data access alone opens it."""
        with self.engine.connect() as conn:
            revision = schema.current_revision(conn)
        schema.open_at(revision, redact(self.url), lambda: schema.upgrade(self.url, self.host, self.busy_timeout))

    def _connect_args(self, url: str) -> dict[str, Any]:
        """How long to wait for the server, and for a lock, before giving up (the busy timeout)."""
        if url.startswith("sqlite"):
            return {"timeout": self.busy_timeout}
        if url.startswith("postgresql"):
            ms = int(self.busy_timeout * 1000)
            return {"connect_timeout": max(1, round(self.busy_timeout)), "options": f"-c lock_timeout={ms}"}
        return {}

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Database errors as the named ones; IntegrityError stays itself (a version clash,
        which `append` retries)."""
        from sqlalchemy import exc as sa

        try:
            yield
        except sa.IntegrityError:
            raise
        except (sa.SQLAlchemyError, sa.DBAPIError) as exc:
            raise sqlalchemy_failure(exc, self.url, self.busy_timeout) from None
        except ModuleNotFoundError as exc:
            raise RegistryError(
                f"the registry database {redact(self.url)} needs the Python module {exc.name!r}: "
                "install it (for PostgreSQL: pip install 'artifactfs[postgres]')"
            ) from None

    @contextmanager
    def _write(self) -> Iterator[SqlAlchemyTx]:
        with self._errors(), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Positions in commit order (see the top of this module): one append at a time.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})")
            yield SqlAlchemyTx(conn)

    @contextmanager
    def _read(self) -> Iterator[SqlAlchemyTx]:
        with self._errors(), self.engine.connect() as conn:
            yield SqlAlchemyTx(conn)

    def _version_clash_errors(self) -> tuple[type[BaseException], ...]:
        from sqlalchemy.exc import IntegrityError

        return (IntegrityError,)

    def close(self) -> None:
        self.engine.dispose()


def migrate_registry(url: str, host: str, busy_timeout: float) -> list[str]:
    """Bring the registry at `url` to the newest schema (`artifactfs migrate`); the revisions
    applied. A new SQLite registry is created 0600 first, as opening one would."""
    if url.startswith("sqlite:///"):
        file = Path(url.removeprefix("sqlite:///"))
        read_only = _prepare_file(file, busy_timeout)
        if read_only is not None:
            raise sqlite_failure(sqlite3.OperationalError("attempt to write a readonly database"), file, busy_timeout,
                                 read_only)  # fmt: skip
    return schema.upgrade(url, host, busy_timeout)


def open_registry(url: str, *, host: str | None = None, driver: str = "auto", busy_timeout: float | None = None) -> Registry:
    """The registry at `url`, as host `host` sees it (by default ARTIFACTFS_HOST's): the
    standard-library driver for SQLite files, SQLAlchemy otherwise.

    `busy_timeout` is how long a writer waits for another one's lock (and, for a server, for a
    connection) before RegistryBusy; by default ARTIFACTFS_DB_BUSY_TIMEOUT's.
    """
    if busy_timeout is None or host is None:
        from .config import load_settings

        settings = load_settings()
        busy_timeout = settings.db_busy_timeout if busy_timeout is None else busy_timeout
        host = settings.host if host is None else host
    if driver == "sqlalchemy" or (driver == "auto" and not url.startswith("sqlite:///")):
        return SqlAlchemyRegistry(url, host, busy_timeout)
    return SqliteRegistry(url, host, busy_timeout)
