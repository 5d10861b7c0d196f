"""Asynchronous preparation with the real stack: a private redis-server, a Celery worker process,
mountd and real FUSE mounts, against git remotes made slow or broken on purpose."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from artifactfs.mounts import fuse_mounts

from .conftest import PYTHON, Artifactfs, follows_ready, process_gone, wait_until, waits_on_fuse
from .gitremote import GitDaemon, SampleRepo, add_commit, git, make_sample_repo


# Tests of what the registry does (appends, follows, projections, dedupe keys) run on both; those
# of gates, jobs and processes, whose registry code is the same, on SQLite alone (the suite's time).
SQLITE_ONLY = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def stack(afs: Artifactfs, request: pytest.FixtureRequest) -> Iterator[Artifactfs]:
    """The stack of one host, its registry on a SQLite file or on PostgreSQL (as a fleet's), which
    logs in JSON (as a fleet's, read by machines)."""
    if request.param == "postgresql":
        afs.env["ARTIFACTFS_DATABASE_URL"] = request.getfixturevalue("postgres").new_database()
        afs.env["ARTIFACTFS_LOG_FORMAT"] = "json"
    afs.up()
    yield afs


@pytest.fixture
def slow(git_daemon: GitDaemon) -> tuple[GitDaemon, SampleRepo]:
    sample = make_sample_repo(git_daemon.base, "slow")
    return git_daemon, sample


class Blocked:
    """Run `action` in a thread and tell whether it is still blocked."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self.tid = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(action, started), daemon=True)
        self.thread.start()
        started.wait()

    def _run(self, action: Callable[[], object], started: threading.Event) -> None:
        self.tid = threading.get_native_id()
        started.set()
        try:
            self.result = action()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
        self.finished_at = time.monotonic()

    @property
    def blocked(self) -> bool:
        return self.thread.is_alive()

    @property
    def held_by_fuse(self) -> bool:
        """Blocked inside the mount: the FUSE server holds its request (or a process it ran's)."""
        return self.thread.is_alive() and waits_on_fuse(os.getpid(), self.tid)

    def wait_held(self, what: str, timeout: float = 20.0) -> None:
        wait_until(lambda: self.held_by_fuse or not self.blocked, timeout, what=f"{what} to reach the mount")
        assert self.blocked, f"{what} did not wait: {self.error or self.result!r}"

    def join(self, timeout: float = 60.0) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def add_async(afs: Artifactfs, name: str, remote: str, *extra: str) -> float:
    started = time.monotonic()
    out = afs.run("add-repo", "--async", "--name", name, "--remote", remote, *extra).stdout
    assert out.strip() == f"queued {name}"
    return time.monotonic() - started


def event_types(afs: Artifactfs, name: str) -> list[str]:
    """The types of `name`'s events, but those that follow ready."""
    return [e["type"] for e in json.loads(afs.run("events", "--name", name, "--json").stdout) if not follows_ready(e["type"])]


def test_async_add_returns_at_once_and_operations_wait_for_the_clone(
    stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]
) -> None:
    afs = stack
    daemon, sample = slow
    daemon.hold()  # the clone's pack waits until the test lets it go
    add_async(afs, "slow", daemon.url("slow.git"))
    mnt = afs.mount_path("slow")
    assert str(mnt) in fuse_mounts()  # the placeholder is there when add-repo returns
    assert afs.status("slow")["state"] == "preparing"  # ...and the clone is still running
    assert afs.status("slow")["state"] == "preparing"

    # Root getattr and statfs never block: mount, df and shell prompts keep working.
    os.stat(mnt)
    os.statvfs(mnt)
    waiting = {
        "ls": Blocked(lambda: sorted(os.listdir(mnt))),
        "stat": Blocked(lambda: os.stat(mnt / "README.md").st_size),
        "cat": Blocked(lambda: (mnt / "src/app.py").read_bytes()),
        "git status": Blocked(lambda: subprocess.run(["git", "-C", str(mnt), "status", "--porcelain"],
                                                     capture_output=True, text=True, timeout=120)),
        "create": Blocked(lambda: open(mnt / "new-file", "w")),
    }  # fmt: skip
    for name, op in waiting.items():
        op.wait_held(name)  # each reached the mount and is held there...
    assert afs.status("slow")["state"] == "preparing"  # ...while the clone still runs
    before = scrape(afs)
    assert value(before, "artifactfs_repositories", state="preparing") == 1
    assert value(before, "artifactfs_repositories", state="ready") == 0
    assert value(before, "artifactfs_mount_processes") == 1
    daemon.release()
    afs.wait_state("slow", "mounted")
    top = {p.split("/")[0] for p in [*sample.files, *sample.symlinks, *sample.gitlinks]}
    # The create waited at the same gate: the listing may have been served before it or after.
    assert set(waiting["ls"].join()) - {"new-file"} == top | {".git"}
    assert waiting["stat"].join() == len(sample.files["README.md"])
    assert waiting["cat"].join() == sample.files["src/app.py"]
    status = waiting["git status"].join()
    assert status.returncode == 0, status.stderr  # type: ignore[attr-defined]
    waiting["create"].join().close()  # the tree is writable once it is ready
    assert (mnt / "new-file").read_bytes() == b""
    types = event_types(afs, "slow")
    assert types == ["registered", "phase", "phase", "phase", "phase", "ready"]

    # The metrics moved: the preparation's phases and outcome, the waits at the gate, the reads'
    # fetch transactions and what they brought. The job counts its time once READY is appended.
    wait_until(lambda: value(scrape(afs), "artifactfs_prepare_seconds_count", outcome="ready") == 1,
               what="the prepare job's time to be counted")  # fmt: skip
    after = scrape(afs)
    assert value(after, "artifactfs_repositories", state="ready") == 1
    assert value(after, "artifactfs_repositories", state="preparing") == 0
    assert len(sample.history) > 1  # so its history came after ready, and is counted
    for phase in ("validate", "clone", "index", "publish", "history"):
        assert value(after, "artifactfs_prepare_phase_seconds_count", phase=phase, outcome="ok") == 1, phase
    assert value(after, "artifactfs_ready_seconds_count", history="behind") == 1
    assert value(after, "artifactfs_repositories_history", state="complete") == 1
    assert value(after, "artifactfs_git_lazy_fetches") == 0
    # The kernel holds some of the callers itself, behind a request of the same directory.
    assert value(after, "artifactfs_gate_wait_seconds_count", outcome="opened") >= 1
    assert value(after, "artifactfs_gate_wait_seconds_count") == value(after, "artifactfs_gate_wait_seconds_count", outcome="opened")
    moved = {name: value(after, name, lane="urgent") - value(before, name, lane="urgent")
             for name in ("artifactfs_fetch_transactions_total", "artifactfs_hydrated_objects_total",
                          "artifactfs_hydrated_bytes_total", "artifactfs_fetch_seconds_count")}  # fmt: skip
    assert moved["artifactfs_fetch_transactions_total"] >= 1 and moved["artifactfs_fetch_seconds_count"] >= 1, moved
    assert moved["artifactfs_hydrated_objects_total"] >= 1, moved  # src/app.py, at least
    assert moved["artifactfs_hydrated_bytes_total"] >= len(sample.files["src/app.py"]), moved
    assert value(after, "artifactfs_errors_total") == 0
    assert value(after, "artifactfs_registry_up") == 1
    if afs.env.get("ARTIFACTFS_LOG_FORMAT") == "json":
        check_json_logs(afs, "slow")


def check_json_logs(afs: Artifactfs, name: str) -> None:
    """Every record of every artifactfs service is one JSON object naming what it is about."""
    found: dict[str, list[dict[str, object]]] = {}
    for service in ("worker", "mountd", "metrics"):
        lines = (afs.root / "log" / f"{service}.log").read_text().splitlines()
        # Celery prints its banner itself, not through logging: those lines are not records.
        found[service] = [json.loads(line) for line in lines if line.startswith("{")]
        assert found[service], service
        for line in lines:
            assert not re.match(r"\d{4}-\d\d-\d\d \S+ \S*(artifactfs|mount\[)", line), (service, line)
        for record in found[service]:
            assert set(record) >= {"time", "level", "host", "repo", "job", "phase", "message"}, record
            assert record["host"] == afs.env["ARTIFACTFS_HOST"], record
    job = afs.task_id(name, 1)
    assert any(r["repo"] == name and r["job"] == job and r["phase"] for r in found["worker"]), found["worker"]
    assert any(r["repo"] == name and str(r["logger"]).startswith("artifactfs.fs") for r in found["mountd"]), found["mountd"]
    assert any(r["repo"] == name and r["logger"] == "artifactfs.mountd" for r in found["mountd"]), found["mountd"]


def scrape(afs: Artifactfs) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, series = afs.metrics()
    assert status == 200
    return series


def value(series: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in series.items() if n == name and wanted <= have)


def test_phases_show_in_status_and_events_while_preparing(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    afs = stack
    daemon, _ = slow
    daemon.hold()
    add_async(afs, "phases", daemon.url("slow.git"))
    afs.wait_phase("phases", "clone", timeout=20)
    assert "phase=clone" in afs.run("status", "--name", "phases").stdout
    assert "phase=validate" in afs.run("events", "--name", "phases").stdout
    daemon.release()
    afs.wait_state("phases", "mounted")
    phases = [e["payload"].get("phase") for e in json.loads(afs.run("events", "--name", "phases", "--json").stdout)]
    assert [p for p in phases if p] == ["validate", "clone", "index", "publish"]


def test_failed_preparation_gives_eio_until_prepare_recovers(stack: Artifactfs, tmp_path: Path, sample: SampleRepo) -> None:
    afs = stack
    remote = tmp_path / "later.git"  # nothing there yet: the remote is broken
    add_async(afs, "later", f"file://{remote}")
    row = afs.wait_state("later", "failed")
    assert "later.git" in str(row["prepare_error"])
    mnt = afs.wait_mounted("later")
    for attempt in (lambda: os.listdir(mnt), lambda: os.stat(mnt / "README.md"), lambda: (mnt / "x").read_bytes()):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EIO
    assert not (afs.root / "git" / "later.git").exists()
    # prepare --wait follows the worker's attempt to its end: a failure is exit 1 and one line.
    failed = afs.run("prepare", "--name", "later", "--wait", "--quiet", check=False)
    assert failed.returncode == 1 and failed.stdout == "", failed
    assert failed.stderr.startswith("artifactfs: error: preparing later failed: ") and "later.git" in failed.stderr

    # status --watch shows each change as it happens, one JSON object per line, until Ctrl-C.
    watch = subprocess.Popen([PYTHON, "-m", "artifactfs.cli", "status", "--watch", "--json", "--name", "later"],
                             env=afs.env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert watch.stdout is not None
    assert json.loads(watch.stdout.readline())["state"] == "failed"  # where it stands, at once
    git("clone", "--bare", "-q", sample.bare, remote)  # repair the remote
    git("--git-dir", remote, "config", "uploadpack.allowFilter", "true")
    done = afs.run("prepare", "--name", "later", "--wait", "--json")
    assert json.loads(done.stdout)["state"] == "mounted" and json.loads(done.stdout)["attempt"] == 3
    assert [line for line in done.stderr.splitlines() if line in ("later: clone", "later: publish")] == ["later: clone", "later: publish"], done.stderr
    seen = [json.loads(watch.stdout.readline())["state"]]
    while seen[-1] != "mounted":
        seen.append(json.loads(watch.stdout.readline())["state"])
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=20) == 0
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    types = event_types(afs, "later")
    assert types.count("failed") == 2 and types.count("prepare_requested") == 2 and types[-1] == "ready"


@SQLITE_ONLY
def test_prepare_resets_the_gate_while_a_new_attempt_runs(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    afs = stack
    daemon, sample = slow
    add_async(afs, "again", daemon.url("slow.git"))
    mnt = afs.wait_mounted("again")
    afs.wait_state("again", "mounted")
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    for absent in ("NEWS.md", "docs/new.md"):  # looked up while absent: the kernel caches that
        assert not (mnt / absent).exists()
    new_head = add_commit(sample, {"src/new.py": b"print('new')\n", "README.md": b"changed\n", "NEWS.md": b"news\n",
                                   "docs/new.md": b"new\n"}, "refresh")  # fmt: skip
    daemon.hold()  # the new commit's pack waits: the fetch lasts until the test lets it go
    afs.run("prepare", "--name", "again")
    afs.wait_phase("again", "fetch", timeout=20)
    listing = Blocked(lambda: os.listdir(mnt / "src"))
    listing.wait_held("ls")  # the gate is closed again while the new attempt runs
    assert afs.status("again")["state"] == "preparing"
    daemon.release()
    afs.wait_state("again", "mounted")
    assert "new.py" in listing.join()  # type: ignore[operator]
    assert afs.status("again")["head"] == new_head
    assert (mnt / "README.md").read_bytes() == b"changed\n"  # no stale kernel cache of the old commit
    assert (mnt / "NEWS.md").read_bytes() == b"news\n"  # nor of its absences
    assert (mnt / "docs/new.md").read_bytes() == b"new\n"
    assert git("-C", mnt, "rev-parse", "HEAD").stdout.decode().strip() == new_head


def test_inline_credentials_are_refused_for_async(afs: Artifactfs) -> None:
    line = afs.fail("add-repo", "--async", "--name", "secret", "--remote", "https://bob:hunter2@example.invalid/r.git")
    assert "inline credentials are refused with --async" in line and "hunter2" not in line
    assert afs.run("list-repos").stdout == ""
    assert afs.run("events", "--name", "secret", check=False).returncode == 1


@SQLITE_ONLY
def test_interrupting_a_blocked_ls_returns_at_once(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    afs = stack
    daemon, _ = slow
    daemon.set_delay(10.0)
    add_async(afs, "intr", daemon.url("slow.git"))
    mnt = afs.wait_mounted("intr")
    ls = subprocess.Popen(["ls", str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: waits_on_fuse(ls.pid) or ls.poll() is not None, 20, what="ls to reach the mount")
    assert ls.poll() is None, "ls did not block"
    sent = time.monotonic()
    ls.send_signal(signal.SIGINT)
    ls.wait(timeout=5)
    assert time.monotonic() - sent < 1.0
    assert ls.returncode != 0
    assert afs.status("intr")["state"] == "preparing"  # nothing else was disturbed


def worker_pool_children(afs: Artifactfs) -> list[int]:
    main = afs.service_pid("worker")
    out = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def process_running_git_clone_for(pids: list[int]) -> int:
    for pid in pids:
        out = subprocess.run(["pgrep", "-P", str(pid), "-f", "git clone"], capture_output=True, text=True).stdout
        if out.strip():
            return pid
    raise AssertionError("no worker process is running git clone")


@SQLITE_ONLY
def test_worker_killed_mid_clone_leaves_nothing_half_made_and_the_job_completes(
    stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]
) -> None:
    afs = stack
    daemon, sample = slow
    daemon.hold()
    add_async(afs, "killed", daemon.url("slow.git"))
    afs.wait_phase("killed", "clone", timeout=20)
    victim = wait_until(lambda: _try(lambda: process_running_git_clone_for(worker_pool_children(afs))), 10,
                        what="the clone to start")  # fmt: skip
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: process_gone(victim), 10, what="the worker process to die")
    assert not (afs.root / "git" / "killed.git").exists()  # no half-made git directory
    daemon.release()
    afs.wait_state("killed", "mounted", timeout=90)  # redelivered, run again, completed
    assert (afs.mount_path("killed") / "README.md").read_bytes() == sample.files["README.md"]
    assert list((afs.root / "tmp").iterdir()) == []
    assert event_types(afs, "killed").count("ready") == 1


def _try(fn: Callable[[], int]) -> int | None:
    try:
        return fn()
    except AssertionError:
        return None


def test_readiness_published_while_redis_is_down_still_opens_the_gate(
    stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]
) -> None:
    afs = stack
    daemon, sample = slow
    daemon.hold()
    add_async(afs, "outage", daemon.url("slow.git"))
    mnt = afs.wait_mounted("outage")
    afs.wait_phase("outage", "clone", timeout=20)
    listing = Blocked(lambda: os.listdir(mnt))
    listing.wait_held("ls")
    afs.stop_service("redis", signal.SIGKILL)  # the job finishes while nobody can hear it
    daemon.release()
    wait_until(lambda: afs.registry_state("outage") == "ready", 60, interval=0.1, what="the job to finish")
    afs.up()  # Redis back (with its persisted queue); mountd resubscribes and re-reads the log
    listing.join(30)
    afs.wait_state("outage", "mounted")
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    # The job ran to its end while Redis was gone. Its acknowledgement was lost with the
    # connection, so Redis hands it out again after the visibility timeout; run again, it finds
    # the repository ready and appends nothing (test_jobs covers a delivery run twice).
    wait_until(lambda: f"Task artifactfs.prepare[{afs.task_id('outage', 1)}] succeeded" in afs.log("worker"), 60,
               what="the job to end")  # fmt: skip
    assert event_types(afs, "outage").count("ready") == 1


@SQLITE_ONLY
def test_mountd_restarted_mid_prepare(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    afs = stack
    daemon, sample = slow
    daemon.hold()
    add_async(afs, "restart", daemon.url("slow.git"))
    mnt = afs.wait_mounted("restart")
    afs.wait_phase("restart", "clone", timeout=20)
    listing = Blocked(lambda: os.listdir(mnt))  # waits at the gate across the restart
    listing.wait_held("ls")
    afs.stop_service("mountd")
    assert str(mnt) in fuse_mounts() and listing.held_by_fuse  # the placeholder stays, still gated
    afs.up()  # mountd again: it adopts the placeholder and opens its gate once the clone lands
    daemon.release()
    afs.wait_state("restart", "mounted", timeout=60)
    assert "README.md" in listing.join()  # type: ignore[operator]
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]


@SQLITE_ONLY
def test_failed_stays_failed_across_mountd_restart(stack: Artifactfs, tmp_path: Path) -> None:
    afs = stack
    add_async(afs, "broken", f"file://{tmp_path / 'missing.git'}")
    afs.wait_state("broken", "failed")
    afs.stop_service("mountd", signal.SIGKILL)
    afs.up()
    wait_until(lambda: "broken: adopted mount process" in afs.log("mountd"), 30, what="mountd to adopt the mount")
    mnt = afs.mount_path("broken")
    with pytest.raises(OSError) as info:
        os.listdir(mnt)
    assert info.value.errno == errno.EIO
    assert afs.status("broken")["state"] == "failed"


@SQLITE_ONLY
def test_prepared_gitdir_is_fetched_into_and_never_deleted(stack: Artifactfs, sample: SampleRepo, tmp_path: Path) -> None:
    afs = stack
    prepared = tmp_path / "prepared.git"  # made by someone else, e.g. an image build
    git("clone", "--bare", "-q", "--filter=blob:none", sample.url, prepared)
    add_async(afs, "prep", sample.url, "--prepared-gitdir", "--git-dir", str(prepared),
              "--fetch-ref", "refs/heads/feature", "--ref", "refs/heads/sandbox")  # fmt: skip
    afs.wait_state("prep", "mounted")
    mnt = afs.mount_path("prep")
    assert (mnt / "feature.txt").exists()
    assert git("--git-dir", prepared, "rev-parse", "refs/heads/sandbox").stdout.decode().strip() == sample.branches["feature"]
    assert afs.status("prep")["head"] == sample.branches["feature"]
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    phases = [e["payload"].get("phase") for e in json.loads(afs.run("events", "--name", "prep", "--json").stdout)]
    assert [p for p in phases if p] == ["validate", "fetch", "update_branch", "index", "publish"]
    afs.run("remove-repo", "--name", "prep")
    assert (prepared / "HEAD").exists()


def test_a_duplicated_job_appends_nothing_twice(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    afs = stack
    daemon, _ = slow
    daemon.set_delay(1.0)
    add_async(afs, "dup", daemon.url("slow.git"))
    # Publish the same attempt's job again, as a redelivery would.
    code = ("from artifactfs.config import load_settings; from artifactfs.registry import open_registry; "
            "from artifactfs.jobs import publish_prepare; s = load_settings(); "
            "print(publish_prepare(s, open_registry(s.database_url).require('dup')))")  # fmt: skip
    out = subprocess.run([os.sys.executable, "-c", code], env=afs.env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == afs.task_id("dup", 1)
    afs.wait_state("dup", "mounted")
    wait_until(lambda: afs.log("worker").count(f"[{afs.task_id('dup', 1)}] succeeded") == 2, 60, what="both deliveries to end")
    types = event_types(afs, "dup")
    assert types == ["registered", "phase", "phase", "phase", "phase", "ready"]


@SQLITE_ONLY
def test_flower_shows_every_prepare_job(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    afs = stack
    daemon, _ = slow
    add_async(afs, "seen", daemon.url("slow.git"))
    afs.wait_state("seen", "mounted")

    status, _ = afs.flower("/api/tasks", auth=False)
    assert status == 401  # Flower's API is closed to whoever does not hold the credential

    def job() -> dict | None:
        status, tasks = afs.flower("/api/tasks")
        assert status == 200 and isinstance(tasks, dict), (status, tasks)
        return next((t for t in tasks.values() if t.get("name") == "artifactfs.prepare" and t.get("state") == "SUCCESS"), None)

    task = wait_until(job, 30, interval=0.5, what="flower to list the job")
    assert task["uuid"] == afs.task_id("seen", 1)
    assert "'repo': 'seen'" in task["kwargs"] and "'host': 'test-" in task["kwargs"]
    host = afs.env["ARTIFACTFS_HOST"]
    assert task["worker"] == f"artifactfs@{host}" and task["routing_key"] == f"artifactfs.{host}"
    assert task["runtime"] > 0 and task["started"] >= task["received"]
    # Its result names the commit it published.
    assert task["result"] == repr({"outcome": "ready", "head": afs.status("seen")["head"]})
    assert "git://" not in json.dumps(task)  # no URL (let alone a credential) in a job


@SQLITE_ONLY
def test_flower_shows_a_failed_preparation_as_a_failed_job(stack: Artifactfs, tmp_path: Path) -> None:
    afs = stack
    missing = f"file://{tmp_path / 'gone.git'}"
    add_async(afs, "broken", missing)
    row = afs.wait_state("broken", "failed")

    def job() -> dict | None:
        status, info = afs.flower(f"/api/task/info/{afs.task_id('broken', 1)}")
        return info if status == 200 and isinstance(info, dict) and info.get("state") == "FAILURE" else None

    info = wait_until(job, 30, interval=0.5, what="flower to show the job failed")
    assert "PrepareFailed" in str(info["exception"]) and str(row["prepare_error"])[:40] in str(info["exception"])
    # Failed once, recorded once, and acknowledged: nothing waits to be delivered again.
    wait_until(afs.jobs_settled, 30, interval=0.2, what="the failed job to be acknowledged")
    assert afs.log("worker").count(f"Task artifactfs.prepare[{afs.task_id('broken', 1)}] received") == 1
    assert event_types(afs, "broken").count("failed") == 1


def test_prepare_deadline_fails_an_attempt_that_never_ends(afs: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    daemon, _ = slow
    daemon.set_delay(30.0)
    afs.env["ARTIFACTFS_PREPARE_DEADLINE"] = "3"
    afs.up()
    add_async(afs, "late", daemon.url("slow.git"))
    row = afs.wait_state("late", "failed", timeout=30)
    assert "did not finish within 3s" in str(row["prepare_error"])


def test_transient_failures_are_retried_with_backoff(afs: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    daemon, sample = slow
    afs.env["ARTIFACTFS_JOB_RETRIES"] = "3"
    afs.up()
    daemon.set_broken(True)  # packs fail mid-transfer: "the remote end hung up unexpectedly"
    add_async(afs, "flaky", daemon.url("slow.git"))
    wait_until(lambda: "transient failure, will retry" in afs.log("worker"), 30, interval=0.1, what="a retry")
    # Flower shows the job as RETRY while it waits for its next run (the remote is still broken).
    task = afs.task_id("flaky", 1)

    def flower_state() -> object:
        status, info = afs.flower(f"/api/task/info/{task}")
        return info.get("state") if status == 200 and isinstance(info, dict) else None

    wait_until(lambda: flower_state() == "RETRY", 30, interval=0.2, what="Flower to show the job as RETRY")
    daemon.set_broken(False)
    afs.wait_state("flaky", "mounted", timeout=60)
    assert (afs.mount_path("flaky") / "README.md").read_bytes() == sample.files["README.md"]
    assert "failed" not in event_types(afs, "flaky")
    wait_until(lambda: flower_state() == "SUCCESS", 30, interval=0.2, what="Flower to show the job's success")


def test_transient_failures_give_up_after_the_retries(afs: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    daemon, _ = slow
    afs.env["ARTIFACTFS_JOB_RETRIES"] = "1"
    afs.up()
    daemon.set_broken(True)
    add_async(afs, "dead", daemon.url("slow.git"))
    row = afs.wait_state("dead", "failed", timeout=60)
    assert "hung up" in str(row["prepare_error"]) or "early EOF" in str(row["prepare_error"])
    assert afs.log("worker").count("transient failure, will retry") == 1


def test_a_name_registered_again_is_prepared_again(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    """Attempts count from 1 again after a removal: jobs and their dedupe keys must not collide."""
    afs = stack
    daemon, sample = slow
    add_async(afs, "again", daemon.url("slow.git"))
    afs.wait_state("again", "mounted")
    afs.run("remove-repo", "--name", "again")
    add_async(afs, "again", daemon.url("slow.git"))
    afs.wait_state("again", "mounted", timeout=30)
    assert (afs.mount_path("again") / "README.md").read_bytes() == sample.files["README.md"]
    types = event_types(afs, "again")
    assert types == ["registered", "phase", "phase", "phase", "phase", "ready", "removed",
                     "registered", "phase", "phase", "phase", "phase", "ready"]  # fmt: skip
