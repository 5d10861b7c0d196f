"""Fault drills: each one breaks a part of the real stack (afs.up(): a private redis-server, a Celery
worker, mountd, real FUSE mounts, real git remotes) at a bad moment, then checks with one shared
checker, assert_nothing_lost, that nothing was lost:

- every repository ends `mounted`, or `failed` with a clear one-line error that `artifactfs
  prepare` recovers (the checker runs it);
- nothing half-made is left under the state root: no temporary clone, no lock file, no git lock or
  temporary pack in a git directory, no state of a repository that is not registered;
- no mount is stale ("Transport endpoint is not connected"), and each serves its commit;
- no attempt appended an event twice;
- after `down`, no process of the installation remains (mountd, mount processes, the worker and its
  pool, redis-server, Flower, git) and nothing of it is mounted.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from artifactfs.mounts import fuse_mounts
from artifactfs.procs import all_pids, cmdline, identify
from artifactfs.registry import open_registry

from .conftest import Artifactfs, environ_root, follows_ready, new_installation, wait_until
from .gitremote import GitDaemon, SampleRepo, git, make_many_files_repo, make_sample_repo
from .test_async import Blocked, add_async
from .test_jobs import HeldRemote, group_members, held, history  # noqa: F401 (held: a fixture)

PREPARED_HISTORY = ["registered", "phase:validate", "phase:clone", "phase:index", "phase:publish", "ready"]
# Lock files of the stack itself: `up` and `down` take turns on it, and it stays (see stack.py).
STACK_LOCK = Path("run") / "stack.lock"


# --- the checker ------------------------------------------------------------------------------------


def installation_processes(afs: Artifactfs) -> dict[int, str]:
    """Every live process (zombies aside) started for this installation: its environment names
    this state root. That covers each service, the worker's pool, mount processes and any git they
    ran, however they were started."""
    return {pid: " ".join(cmdline(pid)) for pid in all_pids()
            if pid != os.getpid() and identify(pid) is not None and environ_root(pid) == str(afs.root)}  # fmt: skip


def installation_mounts(afs: Artifactfs) -> list[str]:
    return [p for p in fuse_mounts() if p.startswith((f"{afs.root}/", f"{afs.mount_root}/"))]


def walk_outside_mounts(top: Path) -> Iterator[Path]:
    """Every path under `top`, never entering a FUSE mount (a gated one would block the walk)."""
    mounts = set(fuse_mounts())
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in mounts]
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def half_made(afs: Artifactfs) -> list[str]:
    """What an interrupted job, command or fetch left under the state root."""
    left = [f"temporary {p}" for p in (afs.root / "tmp").iterdir()]
    for path in walk_outside_mounts(afs.root):
        rel = path.relative_to(afs.root)
        if path.name.endswith(".lock") and rel != STACK_LOCK:
            left.append(f"lock file {path}")  # ours under locks/, git's in a git directory
        elif path.name.startswith("tmp_") and path.parent.name == "pack":
            left.append(f"temporary pack {path}")  # a fetch that died mid-write
    return left


def attempts(afs: Artifactfs, name: str) -> list[list[str]]:
    """The events of each preparation attempt of `name` (phase events as phase:<phase>), but
    those that follow ready."""
    registry = open_registry(f"sqlite:///{afs.root / 'registry.db'}", host=afs.env["ARTIFACTFS_HOST"], busy_timeout=30)
    try:
        events = registry.events(name)
    finally:
        registry.close()
    found: list[list[str]] = []
    for event in (e for e in events if not follows_ready(e.type)):
        if event.type in ("registered", "prepare_requested") or not found:
            found.append([])
        found[-1].append(f"phase:{event.payload['phase']}" if event.type == "phase" else event.type)
    return found


def check_events(afs: Artifactfs, name: str) -> None:
    """Registered once; within each attempt nothing twice, and at most one outcome."""
    runs = attempts(afs, name)
    assert sum(run.count("registered") for run in runs) == 1, (name, runs)
    for run in runs:
        assert len(run) == len(set(run)), f"{name}: an event was appended twice in one attempt: {run}"
        assert not {"ready", "failed"} <= set(run), f"{name}: an attempt both succeeded and failed: {run}"


def statuses(afs: Artifactfs) -> dict[str, dict[str, object]]:
    return {str(row["repo"]): row for row in json.loads(afs.run("status", "--json").stdout)}


def settled_statuses(afs: Artifactfs, timeout: float) -> dict[str, dict[str, object]]:
    """Every repository's status row once none is preparing any more."""

    def settled() -> dict[str, dict[str, object]] | None:
        rows = statuses(afs)
        return rows if all(row["state"] != "preparing" for row in rows.values()) else None

    return wait_until(settled, timeout, interval=0.2, what="every repository to be prepared or failed")


