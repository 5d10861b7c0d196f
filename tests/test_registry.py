"""The registry through each driver, against real databases (a SQLite file; a throwaway
PostgreSQL server): concurrent writers, rebuilds, idempotent appends, and one driver reading what
the other wrote."""
from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from artifactfs.model import (
    ConcurrencyConflict,
    DuplicateRepo,
    EventRecord,
    EventType,
    NewEvent,
    PrepareState,
    RepoState,
)
from artifactfs.registry import Registry, open_registry
from artifactfs.tables import EventRow, RepoRow

from .postgres import PostgresServer

DRIVERS = ["sqlite", "sqlalchemy", "postgresql"]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def url_for(driver: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], str]:
    """A fresh, empty registry URL for the driver under test: SQLite files, or PostgreSQL."""
    if driver == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.new_database
    return lambda: f"sqlite:///{tmp_path / 'registry.db'}"


def open_for(driver: str, url: str) -> Registry:
    return open_registry(url, driver="sqlite" if driver == "sqlite" else "sqlalchemy")


def dump(repo: RepoState) -> dict[str, object]:
    data = dataclasses.asdict(repo)
    data.pop("registered_at"), data.pop("updated_at")
    return data


def registered(name: str) -> NewEvent:
    return NewEvent(
        EventType.REGISTERED,
        {"remote_url": f"file:///srv/{name}.git", "ref": "refs/heads/main", "mount_path": f"/mnt/{name}",
         "git_dir": f"/var/lib/artifactfs/git/{name}.git", "attempt": 1},
    )  # fmt: skip


def register(registry: Registry, name: str) -> None:
    def decide(repo: RepoState | None) -> list[NewEvent]:
        if repo is not None:
            raise DuplicateRepo(name)
        return [registered(name)]

    registry.append(name, decide)


def _writer(url: str, driver: str, worker: int, count: int) -> None:
    registry = open_for(driver, url)
    for i in range(count):
        # Half the appends go to one shared stream, half to the writer's own.
        stream = "shared" if i % 2 == 0 else f"own-{worker}"
        event = NewEvent(EventType.PHASE, {"phase": "clone", "writer": worker, "i": i})
        registry.append(stream, lambda _repo, event=event: [event])
    registry.close()


def test_concurrent_writers_never_see_database_locked(url_for: Callable[[], str], driver: str) -> None:
    url = url_for()
    open_for(driver, url).close()  # create the schema once
    writers, per_writer = 6, 40
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, driver, w, per_writer)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, "a writer failed (database is locked?)"
    registry = open_for(driver, url)
    events = registry.events()
    assert len(events) == writers * per_writer
    by_stream: dict[str, list[int]] = {}
    for ev in events:
        by_stream.setdefault(ev.stream, []).append(ev.version)
    assert len(by_stream["shared"]) == writers * per_writer // 2
    for stream, versions in by_stream.items():
        # Unique and gapless per stream, in log order.
        assert versions == list(range(1, len(versions) + 1)), stream
    positions = [ev.id for ev in events]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


def test_projection_equals_fold_of_the_log(url_for: Callable[[], str], driver: str) -> None:
    registry = open_for(driver, url_for())
    register(registry, "alpha")
    register(registry, "beta")
    register(registry, "gamma")
    registry.append("alpha", lambda _r: [NewEvent(EventType.PHASE, {"phase": "clone"}), NewEvent(EventType.READY, {"head": "a" * 40})])
    registry.append("beta", lambda _r: [NewEvent(EventType.FAILED, {"error": "remote hung up"})])
    registry.append("beta", lambda _r: [NewEvent(EventType.PREPARE_REQUESTED, {"attempt": 2})])
    registry.append("gamma", lambda _r: [NewEvent(EventType.REMOVED, {})])
    register(registry, "gamma")  # the name is free again after removal
    registry.append("gamma", lambda _r: [NewEvent(EventType.READY, {"head": "c" * 40})])

    def snapshot() -> dict[str, dict[str, object]]:
        return {r.name: dump(r) for r in registry.repos()}

    live = snapshot()
    assert live["alpha"]["prepare_state"] == PrepareState.READY.value and live["alpha"]["head"] == "a" * 40
    assert live["beta"]["prepare_state"] == PrepareState.PREPARING.value
    assert live["beta"]["prepare_attempt"] == 2 and live["beta"]["prepare_error"] is None
    assert live["gamma"]["head"] == "c" * 40
    folded = {name: dump(r) for name, r in registry.folded().items()}
    assert folded == live
    # Throw the projection away and rebuild it from the log alone.
    registry.rebuild()
    assert snapshot() == live


