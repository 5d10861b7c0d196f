"""Prepare jobs and how they fail, with the real stack (redis-server, a Celery worker, mountd) or
with jobs run in processes of their own, against real git remotes: time limits, a busy registry,
stale git locks, credentials, fault-drill failpoints, and duplicate deliveries running at once."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from artifactfs.config import load_settings
from artifactfs.gitstore import remove_abandoned_packs, temporary_packs
from artifactfs.jobs import failpoint_from_env
from artifactfs.model import EventType, NewEvent, Phase, RepoState
from artifactfs.prepare import Preparation
from artifactfs.procs import all_pids, process_group
from artifactfs.registry import open_registry

from .conftest import PYTHON, Artifactfs, command_lines, follows_ready, wait_until
from .gitremote import GitDaemon, GitHttpServer, SampleRepo, make_sample_repo

# --- helpers ----------------------------------------------------------------------------------------

FAKE_SSH = """#!/bin/bash
# A stand-in for ssh: runs the remote command (git-upload-pack '<path>') on this machine. The
# first git ls-remote (the check of the validate phase, which runs beside the clone) is served at
# once; while {state}/hold exists, every other connection waits (a remote that hangs) until the hold is
# lifted; with {state}/hold-all, the ls-remote waits too. Who asks is told by the command line of
# the git that started this (or of the shell between them): not by the order of arrival, which
# is a race between the check and the clone.
for last; do :; done
asker=$(tr '\\0' ' ' < /proc/$PPID/cmdline 2>/dev/null)
grandparent=$(awk '{{print $4}}' /proc/$PPID/stat 2>/dev/null)
asker="$asker $(tr '\\0' ' ' < /proc/$grandparent/cmdline 2>/dev/null)"
case "$asker" in
    *ls-remote*) [ -e {state}/hold-all ] || ! mkdir {state}/first 2>/dev/null || served=1 ;;
esac
if [ -z "$served" ]; then
    while [ -e {state}/hold ]; do sleep 0.05; done
fi
exec sh -c "$last"
"""


@dataclass
class HeldRemote:
    """A sample repository reached over ssh:// through FAKE_SSH, which can hold its clones."""

    sample: SampleRepo
    state: Path

    @property
    def script(self) -> Path:
        return self.state / "fake-ssh"

    @property
    def url(self) -> str:
        return f"ssh://fakehost{self.sample.bare}"

    @property
    def env(self) -> dict[str, str]:
        return {"GIT_SSH_COMMAND": str(self.script), "GIT_SSH_VARIANT": "simple"}

    def hold(self) -> None:
        (self.state / "hold").touch()

    def hold_all(self) -> None:
        (self.state / "hold-all").touch()

    def release(self) -> None:
        (self.state / "hold-all").unlink(missing_ok=True)
        (self.state / "hold").unlink(missing_ok=True)

    def processes(self) -> list[int]:
        """Processes still running this remote's stand-in for ssh."""
        return [pid for pid, line in command_lines().items() if str(self.script) in line]


@pytest.fixture
def held(tmp_path: Path) -> Iterator[HeldRemote]:
    state = tmp_path / "held"
    state.mkdir()
    remote = HeldRemote(make_sample_repo(tmp_path / "remotes", "held"), state)
    remote.script.write_text(FAKE_SSH.format(state=state))
    remote.script.chmod(0o755)
    remote.hold()
    try:
        yield remote
    finally:
        remote.release()
        for pid in remote.processes():  # left over only by a failed test
            with _gone():
                os.kill(pid, signal.SIGKILL)


@contextmanager
def _gone() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


def add_async(afs: Artifactfs, name: str, remote: str) -> None:
    out = afs.run("add-repo", "--async", "--name", name, "--remote", remote).stdout
    assert out.strip() == f"queued {name}"


def events(afs: Artifactfs, name: str) -> list[dict[str, Any]]:
    return json.loads(afs.run("events", "--name", name, "--json").stdout)


def history(afs: Artifactfs, name: str) -> list[str]:
    """Event types, with each phase event as phase:<phase>; those that follow ready left out."""
    return [f"phase:{e['payload']['phase']}" if e["type"] == "phase" else e["type"]
            for e in events(afs, name) if not follows_ready(e["type"])]  # fmt: skip