def check_mount_serves(afs: Artifactfs, row: Mapping[str, object]) -> None:
    """The mount is there, not stale, and shows the top level of the commit the registry holds."""
    name, mnt = str(row["repo"]), Path(str(row["mount_path"]))
    assert str(mnt) in fuse_mounts(), f"{name}: {mnt} is not mounted"
    top = git("--git-dir", afs.root / "git" / f"{name}.git", "ls-tree", "--name-only", str(row["head"]))
    assert sorted(os.listdir(mnt)) == sorted([*top.stdout.decode().splitlines(), ".git"]), name


def assert_nothing_lost(afs: Artifactfs, repos: Collection[str], *, failed: Mapping[str, str] | None = None,
                        timeout: float = 120.0) -> None:  # fmt: skip
    """The drill lost nothing (see the module's docstring), then `down` leaves nothing running.

    `repos` are every repository the drill registered; `failed` maps those allowed to end failed to
    a part of their error. The drill must have removed the cause first: the checker recovers each
    one with `artifactfs prepare` and requires it mounted.
    """
    failed = dict(failed or {})
    rows = settled_statuses(afs, timeout)
    assert sorted(rows) == sorted(repos), "registered repositories differ from those the drill added"
    listed = [line.split("\t")[0] for line in afs.run("list-repos").stdout.splitlines()]
    assert sorted(listed) == sorted(repos)
    for name, row in rows.items():
        if row["state"] == "failed":
            error = str(row["prepare_error"])
            assert name in failed, f"{name} failed: {error}"
            assert failed[name].lower() in error.lower(), f"{name}: unexpected error: {error}"
            assert error.isprintable() and "\n" not in error and "Traceback" not in error, error
            assert afs.run("prepare", "--name", name).stdout.startswith(f"queued {name} (attempt ")
    if any(row["state"] == "failed" for row in rows.values()):
        rows = settled_statuses(afs, timeout)
    for name, row in rows.items():
        assert row["state"] == "mounted", f"{name} ended {row['state']}: {row['prepare_error'] or row['problem']}"
        check_mount_serves(afs, row)
        check_events(afs, name)
    for path in installation_mounts(afs):
        try:
            os.stat(path)
        except OSError as exc:
            raise AssertionError(f"{path} is stale: {exc}") from None
    assert half_made(afs) == []
    # Nothing kept for a repository that is not registered: git dirs, state, mount processes.
    assert sorted(p.name for p in (afs.root / "git").iterdir()) == sorted(f"{n}.git" for n in repos)
    assert {p.name for p in (afs.root / "state").iterdir()} <= set(repos)
    assert {p.stem for p in (afs.root / "run" / "mounts").iterdir()} <= set(repos)
    assert list((afs.root / "credentials").iterdir()) == []

    out = afs.down()
    assert not [line for line in out.splitlines() if ": killed" in line], out  # all stopped when asked
    assert installation_mounts(afs) == []
    wait_until(lambda: not installation_processes(afs), 30, what="every process of the installation to exit")
    assert list((afs.root / "run" / "mounts").iterdir()) == []
    assert half_made(afs) == []


# --- helpers ----------------------------------------------------------------------------------------


def service_alive(afs: Artifactfs, name: str, pid: int) -> bool:
    return afs.service_pid(name) == pid and identify(pid) is not None


# --- 1. mountd killed ---------------------------------------------------------------------------------