def test_duplicate_registration_is_refused_atomically(url_for: Callable[[], str], driver: str) -> None:
    registry = open_for(driver, url_for())
    register(registry, "alpha")
    with pytest.raises(DuplicateRepo):
        register(registry, "alpha")
    assert [e.type for e in registry.events("alpha")] == ["registered"]


def test_dedupe_key_makes_redelivered_appends_no_ops(url_for: Callable[[], str], driver: str) -> None:
    registry = open_for(driver, url_for())
    register(registry, "alpha")
    ready = NewEvent(EventType.READY, {"head": "b" * 40}, job_id="job-1", dedupe_key="job-1:ready")
    assert len(registry.append("alpha", lambda _r: [ready])) == 1
    assert registry.append("alpha", lambda _r: [ready]) == []
    assert [e.type for e in registry.events("alpha")] == ["registered", "ready"]


def test_expected_version_detects_a_concurrent_writer(url_for: Callable[[], str], driver: str) -> None:
    registry = open_for(driver, url_for())
    register(registry, "alpha")
    registry.append("alpha", lambda _r: [NewEvent(EventType.PHASE, {"phase": "clone"})], expected_version=1)
    with pytest.raises(ConcurrencyConflict):
        registry.append("alpha", lambda _r: [NewEvent(EventType.PHASE, {"phase": "index"})], expected_version=1)


def test_tables_have_exactly_the_record_fields() -> None:
    repo_columns = {c.name for c in RepoRow.__table__.columns}  # type: ignore[attr-defined]
    event_columns = {c.name for c in EventRow.__table__.columns}  # type: ignore[attr-defined]
    assert repo_columns == {f.name for f in dataclasses.fields(RepoState)}
    assert event_columns == {f.name for f in dataclasses.fields(EventRecord)}


def test_drivers_read_each_others_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    lean, orm = open_registry(url, driver="sqlite"), open_registry(url, driver="sqlalchemy")
    register(lean, "alpha")
    orm.append("alpha", lambda _r: [NewEvent(EventType.READY, {"head": "d" * 40}, job_id="j")])
    register(orm, "beta")
    assert [dump(r) for r in lean.repos()] == [dump(r) for r in orm.repos()]
    assert [(e.id, e.stream, e.version, e.type, e.payload, e.created_at) for e in lean.events()] == [
        (e.id, e.stream, e.version, e.type, e.payload, e.created_at) for e in orm.events()
    ]
    assert lean.get("alpha").head == "d" * 40  # type: ignore[union-attr]


def test_a_projection_of_an_older_shape_is_rebuilt_from_the_log(url_for: Callable[[], str], driver: str) -> None:
    url = url_for()
    registry = open_for(driver, url)
    register(registry, "alpha")
    registry.append("alpha", lambda _r: [NewEvent(EventType.READY, {"head": "e" * 40})])
    expected = [dump(r) for r in registry.repos()]
    registry.close()
    # An older version of the projection: a column fewer, rows gone.
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE repos"))
        conn.execute(text("CREATE TABLE repos (name VARCHAR PRIMARY KEY, remote_url VARCHAR)"))
    engine.dispose()
    reopened = open_for(driver, url)
    assert [dump(r) for r in reopened.repos()] == expected
    register(reopened, "beta")  # and it takes writes again
    assert [r.name for r in reopened.repos()] == ["alpha", "beta"]
