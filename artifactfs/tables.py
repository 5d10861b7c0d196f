"""The database schema, as SQLModel tables: the append-only `events` log and the `repos`
projection. Their columns are exactly the fields of model.EventRecord and model.RepoState."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from .model import PrepareState, utcnow


class EventRow(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("stream", "version", name="uq_events_stream_version"),
        UniqueConstraint("dedupe_key", name="uq_events_dedupe_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    stream: str = Field(index=True)
    version: int
    type: str
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    job_id: str | None = Field(default=None, index=True)
    dedupe_key: str | None = None


class RepoRow(SQLModel, table=True):
    __tablename__ = "repos"

    name: str = Field(primary_key=True)
    remote_url: str
    ref: str
    mount_path: str
    git_dir: str
    fetch_ref: str | None = None
    prepared_gitdir: bool = False
    asynchronous: bool = False
    prepare_state: str = PrepareState.PREPARING.value
    prepare_phase: str | None = None
    prepare_error: str | None = None
    prepare_attempt: int = 1
    attempt_started_at: datetime | None = None
    attempt_version: int = 0
    head: str | None = None
    owner_uid: int | None = None
    owner_gid: int | None = None
    blob_filter: str = "blob:none"
    version: int = 0
    registered_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


def schema_ddl(dialect: Any) -> list[str]:
    """The statements that create every table and index, each IF NOT EXISTS: the one place the
    schema is turned into DDL. Checking first and creating after (SQLAlchemy's create_all) races
    when two processes open a new registry at once, and the loser fails with "already exists"."""
    from sqlalchemy.schema import CreateIndex, CreateTable

    statements = []
    for table in SQLModel.metadata.sorted_tables:
        statements.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)))
        statements += [str(CreateIndex(i, if_not_exists=True).compile(dialect=dialect)) for i in table.indexes]
    return statements