def test_mountd_killed_mid_read_and_mid_prepare(afs: Artifactfs, held: HeldRemote) -> None:
    sample = held.sample
    afs.env.update(held.env)  # the worker and the mount processes reach the remote through it
    afs.up()
    held.release()
    add_async(afs, "reading", held.url)
    afs.wait_state("reading", "mounted")
    reading = afs.mount_path("reading")
    held.hold()  # from now on every connection to the remote waits: a clone, a lazy fetch
    add_async(afs, "gated", held.url)
    afs.wait_phase("gated", "clone")  # the validation runs beside the clone
    gated = afs.mount_path("gated")
    servers = {name: afs.wait_mount_process(name) for name in ("reading", "gated")}

    big = Blocked(lambda: (reading / "assets/big.txt").read_bytes())  # 2 MiB, not hydrated yet
    listing = Blocked(lambda: sorted(os.listdir(gated)))  # waits at the gate
    wait_until(lambda: len(held.processes()) == 3, 30, what="the lazy fetch, the validation and the clone to be held")
    afs.stop_service("mountd", signal.SIGKILL)
    assert big.blocked and listing.blocked

    # No mountd: the read in flight completes, the placeholder keeps its caller waiting.
    held.release()
    assert big.join(60) == sample.files["assets/big.txt"]
    wait_until(lambda: afs.registry_state("gated") == "ready", 60, interval=0.1, what="the job to finish")
    assert listing.blocked  # only a mountd opens a gate: nothing answered it wrongly meanwhile
    assert (reading / "README.md").read_bytes() == sample.files["README.md"]

    afs.up()  # starts mountd alone; it adopts both mount processes and opens the gate
    for name in servers:
        wait_until(lambda: f"{name}: adopted mount process {servers[name]}" in afs.log("mountd"), 30,
                   what=f"mountd to adopt {name}")  # fmt: skip
    top = {p.split("/")[0] for p in [*sample.files, *sample.symlinks, *sample.gitlinks]}
    assert listing.join(60) == sorted(top | {".git"})
    assert {name: afs.mount_process(name) for name in servers} == servers  # adopted, not replaced
    assert (gated / "src/app.py").read_bytes() == sample.files["src/app.py"]
    assert_nothing_lost(afs, ["reading", "gated"])


# --- 2. the worker killed in each phase -------------------------------------------------------------

# What the job run again appends after the worker died at each failpoint: nothing twice (the same
# job id, so the same dedupe keys); past the clone it finds the clone in place and fetches into it.
AFTER_KILL_AT = {
    "validate": PREPARED_HISTORY,
    "clone": PREPARED_HISTORY,
    "index": ["registered", "phase:validate", "phase:clone", "phase:index", "phase:fetch", "phase:update_branch",
              "phase:publish", "ready"],
    "publish": ["registered", "phase:validate", "phase:clone", "phase:index", "phase:publish", "phase:fetch",
                "phase:update_branch", "ready"],
}  # fmt: skip


@pytest.mark.parametrize("phase", list(AFTER_KILL_AT))
def test_worker_killed_in_a_phase_then_the_job_completes(afs: Artifactfs, sample: SampleRepo, phase: str) -> None:
    afs.env["ARTIFACTFS_FAILPOINT"] = f"phase:{phase}"
    afs.up()
    add_async(afs, "drill", sample.url)
    wait_until(lambda: f"drill: failpoint phase:{phase} reached" in afs.log("worker"), 60, interval=0.1,
               what="the failpoint")  # fmt: skip
    worker = afs.service_pid("worker")
    os.killpg(worker, signal.SIGKILL)  # the worker, its pool and whatever the job ran, mid-job
    wait_until(lambda: not group_members(worker), 60, interval=0.1, what="the worker to be gone")
    assert afs.registry_state("drill") == "preparing"
    del afs.env["ARTIFACTFS_FAILPOINT"]
    out = afs.up()  # a worker without the failpoint; mountd sends the job again when it is online
    assert "worker: started" in out and "mountd: already running" in out, out
    afs.wait_state("drill", "mounted", timeout=90)
    assert history(afs, "drill") == AFTER_KILL_AT[phase]
    assert (afs.mount_path("drill") / "README.md").read_bytes() == sample.files["README.md"]
    assert_nothing_lost(afs, ["drill"])


# --- 3. redis-server killed ---------------------------------------------------------------------------


def test_redis_killed_then_brought_back_by_up(afs: Artifactfs, sample: SampleRepo, held: HeldRemote) -> None:
    afs.env.update(held.env)
    afs.up()
    add_async(afs, "before", sample.url)
    afs.wait_state("before", "mounted")
    add_async(afs, "inflight", held.url)  # its clone waits on the remote across the outage
    afs.wait_phase("inflight", "clone")
    services = {name: afs.service_pid(name) for name in ("worker", "mountd")}

    afs.stop_service("redis", signal.SIGKILL)
    add_async(afs, "during", sample.url)  # registered in the log; nobody hears the wake-up
    held.release()  # the job in flight finishes while the broker is gone
    wait_until(lambda: afs.registry_state("inflight") == "ready", 60, interval=0.1, what="the job to finish")
    wait_until(lambda: "during: could not publish the prepare job" in afs.log("mountd"), 30,
               what="mountd to find the broker gone")  # fmt: skip
    # The worker lost its broker with a job running: it tries to reconnect, or it is gone.
    wait_until(lambda: "consumer: Cannot connect to" in afs.log("worker") or identify(services["worker"]) is None,
               30, what="the worker to try to reconnect")  # fmt: skip
    assert all(service_alive(afs, name, pid) for name, pid in services.items()), afs.log("worker")[-3000:]
    assert afs.status("before")["state"] == "mounted"

    out = afs.up()  # starts what is missing: redis alone
    assert "redis: started" in out and "worker: already running" in out and "mountd: already running" in out, out
    add_async(afs, "after", sample.url)
    for name in ("inflight", "during", "after"):
        afs.wait_state(name, "mounted", timeout=90)
    assert all(service_alive(afs, name, pid) for name, pid in services.items())  # they lived through it
    assert (afs.mount_path("during") / "README.md").read_bytes() == sample.files["README.md"]
    assert_nothing_lost(afs, ["before", "inflight", "during", "after"])


