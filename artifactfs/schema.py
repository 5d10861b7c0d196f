"""The registry's schema over time: which revision a database is at, and bringing it to the newest.

Every change of the schema is an Alembic migration (artifactfs/migrations/versions). A registry
records its revision in `alembic_version`; one made by release 0.1.0, which predates migrations,
has the tables and no such record, and counts as revision 0001.

Opening a registry checks its revision (one query; no Alembic import): a new, empty database is
created at the newest revision at once, while one at an older revision is refused until someone
runs `artifactfs migrate` (`artifactfs up` does), so that no host of a fleet changes the shared
schema behind the others' backs. The upgrade runs in one transaction under a lock that every
process takes (PostgreSQL: an advisory lock; SQLite: the write lock, BEGIN IMMEDIATE), and checks
the revision again once it holds it: two hosts starting at once upgrade once. The projection is
folded anew from the log in the same transaction: the log is the truth, whatever shape the
projection had before.
"""
from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model import RegistryError
from .remotes import redact

KNOWN = ("0001", "0002", "0003", "0004")  # every revision in migrations/versions, oldest first (tests/test_migrations.py checks)
HEAD = KNOWN[-1]
BASELINE = KNOWN[0]  # the schema of release 0.1.0
MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"


class SchemaState(str, enum.Enum):
    EMPTY = "empty"  # a new database: create the schema
    CURRENT = "current"
    BEHIND = "behind"  # an older artifactfs made it: `artifactfs migrate`
    AHEAD = "ahead"  # a newer artifactfs migrated it: upgrade this host


def revision_of(tables: set[str], recorded: str | None) -> str | None:
    """The revision of a database with these tables and this alembic_version (None: empty)."""
    if recorded is not None:
        return recorded
    return BASELINE if "events" in tables else None


def state_of(revision: str | None) -> SchemaState:
    if revision is None:
        return SchemaState.EMPTY
    if revision == HEAD:
        return SchemaState.CURRENT
    return SchemaState.BEHIND if revision in KNOWN else SchemaState.AHEAD


def refuse(state: SchemaState, revision: str | None, where: str) -> None:
    """Raise the error that tells the operator what to do with a registry not at HEAD (EMPTY and
    CURRENT pass)."""
    if state is SchemaState.BEHIND:
        raise RegistryError(
            f"the registry {where} has the schema of an older artifactfs (revision {revision}, this one "
            f"needs {HEAD}): run `artifactfs migrate` (`artifactfs up` runs it)"
        )
    if state is SchemaState.AHEAD:
        raise RegistryError(
            f"the registry {where} was migrated by a newer artifactfs (revision {revision}, unknown to this "
            "one): upgrade artifactfs on this host"
        )


def open_at(revision: str | None, where: str, create: Callable[[], object]) -> None:
    """What opening a registry at `revision` does: refuse it unless it is at HEAD, or `create` the
    schema of a new, empty one."""
    state = state_of(revision)
    refuse(state, revision, where)
    if state is SchemaState.EMPTY:
        create()


def current_revision(conn: Any) -> str | None:
    """The revision of the database behind a SQLAlchemy connection."""
    from sqlalchemy import inspect, text

    tables = set(inspect(conn).get_table_names())
    recorded = None
    if VERSION_TABLE in tables:
        recorded = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    return revision_of(tables, recorded)


def _engine(url: str, busy_timeout: float) -> Any:
    from sqlalchemy import create_engine, event

    if not url.startswith("sqlite"):
        connect: dict[str, Any] = {}
        if url.startswith("postgresql"):
            connect = {"connect_timeout": max(1, round(busy_timeout))}
        return create_engine(url, connect_args=connect)
    # The standard library's sqlite3 opens no transaction for DDL: take the write lock ourselves,
    # so that the whole upgrade is one transaction and one process at a time.
    engine = create_engine(url, connect_args={"isolation_level": None, "timeout": busy_timeout})

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade(url: str, host: str, busy_timeout: float) -> list[str]:
    """Bring the registry at `url` to HEAD and fold its projection anew; the revisions applied
    ([] if it was current). Rows made before hosts existed become `host`'s."""
    from sqlalchemy.exc import SQLAlchemyError

    from .registry import sqlalchemy_failure

    # Alembic reports every step at INFO: the outcome is the command's to tell, in one line.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return _upgrade(url, host, busy_timeout)
    except SQLAlchemyError as exc:
        raise sqlalchemy_failure(exc, url, busy_timeout) from None


def _upgrade(url: str, host: str, busy_timeout: float) -> list[str]:
    from alembic import command
    from alembic.config import Config

    from .registry import Registry, SqlAlchemyTx

    engine = _engine(url, busy_timeout)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('artifactfs schema'))")
            before = current_revision(conn)
            state = state_of(before)
            if state is SchemaState.CURRENT:
                return []
            if state is SchemaState.AHEAD:
                refuse(state, before, redact(url))
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes.update(connection=conn, host=host)
            command.upgrade(config, "head")
            Registry._refold(SqlAlchemyTx(conn))
            start = 0 if before is None else KNOWN.index(before) + 1
            return list(KNOWN[start:])
    finally:
        engine.dispose()
