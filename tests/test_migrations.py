"""Schema migrations (Alembic): the newest revision makes exactly the tables the code uses, and a
registry made by release 0.1.0, which predates migrations, is upgraded by `artifactfs migrate`
with nothing of its log lost, on SQLite and on PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from artifactfs import schema
from artifactfs.model import DuplicateRepo, EventType, NewEvent, RegistryError
from artifactfs.registry import open_registry

from .postgres import PostgresServer
from .test_registry import register, registered

ROOT = Path(__file__).resolve().parent.parent
OLD_HOST = "old-host"


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.new_database
    return lambda: f"sqlite:///{tmp_path / 'registry.db'}"


def release_0_1_tables() -> sa.MetaData:
    """The tables as release 0.1.0 created them (with SQLAlchemy's create_all), before migrations."""
    meta = sa.MetaData()
    time = sa.DateTime(timezone=True)
    sa.Table(
        "events", meta,
        sa.Column("id", sa.Integer, primary_key=True), sa.Column("stream", sa.String, nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False), sa.Column("type", sa.String, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False), sa.Column("created_at", time, nullable=False),
        sa.Column("job_id", sa.String, index=True), sa.Column("dedupe_key", sa.String),
        sa.UniqueConstraint("stream", "version", name="uq_events_stream_version"),
        sa.UniqueConstraint("dedupe_key", name="uq_events_dedupe_key"),
    )  # fmt: skip
    sa.Table(
        "repos", meta,
        sa.Column("name", sa.String, primary_key=True), sa.Column("remote_url", sa.String, nullable=False),
        sa.Column("ref", sa.String, nullable=False), sa.Column("mount_path", sa.String, nullable=False),
        sa.Column("git_dir", sa.String, nullable=False), sa.Column("fetch_ref", sa.String),
        sa.Column("prepared_gitdir", sa.Boolean, nullable=False), sa.Column("asynchronous", sa.Boolean, nullable=False),
        sa.Column("prepare_state", sa.String, nullable=False), sa.Column("prepare_phase", sa.String),
        sa.Column("prepare_error", sa.String), sa.Column("prepare_attempt", sa.Integer, nullable=False),
        sa.Column("attempt_started_at", time), sa.Column("attempt_version", sa.Integer, nullable=False),
        sa.Column("head", sa.String), sa.Column("owner_uid", sa.Integer), sa.Column("owner_gid", sa.Integer),
        sa.Column("blob_filter", sa.String, nullable=False), sa.Column("version", sa.Integer, nullable=False),
        sa.Column("registered_at", time, nullable=False), sa.Column("updated_at", time, nullable=False),
    )  # fmt: skip
    return meta


def make_release_0_1_registry(url: str) -> None:
    """A registry as 0.1.0 left it: alpha ready, beta failed, gamma removed, and its projection."""
    now = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    log = [
        ("alpha", 1, "registered", registered("alpha").payload, None),
        ("alpha", 2, "ready", {"head": "a" * 40}, "prepare:alpha:1:ready"),
        ("beta", 1, "registered", registered("beta").payload, None),
        ("beta", 2, "failed", {"error": "remote unreachable"}, "prepare:beta:1:failed"),
        ("gamma", 1, "registered", registered("gamma").payload, None),
        ("gamma", 2, "removed", {}, None),
    ]
    meta = release_0_1_tables()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        meta.create_all(conn)
        events, repos = meta.tables["events"], meta.tables["repos"]
        for stream, version, kind, payload, key in log:
            conn.execute(events.insert().values(stream=stream, version=version, type=kind, payload=payload,
                                                created_at=now, dedupe_key=key))  # fmt: skip
        row = dict(registered("alpha").payload, name="alpha", asynchronous=True, prepared_gitdir=False,
                   prepare_state="ready", prepare_attempt=1, attempt_version=1, head="a" * 40, blob_filter="blob:none",
                   version=2, registered_at=now, updated_at=now)  # fmt: skip
        row.pop("attempt")
        conn.execute(repos.insert().values(**row))  # beta's row is missing: the migration folds the log anew
    engine.dispose()


Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def artifactfs(tmp_path: Path) -> Cli:
    """The CLI on registry `url` as host `host` sees it."""

    def run(url: str, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, ARTIFACTFS_DATABASE_URL=url, ARTIFACTFS_HOST=host, PYTHONPATH=str(ROOT),
                   ARTIFACTFS_ROOT=str(tmp_path / "afs"))  # fmt: skip
        return subprocess.run([sys.executable, "-m", "artifactfs.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    return run


def test_head_is_the_newest_migration_and_known_lists_them_in_order() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(schema.MIGRATIONS))
    scripts = ScriptDirectory.from_config(config)
    assert scripts.get_heads() == [schema.HEAD]
    assert [s.revision for s in reversed(list(scripts.walk_revisions()))] == list(schema.KNOWN)


def test_a_new_registry_has_exactly_the_schema_of_the_tables(new_url: Callable[[], str]) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    from artifactfs import tables  # noqa: F401 - registers the tables

    url = new_url()
    open_registry(url, host="h").close()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
        revision = schema.current_revision(conn)
    engine.dispose()
    assert diff == [] and revision == schema.HEAD


def test_a_release_0_1_registry_waits_for_migrate_then_keeps_its_whole_log(new_url: Callable[[], str], artifactfs: Cli) -> None:
    url = new_url()
    make_release_0_1_registry(url)
    with pytest.raises(RegistryError, match=r"older artifactfs \(revision 0001.*run `artifactfs migrate`"):
        open_registry(url, host=OLD_HOST)
    refused = artifactfs(url, OLD_HOST, "status")
    assert refused.returncode == 1 and "run `artifactfs migrate`" in refused.stderr

    done = artifactfs(url, OLD_HOST, "migrate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"migrated the registry to revision {schema.HEAD} (applied {', '.join(schema.KNOWN[1:])})"
    again = artifactfs(url, OLD_HOST, "migrate")
    assert again.stdout.strip() == f"the registry is at revision {schema.HEAD}: nothing to migrate"

    registry = open_registry(url, host=OLD_HOST)
    try:
        # What 0.1.0 registered belongs to the host that migrated, with its whole log.
        repos = {r.name: r for r in registry.repos()}
        assert set(repos) == {"alpha", "beta"}
        assert repos["alpha"].state.value == "ready" and repos["alpha"].head == "a" * 40
        assert repos["beta"].state.value == "failed" and repos["beta"].prepare_error == "remote unreachable"
        assert {r.host for r in repos.values()} == {OLD_HOST}
        events = registry.events(all_hosts=True)
        assert [(e.host, e.stream, e.version, e.type) for e in events] == [
            (OLD_HOST, "alpha", 1, "registered"), (OLD_HOST, "alpha", 2, "ready"),
            (OLD_HOST, "beta", 1, "registered"), (OLD_HOST, "beta", 2, "failed"),
            (OLD_HOST, "gamma", 1, "registered"), (OLD_HOST, "gamma", 2, "removed"),
        ]  # fmt: skip
        # And it takes appends again: versions go on, and a name is unique per host only.
        registry.append("beta", lambda _r: [NewEvent(EventType.PREPARE_REQUESTED, {"attempt": 2})])
        assert registry.require("beta").version == 3
        register(registry.for_host("new-host"), "alpha")
        with pytest.raises(DuplicateRepo):
            register(registry, "alpha")
        assert [(r.host, r.version) for r in registry.repos(all_hosts=True) if r.name == "alpha"] == [
            ("new-host", 1), (OLD_HOST, 2)]  # fmt: skip
    finally:
        registry.close()


def test_a_registry_migrated_by_a_newer_release_is_refused(new_url: Callable[[], str], artifactfs: Cli) -> None:
    url = new_url()
    open_registry(url, host="h").close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(RegistryError, match=r"newer artifactfs \(revision 0099.*upgrade artifactfs on this host"):
        open_registry(url, host="h")
    refused = artifactfs(url, "h", "migrate")
    assert refused.returncode == 1 and "newer artifactfs" in refused.stderr