# --- 4. the remote vanishing mid-batch ----------------------------------------------------------------

PROMPT_EIO_SECONDS = 20.0  # generous on a loaded machine: the point is "not hanging"


def test_remote_vanishing_mid_fetch_gives_eio_then_the_same_read_works(afs: Artifactfs, git_daemon: GitDaemon) -> None:
    sample = make_sample_repo(git_daemon.base, "vanish")
    afs.up()
    add_async(afs, "vanish", git_daemon.url("vanish.git"))
    afs.wait_state("vanish", "mounted")
    mnt = afs.mount_path("vanish")
    server = afs.wait_mount_process("vanish")

    # The remote goes away while a lazy fetch is in flight (its pack is being held back).
    git_daemon.set_delay(60.0)
    fetches = git_daemon.fetch_count("vanish.git")
    big = Blocked(lambda: (mnt / "assets/big.txt").read_bytes())
    wait_until(lambda: git_daemon.fetch_count("vanish.git") == fetches + 1, 30, what="the lazy fetch to start")
    git_daemon.stop()
    with pytest.raises(OSError) as info:
        big.join(PROMPT_EIO_SECONDS)
    assert info.value.errno == errno.EIO
    # ... and a read that starts while it is away fails the same way.
    with pytest.raises(OSError) as info:
        (mnt / "src/lib/util.py").read_bytes()
    assert info.value.errno == errno.EIO
    assert afs.status("vanish")["state"] == "mounted"  # the mount itself never went anywhere

    git_daemon.set_delay(0)
    git_daemon.start()  # back on the same port
    assert (mnt / "assets/big.txt").read_bytes() == sample.files["assets/big.txt"]
    assert (mnt / "src/lib/util.py").read_bytes() == sample.files["src/lib/util.py"]
    assert afs.mount_process("vanish") == server  # the same mount: nothing was remounted
    assert_nothing_lost(afs, ["vanish"])


# --- 5. the state root's file system fills up ---------------------------------------------------------

