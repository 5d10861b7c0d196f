"""mountd supervises, it does not own: mounts outlive it, the next one adopts them, a hung mount
process is replaced, and an error in one repository never stops mountd or touches another one.
Real mountd, real mount processes, real FUSE, and (where jobs run) the real stack."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifactfs.config import load_settings
from artifactfs.mounts import fuse_mounts

from .conftest import Artifactfs, process_gone, wait_until
from .gitremote import GitDaemon, SampleRepo, make_sample_repo
from .test_async import Blocked, add_async, event_types


def register_unchecked(afs: Artifactfs, name: str, remote: str, mount_path: Path) -> None:
    """Append a registration straight to the log, as a registry shared with an older or a careless
    writer could hold it: mountd must defend itself against what the CLI would refuse."""
    code = (
        "import sys; from artifactfs.config import load_settings; from artifactfs.registry import open_registry; "
        "from artifactfs.model import NewEvent, EventType; s = load_settings(); r = open_registry(s.database_url); "
        "name, remote, path = sys.argv[1:]; "
        "r.append(name, lambda cur: [NewEvent(EventType.REGISTERED, {'remote_url': remote, 'ref': 'refs/heads/main', "
        "'mount_path': path, 'git_dir': str(s.git_dir(name)), 'asynchronous': True, 'attempt': 1})])"
    )
    subprocess.run([sys.executable, "-c", code, name, remote, str(mount_path)], env=afs.env, check=True)


def test_a_hung_mount_process_is_replaced_at_adoption(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.env["ARTIFACTFS_MOUNT_HANDSHAKE_TIMEOUT"] = "2"
    afs.add("hung", sample.url)
    daemon = afs.start_daemon()
    mnt = afs.wait_mounted("hung")
    old = afs.wait_mount_process("hung")
    afs.stop_daemon(daemon, sig=signal.SIGKILL)
    os.kill(old, signal.SIGSTOP)  # alive, but answers nothing: its handshake will hang
    afs.start_daemon("mountd2.log")
    wait_until(lambda: afs.mount_process("hung") not in (None, old), 30, what="a new mount process")
    assert "does not answer" in (afs.root / "mountd2.log").read_text()
    wait_until(lambda: process_gone(old), 10, what="the hung process to be gone")
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    assert afs.status("hung")["state"] == "mounted"


def test_a_stale_mount_is_shown_as_stale_with_how_to_recover(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("stale", sample.url)
    daemon = afs.start_daemon()
    mnt = afs.wait_mounted("stale")
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    os.stat(mnt)  # the root's attributes are now in the kernel's cache, for minutes
    afs.stop_daemon(daemon, sig=signal.SIGKILL)
    os.kill(afs.wait_mount_process("stale"), signal.SIGKILL)
    wait_until(lambda: afs.status("stale")["state"] == "stale", what="status to see the stale mount")
    row = afs.status("stale")
    assert "stale" in str(row["problem"]) and "artifactfs up" in str(row["problem"])
    afs.start_daemon("mountd2.log")
    wait_until(lambda: afs.status("stale")["state"] == "mounted", 30, what="mountd to remount it")
    assert (afs.mount_path("stale") / "README.md").read_bytes() == sample.files["README.md"]


def test_a_broken_mount_root_costs_only_its_own_repository(afs: Artifactfs, sample: SampleRepo, tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    afs.env["ARTIFACTFS_ALLOWED_MOUNT_ROOTS"] = str(roots)
    (roots / "a").mkdir(parents=True)
    afs.add("good", sample.url)
    afs.add("bad", sample.url, "--mount-root", str(roots / "a"))
    daemon = afs.start_daemon()
    mnt = afs.wait_mounted("good")
    wait_until(lambda: str(roots / "a" / "bad") in fuse_mounts(), what="bad to be mounted")
    afs.stop_daemon(daemon, sig=signal.SIGKILL)
    subprocess.run(["fusermount3", "-u", "-z", str(roots / "a" / "bad")], check=True)
    os.rename(roots / "a", roots / "a.old")
    (roots / "a").write_text("a file where the mount root was\n")  # mkdir under it must fail
    daemon = afs.start_daemon("mountd2.log")
    log2 = afs.root / "mountd2.log"
    wait_until(lambda: "bad: keep_mounted" in log2.read_text(), 30, what="mountd to report the broken root")
    # mountd lives on, and adopts the other repository's mount (in whichever order it takes them)
    wait_until(lambda: "good: adopted" in log2.read_text(), 30, what="mountd to adopt the good mount")
    assert daemon.poll() is None
    assert str(mnt) in fuse_mounts() and (mnt / "README.md").read_bytes() == sample.files["README.md"]
    afs.add("later", sample.url)  # and it still follows the registry
    assert (afs.wait_mounted("later") / "README.md").read_bytes() == sample.files["README.md"]


def test_a_mount_path_inside_a_placeholder_never_blocks_mountd(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    afs = stack
    daemon, sample = slow
    daemon.hold()
    add_async(afs, "outer", daemon.url("slow.git"))
    outer = afs.wait_mounted("outer")
    # The CLI refuses this; a registry written by anyone else must not deadlock mountd either.
    register_unchecked(afs, "inner", daemon.url("slow.git"), outer / "sub" / "inner")
    add_async(afs, "beside", daemon.url("slow.git"))
    wait_until(lambda: "inner: not mounted" in afs.log("mountd"), 10, what="mountd to refuse the nested mount")
    daemon.release()
    afs.wait_state("outer", "mounted", timeout=60)  # every other gate still opens
    afs.wait_state("beside", "mounted", timeout=60)
    assert (outer / "README.md").read_bytes() == sample.files["README.md"]
    assert "lies inside the artifactfs mount" in afs.log("mountd")


def test_a_locked_registry_costs_a_retry_not_mountd(afs: Artifactfs, sample: SampleRepo, tmp_path: Path) -> None:
    """mountd's own write (failing an attempt past its deadline) meets a registry locked for
    longer than the busy timeout: logged and retried; mountd and the other mounts carry on."""
    afs.env.update(ARTIFACTFS_DB_BUSY_TIMEOUT="1", ARTIFACTFS_PREPARE_DEADLINE="3")
    afs.add("fine", sample.url)
    daemon = afs.start_daemon()
    mnt = afs.wait_mounted("fine")
    add_async(afs, "stuck", sample.url)  # no worker runs: it stays preparing until the deadline
    holder = sqlite3.connect(afs.root / "registry.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        wait_until(lambda: "stuck: drive_preparation" in afs.daemon_log(), 30, what="mountd to meet the lock")
        assert daemon.poll() is None
        assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    row = afs.wait_state("stuck", "failed", timeout=30)  # retried once the lock is gone
    assert "did not finish within 3s" in str(row["prepare_error"])
    assert daemon.poll() is None and afs.status("fine")["state"] == "mounted"


@pytest.fixture
def stack(afs: Artifactfs):  # type: ignore[no-untyped-def]
    afs.up()
    yield afs


@pytest.fixture
def slow(git_daemon: GitDaemon) -> tuple[GitDaemon, SampleRepo]:
    return git_daemon, make_sample_repo(git_daemon.base, "slow")


def worker_main_pid(afs: Artifactfs) -> int:
    return afs.service_pid("worker")


def test_a_job_lost_with_its_worker_runs_again_when_the_worker_returns(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    """The broker would hand an unacknowledged job out again only after its visibility timeout
    (30 minutes); mountd republishes it as soon as this host's worker is back online."""
    afs = stack
    daemon, sample = slow
    daemon.set_delay(30.0)
    add_async(afs, "lost", daemon.url("slow.git"))
    afs.wait_phase("lost", "clone", timeout=30)
    main = worker_main_pid(afs)
    children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
    os.kill(main, signal.SIGKILL)  # the whole worker: its pool goes with it
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    daemon.set_delay(0)
    afs.up()  # only the worker was missing
    afs.wait_state("lost", "mounted", timeout=90)
    assert "worker artifactfs@" in afs.log("mountd") and "is online" in afs.log("mountd")
    assert (afs.mount_path("lost") / "README.md").read_bytes() == sample.files["README.md"]
    assert event_types(afs, "lost").count("ready") == 1


