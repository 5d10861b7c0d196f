"""The registry through each driver, against real databases (a SQLite file; a throwaway
PostgreSQL server): concurrent writers, rebuilds, idempotent appends, and one driver reading what
the other wrote; and every way a registry can be unusable, as one named error."""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import socket
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest

from artifactfs.model import (
    ConcurrencyConflict,
    DuplicateRepo,
    EventRecord,
    EventType,
    NewEvent,
    PrepareState,
    RegistryBusy,
    RegistryError,
    RepoState,
)
from artifactfs.registry import Registry, open_registry
from artifactfs.tables import EventRow, RepoRow

from .conftest import Artifactfs, new_installation
from .gitremote import SampleRepo
from .postgres import PostgresServer  # the type of the `postgres` fixture
from .test_cli_errors import footprint

DRIVERS = ["sqlite", "sqlalchemy", "postgresql"]


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def url_for(driver: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], str]:
    """A fresh, empty registry URL for the driver under test: SQLite files, or PostgreSQL."""
    if driver == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.new_database
    fresh = itertools.count()
    return lambda: f"sqlite:///{tmp_path / f'registry-{next(fresh)}.db'}"


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


def _open_at_once(url: str, driver: str, ready: Any, go: Any, report: Any) -> None:
    from artifactfs import registry  # noqa: F401 - imported before the start, to meet the others there

    ready.put(os.getpid())
    go.wait(60)
    try:
        registry = open_for(driver, url)
        register(registry, f"r{os.getpid()}")
        registry.close()
        report.put("ok")
    except Exception as exc:  # noqa: BLE001 - the message is the result
        report.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_registry_at_once_all_succeed(url_for: Callable[[], str], driver: str) -> None:
    # A daemon and a CLI command meeting a registry that does not exist yet: before the schema
    # was created IF NOT EXISTS under a lock, the loser failed with "table events already exists";
    # before the switch to WAL waited for the file, a loser failed at once with "locked". Each
    # round starts the openers together, once every one has its imports done.
    ctx = multiprocessing.get_context("spawn")
    for _round in range(4):
        url = url_for()
        ready, go, report = ctx.Queue(), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(url, driver, ready, go, report)) for _ in range(4)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        go.set()
        results = [report.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        assert results == ["ok"] * len(procs)
        assert len(open_for(driver, url).repos()) == len(procs)


def test_a_role_with_data_access_alone_opens_a_registry_an_administrator_made(postgres: PostgresServer) -> None:
    import psycopg

    url = postgres.new_database()
    open_registry(url, driver="sqlalchemy").close()  # the administrator makes the tables
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname={database}", autocommit=True) as conn:
        conn.execute("CREATE ROLE afs_app LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO afs_app")
        conn.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO afs_app")
    # Opening issues no DDL for tables that exist: it needs no right to create or own them.
    registry = open_registry(url.replace("postgres@", "afs_app@"), driver="sqlalchemy")
    try:
        register(registry, "app")
        assert [r.name for r in registry.repos()] == ["app"]
    finally:
        registry.close()


def _slow_committer(url: str, driver: str, host: str, count: int, go: Any) -> None:
    """A host's writer whose transactions stay open a while after their insert, so that commits
    come in another order than positions would if nothing kept them in line."""
    import random
    import time

    from artifactfs import registry as registry_module

    for tx_class in (registry_module.SqlAlchemyTx, registry_module.SqliteTx):
        insert = tx_class.insert_event

        def held_insert(self: Any, ev: Any, insert: Any = insert) -> int:
            position = insert(self, ev)
            time.sleep(random.uniform(0, 0.02))
            return position

        tx_class.insert_event = held_insert  # type: ignore[method-assign]
    registry = open_registry(url, host=host, driver="sqlite" if driver == "sqlite" else "sqlalchemy")
    go.wait(60)
    for i in range(count):
        event = NewEvent(EventType.PHASE, {"phase": "clone", "i": i})
        registry.append(f"repo-{i % 3}", lambda _repo, event=event: [event])
    registry.close()


def test_a_follower_by_position_misses_no_event_of_concurrent_hosts(url_for: Callable[[], str], driver: str) -> None:
    # Positions come from a sequence when a row is inserted; commits come when they come. A
    # follower that has read up to position N must never find a smaller one committed later.
    url = url_for()
    follower = open_for(driver, url)
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    hosts, per_host = 4, 40
    procs = [ctx.Process(target=_slow_committer, args=(url, driver, f"host-{h}", per_host, go)) for h in range(hosts)]
    for p in procs:
        p.start()
    go.set()
    followed: list[int] = []
    position = 0
    while any(p.is_alive() for p in procs) or position < follower.position():
        for ev in follower.events(after=position, all_hosts=True):
            followed.append(ev.id)  # type: ignore[arg-type]
            position = ev.id  # type: ignore[assignment]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    everything = [ev.id for ev in follower.events(all_hosts=True)]
    follower.close()
    assert len(everything) == hosts * per_host
    assert followed == everything, f"the follower missed {len(set(everything) - set(followed))} events"


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
    folded = {name: dump(r) for (_host, name), r in registry.folded().items()}
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


# --- errors: one named error, one line, naming the file --------------------------------------


def test_registry_files_are_root_only_even_under_a_permissive_umask(tmp_path: Path, driver: str) -> None:
    if driver == "postgresql":
        pytest.skip("a server's files are the server's")
    db = tmp_path / "registry.db"
    old = os.umask(0o022)
    try:
        registry = open_for(driver, f"sqlite:///{db}")
        register(registry, "alpha")  # a write: in WAL mode the -wal and -shm exist now
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert "registry.db" in modes and set(modes.values()) == {0o600}, modes
        if driver == "sqlite":
            assert set(modes) == {"registry.db", "registry.db-wal", "registry.db-shm"}
        registry.close()
    finally:
        os.umask(old)


def test_a_registry_left_world_readable_is_tightened_on_open(afs: Artifactfs) -> None:
    afs.run("list-repos")
    db = afs.root / "registry.db"
    extra = [Path(f"{db}-wal"), Path(f"{db}-shm")]
    for path in extra:
        path.write_bytes(b"")  # as an older version's crash would leave them
    for path in (db, *extra):
        os.chmod(path, 0o644)
    afs.run("list-repos")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for path in extra:
        assert not path.exists() or stat.S_IMODE(path.stat().st_mode) == 0o600
    # Tightening never grants: a write-protected registry stays write-protected.
    os.chmod(db, 0o444)
    afs.run("list-repos")
    assert stat.S_IMODE(db.stat().st_mode) == 0o400


def _one_line(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("artifactfs: error: "), line
    for text in expected:
        assert text in line, line
    return line


def test_a_write_protected_registry_still_reads_and_refuses_writes(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("existing", sample.url)
    db = afs.root / "registry.db"
    os.chmod(db, 0o444)
    assert afs.run("list-repos").stdout.startswith("existing\t")  # reads need no write
    before = footprint(afs)
    _one_line(afs.run("add-repo", "--name", "new", "--remote", sample.url, check=False),
              f"the registry {db} is read-only", "mode 0400", "chmod u+w")  # fmt: skip
    _one_line(afs.run("remove-repo", "--name", "existing", check=False), "read-only")
    assert footprint(afs) == before


def test_a_registry_in_a_write_protected_directory_refuses_writes(afs: Artifactfs, sample: SampleRepo, tmp_path: Path) -> None:
    directory = tmp_path / "registry"
    directory.mkdir()
    afs.env["ARTIFACTFS_DATABASE_URL"] = f"sqlite:///{directory / 'registry.db'}"
    afs.add("existing", sample.url)
    os.chmod(directory, 0o555)
    try:
        _one_line(afs.run("add-repo", "--name", "new", "--remote", sample.url, check=False),
                  f"the registry {directory / 'registry.db'} is read-only", "its directory is write-protected")  # fmt: skip
        assert sorted(os.listdir(directory)) == ["registry.db"]
        assert afs.run("list-repos").stdout.startswith("existing\t")
    finally:
        os.chmod(directory, 0o700)


def test_a_registry_locked_beyond_the_busy_timeout(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("existing", sample.url)
    db = afs.root / "registry.db"
    afs.env["ARTIFACTFS_DB_BUSY_TIMEOUT"] = "1"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer that does not let go
    try:
        _one_line(afs.run("add-repo", "--name", "new", "--remote", sample.url, check=False),
                  f"the registry {db} stayed locked", "more than 1s", "ARTIFACTFS_DB_BUSY_TIMEOUT")  # fmt: skip
        assert afs.run("list-repos").stdout.startswith("existing\t")  # readers are not blocked
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [r.name for r in open_registry(f"sqlite:///{db}", host=afs.env["ARTIFACTFS_HOST"]).repos()] == ["existing"]
    assert not (afs.root / "git" / "new.git").exists() and os.listdir(afs.root / "locks") == []


def test_busy_is_worth_retrying_and_damage_is_not(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    for driver in ("sqlite", "sqlalchemy"):
        registry = open_registry(url, driver=driver, busy_timeout=0.2)
        holder = sqlite3.connect(tmp_path / "registry.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(RegistryBusy, match="stayed locked"):
            register(registry, f"alpha-{driver}")
        holder.execute("ROLLBACK")
        register(registry, f"alpha-{driver}")  # the same registry object serves the next write
        registry.close()
    (tmp_path / "garbage.db").write_bytes(b"\x00garbage" * 1000)
    for driver in ("sqlite", "sqlalchemy"):
        with pytest.raises(RegistryError, match="is damaged") as caught:
            open_registry(f"sqlite:///{tmp_path / 'garbage.db'}", driver=driver)
        assert not isinstance(caught.value, RegistryBusy)


def test_an_unreachable_database_server_is_busy_and_its_password_is_not_shown() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RegistryBusy) as caught:
        open_registry(f"postgresql+psycopg://afs:s3cret-pw@127.0.0.1:{port}/afs", busy_timeout=2)
    assert "s3cret-pw" not in str(caught.value) and f"127.0.0.1:{port}" in str(caught.value)
    with pytest.raises(RegistryError, match="not a database URL"):
        open_registry("nosuchdialect://x/y")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "artifactfs-test-full", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def test_a_full_disk_is_one_line_naming_the_registry(small_disk: Path, sample: SampleRepo) -> None:
    afs = new_installation(small_disk)
    try:
        afs.add("existing", sample.url)
        filler = small_disk / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass  # ENOSPC: the disk is full
        before = footprint(afs)
        db = afs.root / "registry.db"
        _one_line(afs.run("add-repo", "--name", "new", "--remote", sample.url, check=False),
                  f"the registry {db}", "file system is full", "free some space")  # fmt: skip
        after = footprint(afs)
        # SQLite may leave an empty -wal and a stub -shm it could not grow: its own bookkeeping,
        # which it reuses once there is space. Everything else, and every row, is as it was.
        for state in (before, after):
            for name in ("registry.db-wal", "registry.db-shm"):
                state["root"].pop(name, None)  # type: ignore[attr-defined]
        assert after == before
        filler.unlink()
        afs.add("new", sample.url)  # space again: it works, nothing was left half done
    finally:
        afs.cleanup()