SMALL_ROOT_SIZE = "32m"
HEADROOM = 256 * 1024  # left free for the registry, the logs and Redis while the disk is "full"


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Artifactfs]:
    """An installation whose state root is a small tmpfs of its own (unmounted at the end)."""
    top = tmp_path / "small"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_ROOT_SIZE},mode=0711", "tmpfs", str(top)], check=True)
    inst = new_installation(tmp_path)
    inst.root = top / "afs"
    inst.env["ARTIFACTFS_ROOT"] = str(inst.root)
    try:
        yield inst
    finally:
        try:
            inst.cleanup()
        finally:
            if subprocess.run(["umount", str(top)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(top)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextmanager
def filled(top: Path, leave: int) -> Iterator[None]:
    """Fill the file system of `top` until only `leave` bytes are free; free it all again after."""
    ballast = top / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, free_bytes(top) - leave)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        ballast.unlink()


def temporary_packs(afs: Artifactfs) -> list[Path]:
    return list((afs.root / "git").glob("*.git/objects/pack/tmp_*"))


def test_a_full_state_root_fails_a_clone_and_a_read_cleanly(small: Artifactfs, tmp_path: Path, sample: SampleRepo) -> None:
    afs, top = small, small.root.parent
    # Its blobless clone alone (trees of 20000 entries) needs more than the headroom.
    wide = make_many_files_repo(tmp_path / "remotes", "wide", files=20000, dirs=4, file_size=24)
    afs.up()
    add_async(afs, "roomy", sample.url)
    afs.wait_state("roomy", "mounted")
    mnt = afs.mount_path("roomy")
    server = afs.wait_mount_process("roomy")

    with filled(top, HEADROOM):
        add_async(afs, "wide", wide.url)
        row = afs.wait_state("wide", "failed", timeout=90)
        assert "no space left on device" in str(row["prepare_error"]).lower(), row["prepare_error"]
        assert half_made(afs) == [] and not (afs.root / "git" / "wide.git").exists()
        # A read whose blob does not fit any more: EIO, and the mount stays up.
        with pytest.raises(OSError) as info:
            (mnt / "assets/blob.bin").read_bytes()
        assert info.value.errno == errno.EIO
        # The failed fetch's temporary pack goes (after the grace that tells it from a fetch at
        # work), and with it the space it held.
        wait_until(lambda: temporary_packs(afs) == [], 30, what="the temporary packs to be removed")
        assert afs.status("roomy")["state"] == "mounted" and afs.mount_process("roomy") == server
        assert str(mnt) in fuse_mounts() and os.listdir(mnt)

    assert (mnt / "assets/blob.bin").read_bytes() == sample.files["assets/blob.bin"]  # no remount needed
    assert afs.mount_process("roomy") == server
    assert_nothing_lost(afs, ["roomy", "wide"], failed={"wide": "No space left on device"})


# --- 6. many adds at once -----------------------------------------------------------------------------

CONCURRENT_ADDS = 30


def test_thirty_concurrent_async_adds_register_once_and_all_mount(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.up()
    names = [f"burst-{i:02d}" for i in range(CONCURRENT_ADDS)]
    racing = names[:3]  # each added twice at once: one of the two must be refused
    argv = [sys.executable, "-m", "artifactfs.cli", "add-repo", "--async", "--remote", sample.url, "--name"]
    procs = [(name, subprocess.Popen([*argv, name], env=afs.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
             for name in [*names, *racing]]  # fmt: skip
    outcomes: dict[str, list[tuple[int, str, str]]] = {name: [] for name in names}
    for name, proc in procs:
        out, err = proc.communicate(timeout=180)
        outcomes[name].append((proc.returncode, out.strip(), err.strip()))
    for name, runs in outcomes.items():
        queued = [run for run in runs if run[0] == 0]
        assert [run[1] for run in queued] == [f"queued {name}"], runs
        for code, out, err in runs:
            if code != 0:  # the loser of a race: one clear line, nothing else
                assert code == 1 and out == "" and len(err.splitlines()) == 1, runs
                assert err.startswith(f"artifactfs: error: a repository named '{name}' is already registered"), err
    rows = settled_statuses(afs, 240)
    assert {name: row["state"] for name, row in rows.items()} == dict.fromkeys(names, "mounted")
    assert {name: attempts(afs, name) for name in names} == {name: [PREPARED_HISTORY] for name in names}
    assert (afs.mount_path(names[-1]) / "README.md").read_bytes() == sample.files["README.md"]
    assert_nothing_lost(afs, names, timeout=240)


# --- 7. the registry locked for longer than the busy timeout ------------------------------------------


def test_a_registry_locked_past_the_busy_timeout_then_everything_converges(
    afs: Artifactfs, sample: SampleRepo, held: HeldRemote
) -> None:
    afs.env.update(ARTIFACTFS_DB_BUSY_TIMEOUT="1", **held.env)
    afs.up()
    add_async(afs, "early", sample.url)
    afs.wait_state("early", "mounted")
    add_async(afs, "inflight", held.url)  # its job records its next phase while the lock is held
    afs.wait_phase("inflight", "clone")
    services = {name: afs.service_pid(name) for name in ("worker", "mountd")}
    registry = afs.root / "registry.db"

    with afs.registry_locked(exclusive=True):
        held.release()
        for command in (("add-repo", "--async", "--name", "late", "--remote", sample.url),
                        ("prepare", "--name", "early"), ("remove-repo", "--name", "early")):  # fmt: skip
            line = afs.fail(*command)
            assert f"the registry {registry} stayed locked by another process for more than 1s" in line, line
        wait_until(lambda: "inflight: the registry is busy, trying again in" in afs.log("worker"), 60, interval=0.1,
                   what="the job to meet the lock")  # fmt: skip
        assert all(service_alive(afs, name, pid) for name, pid in services.items())
        assert (afs.mount_path("early") / "README.md").read_bytes() == sample.files["README.md"]

    assert all(service_alive(afs, name, pid) for name, pid in services.items())
    afs.wait_state("inflight", "mounted", timeout=90)
    assert history(afs, "early") == PREPARED_HISTORY  # the refused commands appended nothing
    assert not afs.mount_path("late").exists()
    add_async(afs, "late", sample.url)  # the same command again, now that the lock is gone
    assert_nothing_lost(afs, ["early", "inflight", "late"])