def test_a_revoked_job_is_published_again_then_fails_its_attempt(stack: Artifactfs, slow: tuple[GitDaemon, SampleRepo]) -> None:
    """A job that ends without recording an outcome (revoked here) is published again; one that
    keeps ending so fails its attempt with a clear error instead of leaving it preparing."""
    afs = stack
    daemon, sample = slow
    daemon.set_delay(30.0)
    add_async(afs, "revoked", daemon.url("slow.git"))
    afs.wait_phase("revoked", "clone", timeout=30)
    code = ("from workers.app import app; "
            f"app.control.revoke({afs.task_id('revoked', 1)!r}, terminate=True, signal='SIGKILL')")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], env=afs.env, check=True, timeout=60)
    row = afs.wait_state("revoked", "failed", timeout=90)
    assert "without recording an outcome" in str(row["prepare_error"])
    assert "ended without an outcome; publishing it again" in afs.log("mountd")
    daemon.set_delay(0)
    afs.run("prepare", "--name", "revoked")  # a new attempt is a new job
    afs.wait_state("revoked", "mounted", timeout=60)
    assert (afs.mount_path("revoked") / "README.md").read_bytes() == sample.files["README.md"]


def test_mount_processes_answer_only_their_own_user(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("owner", sample.url)
    afs.start_daemon()
    afs.wait_mounted("owner")
    afs.wait_mount_process("owner")  # the mount appears before its control socket; the pid file after
    sock = afs.root / "run" / "mounts" / "owner.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct((afs.root / "run").stat().st_mode & 0o777) == "0o700"
    probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
             "s.sendall(b'{\"op\": \"unmount\"}\\n'); print(s.recv(100))")  # fmt: skip
    out = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", probe, str(sock)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and "Permission denied" in out.stderr
    assert afs.status("owner")["state"] == "mounted"
    reply = json.loads(subprocess.run(
        [sys.executable, "-c", probe.replace("unmount", "hello").replace("print(s.recv(100))", "print(s.recv(4096).decode())"), str(sock)],
        capture_output=True, text=True, check=True,
    ).stdout)  # fmt: skip
    assert reply["ok"] and reply["name"] == "owner" and reply["gate"] == "open"


class CountingRegistry:
    """A registry that never changes and counts full reads: a unit test of when mountd looks."""

    def __init__(self) -> None:
        self.reads = 0

    def position(self) -> int:
        return 7

    def repos(self) -> list[object]:
        self.reads += 1
        return []


def test_a_restart_whose_backoff_ran_out_does_not_wait_for_the_next_full_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mountd.daemon import MountDaemon

    monkeypatch.setenv("ARTIFACTFS_ROOT", str(tmp_path))
    registry = CountingRegistry()
    daemon = MountDaemon(load_settings(), registry)  # type: ignore[arg-type]
    daemon.reconcile()
    assert registry.reads == 1
    daemon.reconcile()
    assert registry.reads == 1  # nothing changed, and the full check is not due: no pass

    now = time.monotonic()
    daemon._restart_after["crashed"] = now + 3600  # backing off: still no pass
    daemon.reconcile()
    assert registry.reads == 1
    daemon._restart_after["crashed"] = now - 0.1  # backoff over, nothing mounted: a pass at once
    daemon.reconcile()
    assert registry.reads == 2
    assert "crashed" not in daemon._restart_after  # no longer registered: forgotten, no pass loop
    daemon.reconcile()
    assert registry.reads == 2
