"""The database schema, as SQLModel tables: the append-only `events` log and the `repos`
projection. Their columns are exactly the fields of model.EventRecord and model.RepoState.

This is the schema as the newest migration (artifactfs/migrations) leaves it: a change here is
made by a new migration, never by these classes alone (tests/test_migrations.py compares them)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from .model import HistoryState, PrepareState, utcnow


class EventRow(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("host", "stream", "version", name="uq_events_host_stream_version"),
        UniqueConstraint("dedupe_key", name="uq_events_dedupe_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    host: str
    stream: str = Field(index=True)
    version: int
    type: str
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    job_id: str | None = Field(default=None, index=True)
    dedupe_key: str | None = None


class RepoRow(SQLModel, table=True):
    __tablename__ = "repos"

    host: str = Field(primary_key=True)
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
    filter_fallback: bool = False
    require_commit: str | None = None
    depth: int | None = None
    refresh_seconds: float | None = None
    refreshed_at: datetime | None = None
    refresh_outcome: str | None = None
    history: str = HistoryState.COMPLETE.value
    ready_at: datetime | None = None
    history_seconds: float | None = None
    version: int = 0
    registered_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