def settled(afs: Artifactfs, name: str, timeout: float = 90.0) -> dict[str, object]:
    """The status row once the current attempt has ended, one way or the other."""
    return wait_until(lambda: (row := afs.status(name))["state"] != "preparing" and row, timeout, interval=0.1,
                      what=f"{name} to be prepared or failed")  # fmt: skip


def phase_of(afs: Artifactfs, name: str) -> str | None:
    """The phase of `name`'s attempt; None while it is not registered (yet)."""
    proc = afs.run("status", "--name", name, "--json", check=False)
    return json.loads(proc.stdout)["phase"] if proc.returncode == 0 else None


def flock_pids(lock_file: Path) -> tuple[list[int], list[int]]:
    """(holders, waiters) of the flock on `lock_file`, from /proc/locks."""
    inode = str(lock_file.stat().st_ino)
    holders: list[int] = []
    waiters: list[int] = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        blocked = len(fields) > 1 and fields[1] == "->"
        if blocked:
            fields = [fields[0], *fields[2:]]
        # "1: FLOCK  ADVISORY  WRITE 1234 08:02:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode:
            (waiters if blocked else holders).append(int(fields[4]))
    return holders, waiters


def one_inside_one_waiting(lock_file: Path) -> bool:
    if not lock_file.exists():
        return False
    holders, waiters = flock_pids(lock_file)
    return len(holders) == 1 and len(waiters) == 1


def publish_duplicate(afs: Artifactfs, name: str) -> str:
    """Publish the prepare job of `name`'s current attempt again, as a redelivery (or anyone who can
    reach the broker, e.g. through Flower) would."""
    code = ("from artifactfs.config import load_settings; from artifactfs.registry import open_registry; "
            "from artifactfs.jobs import publish_prepare; s = load_settings(); "
            f"print(publish_prepare(s, open_registry(s.database_url).require({name!r})))")  # fmt: skip
    return subprocess.run([PYTHON, "-c", code], env=afs.env, capture_output=True, text=True, check=True).stdout.strip()


# A prepare job run in a process of its own, as a Celery pool process would run it: it says "ready",
# waits for a line on stdin (a barrier the test lifts for every job at once), runs, prints the outcome.
JOB = """
import logging, sys
from artifactfs.config import load_settings
from artifactfs.jobs import run_prepare_job, task_id
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
name, version = sys.argv[1], int(sys.argv[2])
settings = load_settings()
print("ready", flush=True)
sys.stdin.readline()
print(run_prepare_job(settings, name, version, job_id=task_id(settings.host, name, version)).outcome.value, flush=True)
"""


@dataclass
class JobProcess:
    proc: subprocess.Popen[str]
    log: Path

    @classmethod
    def start(cls, env: dict[str, str], name: str, version: int, log: Path) -> "JobProcess":
        with open(log, "w") as err:
            proc = subprocess.Popen([PYTHON, "-c", JOB, name, str(version)], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)  # fmt: skip
        job = cls(proc, log)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", job.stderr()
        return job

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def outcome(self, timeout: float = 120) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, self.stderr()
        return out.strip()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def run_job(afs: Artifactfs, name: str, version: int, log: Path, **env: str) -> str:
    job = JobProcess.start({**afs.env, **env}, name, version, log)
    job.go()
    return job.outcome()


def attempt_version(afs: Artifactfs, name: str) -> int:
    """The stream version of the event that began the current attempt."""
    begun = [e for e in events(afs, name) if e["type"] in ("registered", "prepare_requested")]
    return int(begun[-1]["version"])


# --- 1. the soft time limit -------------------------------------------------------------------------


