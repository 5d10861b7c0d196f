"""Faults inside one mount: a remote that hangs, an object that cannot be read, a refresh while
files are open, many refreshes in a row. Real git remotes, real FUSE mounts through mountd; each
fault must cost one operation (or one reader) at most, never the mount."""
from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from artifactfs.fs import faults, operations
from artifactfs.fs.gate import Gate, GateState, wait_for
from artifactfs.mounts import fuse_mounts
from artifactfs.procs import process_state

from .conftest import Artifactfs, command_lines, wait_until, waits_on_fuse
from .gitremote import HungRemote, SampleRepo, add_commit, git, make_sample_repo

FILE = "src/app.py"


# --- helpers ---


def git_dir(afs: Artifactfs, name: str) -> Path:
    return afs.root / "git" / f"{name}.git"


def set_remote(afs: Artifactfs, name: str, url: str) -> None:
    """Point the clone's origin (where lazy fetches go) at `url`."""
    git("--git-dir", git_dir(afs, name), "config", "remote.origin.url", url)


def describe(afs: Artifactfs, name: str) -> dict[str, object]:
    return afs.describe_mount(name)


def processes_mentioning(text: str) -> list[int]:
    return [pid for pid, line in command_lines().items() if text in line]


def reader(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def in_thread(action: Callable[[], object]) -> Callable[[float], object]:
    """Start `action` in a thread; the returned function waits (at most its timeout) for the result."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = action()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout: float) -> object:
        thread.join(timeout)
        assert not thread.is_alive(), f"still blocked after {timeout}s"
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return result["value"]

    return join


def drop_kernel_caches() -> None:
    """Make the kernel drop unused dentries and inodes: it sends FUSE forgets for them."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def node_count(afs: Artifactfs, name: str) -> int:
    return int(describe(afs, name)["nodes"])  # the inodes the mount process holds


def mount_sample(afs: Artifactfs, sample: SampleRepo, name: str = "faults") -> Path:
    """The sample over file:// mounted by mountd alone (no worker: a later prepare stays queued)."""
    afs.add(name, sample.url)
    afs.start_daemon()
    return afs.wait_mounted(name)


# --- a remote that hangs ---


def test_a_hung_remote_fails_the_read_at_the_fetch_deadline(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.env["ARTIFACTFS_FETCH_TIMEOUT"] = "3"
    mnt = mount_sample(afs, sample)
    with HungRemote() as hung:
        set_remote(afs, "faults", hung.url("faults.git"))
        started = time.monotonic()
        cat = reader(mnt / FILE)
        try:
            wait_until(lambda: exited(cat), 3 + 15, interval=0.1, what="the read to fail at the fetch deadline")
            elapsed = time.monotonic() - started
            # git and the remote helper it started (which holds the connection) were killed
            # together, while the remote still hangs.
            wait_until(lambda: not processes_mentioning(hung.address), 5, what="git and its children to be gone")
        finally:
            hung.close()  # (without a deadline, this is what lets the reader go)
            out, err = cat.communicate(timeout=30)
        assert cat.returncode != 0 and b"Input/output error" in err, (cat.returncode, err)
        assert hung.accepted >= 1  # it was our hung remote that held the fetch
        assert elapsed < 3 + 15
    assert "timed out after 3s" in afs.daemon_log()
    set_remote(afs, "faults", sample.url)  # the remote is back: the same read works, same mount
    assert (mnt / FILE).read_bytes() == sample.files[FILE]


def test_a_reader_waiting_on_a_hung_fetch_is_freed_by_a_signal(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.env["ARTIFACTFS_FETCH_TIMEOUT"] = "60"  # far beyond what the test waits
    mnt = mount_sample(afs, sample)
    server = afs.wait_mount_process("faults")
    with HungRemote() as hung:
        set_remote(afs, "faults", hung.url("faults.git"))
        interrupted, killed = reader(mnt / FILE), reader(mnt / FILE)
        try:
            wait_until(lambda: hung.accepted >= 1, 15, what="the fetch to reach the hung remote")
            for proc in (interrupted, killed):
                wait_until(lambda: waits_on_fuse(proc.pid), 15, what=f"reader {proc.pid} to wait on the fetch")
            interrupted.send_signal(signal.SIGINT)  # Ctrl-C
            wait_until(lambda: exited(interrupted), 5, interval=0.05, what="the interrupted reader to exit")
            killed.kill()
            wait_until(lambda: exited(killed), 5, interval=0.05, what="the killed reader to exit")
        finally:
            hung.close()
            stop(interrupted)
            stop(killed)
        assert interrupted.returncode != 0 and killed.returncode == -signal.SIGKILL
    # The batch went on without its readers until the hung server dropped its connection.
    wait_until(lambda: "batch fetch of 1 objects failed" in afs.daemon_log(), 40, what="the batch to end")
    set_remote(afs, "faults", sample.url)  # the remote is back: the same read works, same mount
    assert (mnt / FILE).read_bytes() == sample.files[FILE]
    assert afs.mount_process("faults") == server


# --- a fault inside one operation ---


def test_an_unreadable_object_costs_one_operation_not_the_mount(afs: Artifactfs, sample: SampleRepo) -> None:
    mnt = mount_sample(afs, sample)
    server = afs.wait_mount_process("faults")
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    # A corrupt object behind the mount's back: FILE's blob as a loose object that will not inflate.
    # The mount finds the object and fails to read it.
    written = git("--git-dir", git_dir(afs, "faults"), "hash-object", "-w", "--stdin", input=sample.files[FILE])
    oid = written.stdout.decode().strip()
    assert oid == sample.blob_id(FILE)
    loose = git_dir(afs, "faults") / "objects" / oid[:2] / oid[2:]
    loose.write_bytes(b"\x78\x01 not zlib at all")
    with pytest.raises(OSError) as info:
        (mnt / FILE).read_bytes()
    assert info.value.errno == errno.EIO
    # The same mount keeps serving: lookups, listings, hydrated and unhydrated files.
    assert str(mnt) in fuse_mounts() and afs.mount_process("faults") == server
    assert sorted(os.listdir(mnt / "src" / "lib")) == ["data.json", "util.py"]
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    assert (mnt / "src/lib/util.py").read_bytes() == sample.files["src/lib/util.py"]
    log = afs.daemon_log()
    assert f"lookup failed: GitError: {oid}" in log, log[-3000:]  # one line: what failed, and why
    assert "Traceback" not in log


def test_unexpected_exceptions_become_eio_and_nothing_else_is_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(self: object, *args: object) -> None:
        raise KeyError("b1a5e5")

    async def refusing(self: object, *args: object) -> None:
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def cancelled(self: object, *args: object) -> None:
        raise KeyboardInterrupt  # a BaseException, as trio.Cancelled is

    class Owner:
        fsname = "artifactfs:unit"

    async def main() -> None:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await faults.contain("read", broken)(Owner(), 1, 0, 10)
        assert info.value.errno == errno.EIO
        with pytest.raises(pyfuse3.FUSEError) as info:
            await faults.contain("lookup", refusing)(Owner(), 1, b"x", None)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(KeyboardInterrupt):
            await faults.contain("read", cancelled)(Owner(), 1, 0, 10)
        assert await faults.contain("forget", broken)(Owner(), [(5, 1)]) is None  # forget never raises

    with caplog.at_level(logging.INFO, logger="artifactfs.fs"):
        trio.run(main)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "artifactfs:unit: read failed: KeyError: 'b1a5e5'",
        "artifactfs:unit: forget failed: KeyError: 'b1a5e5'",
    ]
    assert all(r.exc_info is None for r in errors)  # one line each, no traceback
    # Every kernel operation of the filesystem goes through it.
    assert "read" in faults.KERNEL_OPERATIONS and "forget" in faults.KERNEL_OPERATIONS
    for operation in faults.KERNEL_OPERATIONS:
        assert hasattr(getattr(operations.TreeFS, operation), "__wrapped__"), operation


# --- the gate ---


def test_callers_the_server_cannot_see_wait_at_the_gate() -> None:
    """tid 0 (a caller in a pid namespace the server cannot see) and a thread that is gone wait
    like any other caller; only a caller with a pending signal is let go (EINTR)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    # A live process with a pending signal it handles: stopped, so the signal stays pending.
    code = "import signal, time; signal.signal(signal.SIGUSR1, lambda *a: None); print(flush=True); time.sleep(600)"
    pending = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert pending.stdout is not None and pending.stdout.readline()
        pending.send_signal(signal.SIGSTOP)
        wait_until(lambda: process_state(pending.pid) == "T", what="the process to stop")
        pending.send_signal(signal.SIGUSR1)

        async def main() -> None:
            gate = Gate(GateState.CLOSED)
            event = trio.Event()
            for tid in (0, gone.pid):
                with trio.move_on_after(30) as waited:  # virtual seconds: many signal polls
                    await gate.wait(tid)
                assert waited.cancelled_caught, tid  # still waiting, not interrupted
                with trio.move_on_after(30) as waited:
                    await wait_for(event, tid)
                assert waited.cancelled_caught, tid
            with pytest.raises(pyfuse3.FUSEError) as info, trio.fail_after(30):
                await wait_for(event, pending.pid)
            assert info.value.errno == errno.EINTR
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gate.wait, 0)
                await trio.testing.wait_all_tasks_blocked()
                gate.open()  # ...and goes on once the gate opens

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        pending.kill()
        pending.wait()


def test_an_open_file_keeps_reading_while_a_later_prepare_holds_the_gate(afs: Artifactfs, sample: SampleRepo) -> None:
    mnt = mount_sample(afs, sample)
    big = sample.files["assets/big.txt"]
    # O_DIRECT: every read reaches the filesystem, none is answered from the page cache.
    fd = os.open(mnt / "assets/big.txt", os.O_RDONLY | os.O_DIRECT)
    dir_fd = os.open(mnt / "src", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.pread(fd, 4096, 0) == big[:4096]
        # No worker runs here: the new attempt stays queued, and the gate closed, until deadline.
        assert afs.run("prepare", "--name", "faults").stdout.startswith("queued faults")
        wait_until(lambda: describe(afs, "faults")["gate"] == "closed", what="the gate to close")
        read = in_thread(lambda: os.pread(fd, 1 << 20, 1 << 20))
        assert read(30) == big[1 << 20 : 2 << 20]
        listing = in_thread(lambda: sorted(os.listdir(dir_fd)))
        assert listing(30) == ["app.py", "lib"]
        assert describe(afs, "faults")["gate"] == "closed"  # new opens still wait
    finally:
        os.close(fd)
        os.close(dir_fd)


# --- many refreshes ---


def test_forgotten_nodes_of_old_commits_are_dropped(afs: Artifactfs, tmp_path: Path) -> None:
    sample = make_sample_repo(tmp_path, "refresh")
    afs.up()
    afs.add("refresh", sample.url)
    mnt = afs.wait_mounted("refresh")
    afs.wait_state("refresh", "mounted")
    first = sample.files["README.md"]
    old = os.open(mnt / "README.md", os.O_RDONLY | os.O_DIRECT)  # stays open across the refreshes
    try:
        for generation in range(4):
            readme = b"generation %d\n" % generation
            add_commit(sample, {"README.md": readme, f"gen/{generation}.txt": b"x\n"}, "refresh")
            afs.run("prepare", "--name", "refresh")
            wait_until(lambda: describe(afs, "refresh")["head"] == sample.head, 60, interval=0.1, what="the new commit")
            entries = sum(len(dirs) + len(files) for _, dirs, files in os.walk(mnt))  # looks up every node
            assert (mnt / "README.md").read_bytes() == readme
            assert os.pread(old, 4096, 0) == first  # the handle reads the commit it opened
            # Once the kernel forgets the old commit's inodes, the mount holds the commit shown
            # (its entries and the root) and the file still open: no more after many refreshes.
            wait_for_node_count(afs, "refresh", entries + 1 + 1)
    finally:
        os.close(old)
    wait_for_node_count(afs, "refresh", entries + 1)  # closed and forgotten: the old README goes too


def wait_for_node_count(afs: Artifactfs, name: str, bound: int) -> None:
    def settled() -> bool:
        drop_kernel_caches()
        return node_count(afs, name) <= bound

    wait_until(settled, 15, interval=0.5, what=f"the mount to hold at most {bound} nodes (it holds {node_count(afs, name)})")