def test_soft_time_limit_is_recorded_as_a_timeout_and_leaves_nothing_behind(afs: Artifactfs, held: HeldRemote) -> None:
    afs.env.update(ARTIFACTFS_JOB_SOFT_LIMIT="3", ARTIFACTFS_JOB_HARD_LIMIT="60", **held.env)
    afs.up()
    add_async(afs, "hang", held.url)  # validated, then the clone hangs: its ssh never answers
    row = settled(afs, "hang")
    assert row["state"] == "failed"
    assert row["prepare_error"] == "preparation exceeded its time limit of 3s (ARTIFACTFS_JOB_SOFT_LIMIT)"
    assert history(afs, "hang") == ["registered", "phase:validate", "phase:clone", "failed"]
    # The job ended git and what git had started (the ssh still waiting), and removed its clone.
    assert held.processes() == []
    assert list((afs.root / "tmp").iterdir()) == []
    assert not (afs.root / "git" / "hang.git").exists()
    assert "internal error" not in afs.log("worker")

    held.release()
    assert afs.run("prepare", "--name", "hang").stdout.strip() == "queued hang (attempt 2)"
    assert settled(afs, "hang")["state"] == "mounted"
    assert (afs.mount_path("hang") / "README.md").read_bytes() == held.sample.files["README.md"]


def test_a_time_limit_during_the_clone_is_not_held_up_by_the_remote_check(afs: Artifactfs, held: HeldRemote) -> None:
    # The check beside the clone (git ls-remote) hangs as the clone does: the time limit still
    # ends the job at once, as a time limit, and stops the check and its ssh too.
    held.hold_all()
    afs.env.update(ARTIFACTFS_JOB_SOFT_LIMIT="3", ARTIFACTFS_JOB_HARD_LIMIT="60", **held.env)
    afs.up()
    add_async(afs, "both", held.url)
    row = settled(afs, "both")
    assert row["prepare_error"] == "preparation exceeded its time limit of 3s (ARTIFACTFS_JOB_SOFT_LIMIT)"
    assert held.processes() == []


# --- 2. a busy registry -----------------------------------------------------------------------------


def test_a_busy_registry_is_waited_out_with_backoff(afs: Artifactfs, held: HeldRemote) -> None:
    afs.env.update(ARTIFACTFS_DB_BUSY_TIMEOUT="1", **held.env)
    afs.up()
    add_async(afs, "busy", held.url)
    afs.wait_phase("busy", "clone")
    with afs.registry_locked():
        held.release()  # the clone lands; recording its next phase finds the registry locked
        wait_until(lambda: "busy: the registry is busy, trying again in" in afs.log("worker"), 60, interval=0.1,
                   what="the job to find the registry busy")  # fmt: skip
    assert settled(afs, "busy")["state"] == "mounted"
    assert history(afs, "busy") == ["registered", "phase:validate", "phase:clone", "phase:index", "phase:publish", "ready"]
    assert "goes back to the queue" not in afs.log("worker")


def test_a_registry_busy_for_too_long_hands_the_job_back_to_the_queue(afs: Artifactfs, held: HeldRemote) -> None:
    afs.env.update(ARTIFACTFS_DB_BUSY_TIMEOUT="1", **held.env)
    afs.up()
    add_async(afs, "stuck", held.url)
    afs.wait_phase("stuck", "clone")
    with afs.registry_locked():
        held.release()
        # Six busy timeouts of trying, then the task retries the whole job later instead of dropping it.
        wait_until(lambda: "stuck: the registry stayed busy, the job goes back to the queue" in afs.log("worker"), 90,
                   interval=0.1, what="the job to be handed back")  # fmt: skip
    assert afs.registry_state("stuck") == "preparing"
    assert settled(afs, "stuck")["state"] == "mounted"
    # Run again, the job fetched into the clone the first run had put in place; nothing twice.
    assert history(afs, "stuck") == ["registered", "phase:validate", "phase:clone", "phase:fetch",
                                     "phase:update_branch", "phase:index", "phase:publish", "ready"]  # fmt: skip
    assert "Retry in" in afs.log("worker")


# --- 3. stale git locks -----------------------------------------------------------------------------

STALE_LOCKS = ("index.lock", "config.lock", "HEAD.lock", "shallow.lock", "packed-refs.lock", "refs/heads/main.lock")


def test_stale_git_locks_left_by_a_killed_job_are_cleared(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.up()
    add_async(afs, "locked", sample.url)
    assert settled(afs, "locked")["state"] == "mounted"
    git_dir = afs.root / "git" / "locked.git"
    for name in STALE_LOCKS:  # as a job killed mid-write leaves them
        (git_dir / name).write_text("")
    abandoned, in_use = git_dir / "objects/pack/tmp_pack_Ab3dEf", git_dir / "objects/pack/tmp_idx_InUse1"
    for path in (abandoned, in_use):
        path.write_bytes(b"PACK")
        os.utime(path, (time.time() - 3600,) * 2)  # left an hour ago, by a fetch killed mid-write
    with in_use.open("rb"):  # ...unless a fetch (a mount's, say) is at work: then nothing goes
        assert afs.run("prepare", "--name", "locked").stdout.strip() == "queued locked (attempt 2)"
        row = settled(afs, "locked")
        assert row["state"] == "mounted", row["prepare_error"]
        assert abandoned.exists() and in_use.exists()
    assert [name for name in STALE_LOCKS if (git_dir / name).exists()] == []
    assert afs.run("prepare", "--name", "locked").stdout.strip() == "queued locked (attempt 3)"
    assert settled(afs, "locked")["state"] == "mounted"
    assert not abandoned.exists() and not in_use.exists()
    assert "removed what a killed git left" in afs.log("worker")
    assert (afs.mount_path("locked") / "README.md").read_bytes() == sample.files["README.md"]


def test_temporary_packs_are_told_apart_by_inode_age_and_use(tmp_path: Path) -> None:
    real = tmp_path / "real.git"
    (real / "objects" / "pack").mkdir(parents=True)
    git_dir = tmp_path / "via-link.git"
    git_dir.symlink_to(real)  # the kernel names open files by the resolved path: match by inode
    old, fresh, held = (git_dir / "objects/pack" / n for n in ("tmp_pack_old", "tmp_pack_fresh", "tmp_rev_held"))
    for path in (old, fresh, held):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 60,) * 2)
    os.utime(held, (time.time() - 60,) * 2)
    with (real / "objects/pack/tmp_rev_held").open("rb"):
        assert remove_abandoned_packs(git_dir) == []  # a fetch is at work here
    assert remove_abandoned_packs(git_dir, {old}) == [old]  # only what was asked, and old enough
    assert remove_abandoned_packs(git_dir) == [held]  # fresh: within the grace period
    assert fresh.exists() and temporary_packs(git_dir) == {fresh}


def test_abandon_removes_only_this_repositorys_temporaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTIFACTFS_ROOT", str(tmp_path / "afs"))
    settings = load_settings()
    mine, other = settings.tmp_root / "a.git.k3x9_q2z", settings.tmp_root / "a.git.git.k3x9_q2z"  # "a" and "a.git"
    for path in (mine, other):
        path.mkdir(parents=True)
    repo = RepoState(name="a", remote_url="file:///r.git", ref="refs/heads/main", mount_path="/m/a", git_dir="")
    Preparation(settings, None, repo, "job").abandon()  # type: ignore[arg-type]
    assert not mine.exists() and other.exists()


# --- 4. credentials ---------------------------------------------------------------------------------

USER, TOKEN = "alice", "tok-0a1b2c3d-secret"


def test_a_worker_never_prepares_a_repository_with_inline_credentials(afs: Artifactfs, tmp_path: Path) -> None:
    base = tmp_path / "http"
    base.mkdir()
    make_sample_repo(base, "private")
    with GitHttpServer(base, USER, TOKEN) as server:
        afs.up()
        afs.add("private", server.url("private.git", with_credentials=True))  # blocking: the CLI clones
        assert (afs.root / "credentials" / "private").exists()
        # Its attempts run here, in the calling process, never in a worker. Leave one unfinished
        # (the command dies mid-fetch), then forge a job for it: a redelivery, or anyone who
        # reaches the broker through Flower.
        server.clear_requests()
        server.set_delay(60)
        prepare = subprocess.Popen([PYTHON, "-m", "artifactfs.cli", "prepare", "--name", "private"], env=afs.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_until(lambda: server.requests, 60, interval=0.05, what="prepare to reach the server")
        finally:
            prepare.kill()
            prepare.wait()
        server.set_delay(0)
        before = history(afs, "private")
        server.clear_requests()
        assert afs.registry_state("private") == "preparing"
        assert publish_duplicate(afs, "private").startswith(afs.task_id("private", ""))
        wait_until(lambda: "private: skipped: the repository has inline credentials" in afs.log("worker"), 60,
                   interval=0.1, what="the worker to refuse the job")  # fmt: skip
        assert history(afs, "private") == before  # nothing appended by the job
        assert server.requests == []  # the worker never used the credential
        assert afs.registry_state("private") == "preparing"  # until the deadline, or `prepare` here
        assert TOKEN not in afs.log("worker")


def test_a_forged_job_for_a_blocking_add_appends_nothing(afs: Artifactfs, git_daemon: GitDaemon) -> None:
    make_sample_repo(git_daemon.base, "blk")
    afs.up()
    git_daemon.set_delay(60)
    add = subprocess.Popen([PYTHON, "-m", "artifactfs.cli", "add-repo", "--name", "blk", "--remote",
                            git_daemon.url("blk.git")], env=afs.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: phase_of(afs, "blk") == "clone", 60, interval=0.1, what="the blocking add to clone")
    finally:
        add.kill()  # the command that prepares it in its own process dies: the attempt is orphaned
        add.wait()
    git_daemon.set_delay(0)
    before = history(afs, "blk")
    assert publish_duplicate(afs, "blk") == afs.task_id("blk", 1)  # a job nobody should have sent
    wait_until(lambda: "blk: skipped: the attempt begun at version 1 is prepared by the command that began it"
               in afs.log("worker"), 60, interval=0.1, what="the worker to refuse the job")  # fmt: skip
    assert history(afs, "blk") == before
    assert afs.registry_state("blk") == "preparing"


# --- 5. failpoints for fault drills -----------------------------------------------------------------


def test_failpoint_is_inert_unless_set_to_a_phase(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("ARTIFACTFS_FAILPOINT", raising=False)
    assert failpoint_from_env() is None
    monkeypatch.setenv("ARTIFACTFS_FAILPOINT", "phase:update_branch")
    assert failpoint_from_env() is Phase.UPDATE_BRANCH
    monkeypatch.setenv("ARTIFACTFS_FAILPOINT", "phase:cl\x1bone")
    with caplog.at_level(logging.ERROR):
        assert failpoint_from_env() is None
    assert "'phase:cl\\x1bone' is not phase:<validate|clone|fetch|update_branch|index|publish|history>" in caplog.text


REFRESH_PHASES = (Phase.FETCH, Phase.UPDATE_BRANCH)  # only a repository prepared before has these


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
def test_failpoint_stops_a_job_after_its_phase_and_the_job_run_again_completes(
    afs: Artifactfs, sample: SampleRepo, tmp_path: Path, phase: Phase
) -> None:
    name = f"fp-{phase.value.replace('_', '-')}"
    if phase in REFRESH_PHASES:
        afs.add(name, sample.url)
        afs.run("prepare", "--name", name)
    else:
        add_async(afs, name, sample.url)  # no mountd: registered, and nothing else happens
    version = attempt_version(afs, name)
    before = history(afs, name)
    job = JobProcess.start({**afs.env, "ARTIFACTFS_FAILPOINT": f"phase:{phase.value}"}, name, version,
                           tmp_path / "job.log")  # fmt: skip
    try:
        job.go()
        wait_until(lambda: f"failpoint phase:{phase.value} reached" in job.stderr() or job.proc.poll() is not None,
                   60, what="the failpoint")  # fmt: skip
        assert job.proc.poll() is None, f"the job did not stop at the failpoint:\n{job.stderr()}"
        # Stopped right after its event (the history's: after ready, and left out by history()).
        assert history(afs, name)[-1] == ("ready" if phase is Phase.HISTORY else f"phase:{phase.value}")
        if phase is Phase.CLONE:  # the clone has landed in its temporary directory, not in place
            assert list((afs.root / "tmp").glob(f"{name}.git.*/{name}.git/HEAD"))
            assert not (afs.root / "git" / f"{name}.git").exists()
    finally:
        job.kill()  # SIGKILL, as a drill does
    stopped = history(afs, name)
    assert run_job(afs, name, version, tmp_path / "again.log") == "ready"
    after = history(afs, name)
    assert after[: len(stopped)] == stopped and after[-1] == "ready"
    attempt = after[len(before):]
    assert len(attempt) == len(set(attempt)), attempt  # the job run again appended nothing twice
    assert list((afs.root / "tmp").iterdir()) == []
    states = [e["payload"]["state"] for e in events(afs, name) if e["type"] == "history"]
    assert states == (["started", "done"] if phase not in REFRESH_PHASES else []), states


def test_failpoint_drill_worker_killed_at_the_clone_then_the_job_completes(afs: Artifactfs, sample: SampleRepo) -> None:
    # A short visibility timeout brings the job of a worker that was killed back soon.
    afs.env.update(ARTIFACTFS_FAILPOINT="phase:clone", ARTIFACTFS_VISIBILITY_TIMEOUT="20",
                   ARTIFACTFS_JOB_SOFT_LIMIT="15", ARTIFACTFS_JOB_HARD_LIMIT="18")  # fmt: skip
    afs.up()
    add_async(afs, "drill", sample.url)
    wait_until(lambda: "drill: failpoint phase:clone reached" in afs.log("worker"), 60, interval=0.1,
               what="the failpoint")  # fmt: skip
    assert list((afs.root / "tmp").glob("drill.git.*/drill.git/HEAD"))
    assert not (afs.root / "git" / "drill.git").exists()
    worker = afs.service_pid("worker")
    os.killpg(worker, signal.SIGKILL)  # the worker and its pool, mid-job
    # Gone for good, zombies reaped: `up` takes a zombie's pid file for a running worker.
    wait_until(lambda: not group_members(worker), 60, interval=0.1, what="the worker to be gone")
    del afs.env["ARTIFACTFS_FAILPOINT"]
    afs.up()  # a worker without the failpoint; Redis kept the unacknowledged job
    assert settled(afs, "drill", timeout=120)["state"] == "mounted"
    assert history(afs, "drill") == ["registered", "phase:validate", "phase:clone", "phase:index", "phase:publish", "ready"]
    assert list((afs.root / "tmp").iterdir()) == []
    assert (afs.mount_path("drill") / "README.md").read_bytes() == sample.files["README.md"]


def group_members(group: int) -> list[int]:
    """Every process of a process group, zombies included."""
    return [pid for pid in all_pids() if process_group(pid) == group]


# --- 6. two deliveries of one job at once -----------------------------------------------------------


def test_two_deliveries_of_one_job_at_once_append_nothing_twice(afs: Artifactfs, held: HeldRemote, tmp_path: Path) -> None:
    add_async(afs, "twice", held.url)
    env = {**afs.env, **held.env}
    jobs = [JobProcess.start(env, "twice", 1, tmp_path / f"job{i}.log") for i in range(2)]
    try:
        for job in jobs:
            job.go()  # released together
        # Both are inside the job at once: one clones (held), the other waits for the repository lock.
        lock = afs.root / "locks" / "twice.lock"
        wait_until(lambda: one_inside_one_waiting(lock), 60, what="one job inside and one waiting")
        assert sorted(flock_pids(lock)[0] + flock_pids(lock)[1]) == sorted(job.proc.pid for job in jobs)
        held.release()
        assert sorted(job.outcome() for job in jobs) == ["ready", "skipped"]
    finally:
        for job in jobs:
            job.kill()
    assert history(afs, "twice") == ["registered", "phase:validate", "phase:clone", "phase:index", "phase:publish", "ready"]


def test_the_same_task_delivered_twice_to_the_worker_at_once_appends_nothing_twice(afs: Artifactfs, held: HeldRemote) -> None:
    afs.env.update(held.env)
    afs.up()  # two pool processes
    add_async(afs, "dup", held.url)
    afs.wait_phase("dup", "clone")
    assert publish_duplicate(afs, "dup") == afs.task_id("dup", 1)
    received = f"Task artifactfs.prepare[{afs.task_id('dup', 1)}] received"
    wait_until(lambda: afs.log("worker").count(received) == 2, 60, interval=0.1, what="both deliveries")
    lock = afs.root / "locks" / "dup.lock"
    wait_until(lambda: one_inside_one_waiting(lock), 60, what="one delivery inside and one waiting")
    assert f"Task artifactfs.prepare[{afs.task_id('dup', 1)}] succeeded" not in afs.log("worker")  # neither has finished
    held.release()
    assert settled(afs, "dup")["state"] == "mounted"
    wait_until(lambda: afs.log("worker").count(f"Task artifactfs.prepare[{afs.task_id('dup', 1)}] succeeded") == 2, 60,
               interval=0.1, what="both deliveries to finish")  # fmt: skip
    log = afs.log("worker")
    assert "'outcome': 'ready'" in log and "'outcome': 'skipped'" in log
    assert history(afs, "dup") == ["registered", "phase:validate", "phase:clone", "phase:index", "phase:publish", "ready"]


def _append_at_once(url: str, driver: str, me: int, report: Any, go: Any) -> None:
    """Append one dedupe-keyed event to the stream `twice`, telling the test where it is."""
    registry = open_registry(url, driver=driver)
    if driver == "sqlite":  # writers lock up front: say when this one starts to wait for the lock

        def traced(sql: str) -> None:
            if sql == "BEGIN IMMEDIATE":
                report.put((me, "begin"))

        registry.conn.set_trace_callback(traced)  # type: ignore[attr-defined]

    def decide(_repo: RepoState | None) -> list[NewEvent]:
        report.put((me, "inside"))
        assert go.wait(60)
        return [NewEvent(EventType.PHASE, {"phase": "validate"}, job_id="job", dedupe_key="job:validate")]

    report.put((me, "appended", len(registry.append("twice", decide))))
    registry.close()


@pytest.mark.parametrize("driver", ["sqlite", "sqlalchemy", "postgresql"])
def test_concurrent_appends_of_the_same_dedupe_key_append_once(
    driver: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two processes append the same dedupe-keyed event at once, with no repository lock: once."""
    if driver == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    else:
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    kind = "sqlite" if driver == "sqlite" else "sqlalchemy"  # "sqlalchemy": on the SQLite file
    registry = open_registry(url, driver=kind)
    registry.append("twice", lambda _repo: [NewEvent(EventType.REGISTERED, {
        "remote_url": "file:///srv/twice.git", "ref": "refs/heads/main", "mount_path": "/mnt/twice", "git_dir": "/g"})])
    ctx = multiprocessing.get_context("spawn")
    report, go = ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=_append_at_once, args=(url, kind, i, report, go)) for i in range(2)]
    for writer in writers:
        writer.start()
    seen: list[tuple[Any, ...]] = []

    def waiting_for_the_append_lock() -> int:
        """PostgreSQL's writers waiting for the advisory lock that every append takes."""
        import psycopg

        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()
        return int(row[0]) if row else 0

    def both_at_once() -> bool:
        while not report.empty():
            seen.append(report.get())
        inside = {who for who, what, *_ in seen if what == "inside"}
        begun = {who for who, what, *_ in seen if what == "begin"}
        # SQLite's writers take the lock before deciding, and PostgreSQL's take an advisory lock:
        # one decides while the other waits for it. On a SQLite file through SQLAlchemy both decide
        # at once, neither seeing the other's event yet.
        if driver == "postgresql":
            return len(inside) == 1 and waiting_for_the_append_lock() == 1
        return len(inside) == 2 or (len(inside) == 1 and len(begun) == 2)

    try:
        wait_until(both_at_once, 60, what="both writers inside an append")
    finally:
        go.set()
        for writer in writers:
            writer.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    while not report.empty():
        seen.append(report.get())
    assert sorted(n for who, what, *n in seen if what == "appended") == [[0], [1]]
    assert [e.dedupe_key for e in registry.events("twice")] == [None, "job:validate"]
    registry.close()
