"""`artifactfs up` / `down` with the real stack: Flower behind a password, pid files that are never
trusted alone, one stack however many `up`s race, a failed `up` that cleans up after itself, logs
kept across runs, and mounts taken down by `down` itself."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifactfs.mounts import fuse_mounts
from artifactfs.procs import cmdline, identify, parent_pid, write_pid_file
from artifactfs.stack import rotate_log
from mountd.control import ControlClient

from .conftest import PYTHON, Artifactfs, environ_root, free_port, new_installation, wait_until
from .gitremote import SampleRepo

SERVICES = ("redis", "worker", "mountd", "flower", "metrics")


def stack_processes(afs: Artifactfs) -> dict[str, list[int]]:
    """The live processes of this installation's stack, found by their command lines and
    environments (not by pid files): redis by its socket, the others by ARTIFACTFS_ROOT."""
    socket_path = str(afs.root / "run" / "redis.sock")
    found: dict[str, list[int]] = {name: [] for name in SERVICES}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or identify(int(entry.name)) is None:
            continue
        pid = int(entry.name)
        args = cmdline(pid)
        line = " ".join(args)
        if "redis-server" in line and socket_path in line:
            found["redis"].append(pid)
        elif environ_root(pid) != str(afs.root):
            continue
        elif "artifactfs.cli" in args and "worker" in args:
            found["worker"].append(pid)  # its pool processes too
        elif "artifactfs.cli" in args and "daemon" in args:
            found["mountd"].append(pid)
        elif "celery" in args and "flower" in args:
            found["flower"].append(pid)
        elif "artifactfs.cli" in args and "serve-metrics" in args:
            found["metrics"].append(pid)
    return found


def stack_processes_main(afs: Artifactfs) -> dict[str, int]:
    """How many main processes of each service run (the worker's pool processes are its children)."""
    procs = stack_processes(afs)
    workers = procs["worker"]
    procs["worker"] = [pid for pid in workers if parent_pid(pid) not in workers]
    return {name: len(pids) for name, pids in procs.items()}


def pid_files(afs: Artifactfs) -> list[str]:
    run = afs.root / "run"
    return sorted(p.name for p in run.glob("*.pid")) if run.is_dir() else []


def listing(top: Path) -> set[str]:
    """Every path under `top` (names only: logs may grow meanwhile), mounts not entered."""
    mounts = set(fuse_mounts())
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in mounts]
        found.update(os.path.relpath(os.path.join(dirpath, name), top) for name in dirnames + filenames)
    return found


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Artifactfs, str]]:
    """One stack for the checks that do not disturb it, with what its `up` printed."""
    afs = new_installation(tmp_path_factory.mktemp("shared"))
    try:
        yield afs, afs.up()
    finally:
        afs.cleanup()


# --- Flower ---


def test_flower_asks_for_a_password_kept_out_of_sight(shared: tuple[Artifactfs, str]) -> None:
    afs, out = shared
    auth_file = afs.root / "flower-auth"
    assert f"password in {auth_file}" in out
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    user, _, password = auth_file.read_text().strip().partition(":")
    assert user and len(password) >= 20

    # Nowhere in a command line (`ps` shows them to every user), nor in a log.
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            assert password not in " ".join(cmdline(int(proc.name))), f"password in the command line of {proc.name}"
    for log in (afs.root / "log").iterdir():
        assert password not in log.read_text(errors="replace"), log

    worker = f"artifactfs@{afs.env['ARTIFACTFS_HOST']}"
    assert afs.flower("/", auth=False)[0] == 401
    assert afs.flower("/api/workers", auth=False)[0] == 401
    assert afs.flower(f"/api/worker/shutdown/{worker}", method="POST", auth=False)[0] == 401
    assert afs.flower("/api/task/revoke/x", method="POST", auth=False)[0] == 401
    assert afs.flower("/api/task/async-apply/artifactfs.prepare", method="POST", body={"kwargs": {}}, auth=False)[0] == 401
    assert afs.flower("/api/workers", credential=f"{user}:wrong")[0] == 401
    # The metrics endpoint asks for the same credential.
    assert afs.metrics(credential="")[0] == 401
    assert afs.metrics(credential=f"{user}:wrong")[0] == 401
    status, series = afs.metrics()
    assert status == 200 and any(name.startswith("artifactfs_") for name, _ in series), series
    # compose.yaml's health check of both (artifactfs/health.py): healthy only behind the password.
    for url in (f"http://127.0.0.1:{afs.flower_port}/", f"http://127.0.0.1:{afs.env['ARTIFACTFS_METRICS_PORT']}/metrics"):
        for credential, healthy in ((f"{user}:{password}", 0), (f"{user}:wrong", 1)):
            check = subprocess.run([PYTHON, "-m", "artifactfs.health", url, "CHECKED_AUTH"], timeout=60,
                                   env={**afs.env, "CHECKED_AUTH": credential})  # fmt: skip
            assert check.returncode == healthy, (url, credential)

    assert afs.flower("/")[0] == 200
    # The worker was not shut down: it still runs and answers Flower's inspection.
    status, workers = afs.flower("/api/workers?refresh=1")
    assert status == 200 and isinstance(workers, dict) and worker in workers, (status, workers)
    pid = afs.service_pid("worker")
    assert identify(pid) is not None and pid in stack_processes(afs)["worker"]

    # A second `up` finds everything running and keeps the same password.
    again = afs.up()
    assert [line.split(":")[0] for line in again.splitlines() if "already running" in line] == list(SERVICES)
    assert auth_file.read_text().strip() == f"{user}:{password}"


def test_a_job_sent_through_flower_is_refused_by_the_worker(shared: tuple[Artifactfs, str]) -> None:
    afs, _ = shared
    outside = afs.root.parent
    before_root, before_outside = listing(afs.root), listing(outside)
    kwargs = {"repo": "../../x", "attempt": 1, "version": 1, "host": afs.env["ARTIFACTFS_HOST"]}
    status, sent = afs.flower("/api/task/async-apply/artifactfs.prepare", method="POST", body={"kwargs": kwargs})
    assert status == 200 and isinstance(sent, dict), (status, sent)
    task_id = sent["task-id"]

    def outcome() -> dict | None:
        status, info = afs.flower(f"/api/task/info/{task_id}")
        return info if status == 200 and isinstance(info, dict) and info.get("state") == "FAILURE" else None

    info = wait_until(outcome, 30, interval=0.2, what="the worker to refuse the job")
    assert "InvalidInput" in str(info.get("exception")) and "../../x" in str(info.get("exception")), info
    assert listing(afs.root) == before_root
    assert listing(outside) == before_outside


def test_what_holds_state_is_root_only(shared: tuple[Artifactfs, str]) -> None:
    afs, _ = shared
    sock = afs.root / "run" / "redis.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o700
    seen = set()
    for dirpath, dirnames, filenames in os.walk(afs.root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
            seen.add(path.relative_to(afs.root).as_posix())
    assert stat.S_IMODE(afs.root.stat().st_mode) == 0o711  # traversable (mounts), not listable
    expected = {"flower-auth", "registry.db", "run/redis.pid", "run/worker.pid", "run/mountd.pid",
                "run/flower.pid", "run/metrics.pid", "run/metrics", "run/appendonlydir", "log/redis.log",
                "log/worker.log", "log/flower.log", "log/metrics.log"}  # fmt: skip
    assert expected <= seen, expected - seen


def test_flower_auth_from_the_environment_and_logs_kept_across_runs(afs: Artifactfs) -> None:
    afs.env["ARTIFACTFS_FLOWER_AUTH"] = "ops:correct-horse-battery"
    out = afs.up()
    assert "from ARTIFACTFS_FLOWER_AUTH" in out and "correct-horse" not in out
    assert not (afs.root / "flower-auth").exists()
    assert afs.flower("/api/workers")[0] == 200
    assert afs.flower("/api/workers", auth=False)[0] == 401
    assert afs.flower("/api/workers", credential="ops:other")[0] == 401
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            assert "correct-horse" not in " ".join(cmdline(int(proc.name)))
    first = {name: afs.log(name) for name in SERVICES}
    assert " ready." in first["worker"]

    afs.down()
    afs.up()
    logs = afs.root / "log"
    for name in SERVICES:
        assert (logs / f"{name}.log.1").read_text(errors="replace").startswith(first[name]), name
    assert afs.log("worker").count(" ready.") == 1  # the new log: this run's lines only
    assert afs.flower("/api/workers?refresh=1")[0] == 200
    afs.down()
    afs.up()
    assert (logs / "worker.log.2").read_text(errors="replace").startswith(first["worker"])


@pytest.mark.parametrize("value, problem", [
    ("opsonly", "no ':'"), (":secret-pw", "user is empty"), ("ops:", "password is empty"),
    ("ops:sec\x1bret", "control characters"), ("ops:sec,ret", "','"),
])  # fmt: skip
def test_a_malformed_flower_auth_is_one_line_and_changes_nothing(afs: Artifactfs, value: str, problem: str) -> None:
    afs.env["ARTIFACTFS_FLOWER_AUTH"] = value
    line = afs.fail("up", "--flower-port", str(afs.flower_port))
    assert "ARTIFACTFS_FLOWER_AUTH" in line and problem in line, line
    assert "sec" not in line.split("ARTIFACTFS_FLOWER_AUTH", 1)[1] and "\x1b" not in line  # the secret is not echoed
    assert not afs.root.exists()


# --- one stack, whatever races ---


# `artifactfs up`, once its imports are done and a starting signal (a file) is there: the five
# calls below then race for real instead of starting one after the other as Python loads.
RACING_UP = """
import os, sys, time
import artifactfs.stack
from artifactfs.cli import main
print("loaded", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
sys.exit(main(["up", "--flower-port", sys.argv[2]]))
"""


def test_concurrent_ups_start_one_stack(afs: Artifactfs, tmp_path: Path) -> None:
    go = tmp_path / "go"
    cmd = [PYTHON, "-c", RACING_UP, str(go), str(afs.flower_port)]
    procs = [subprocess.Popen(cmd, env=afs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(5)]  # fmt: skip
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "loaded\n"
    go.touch()
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 5, outputs
    counts = stack_processes_main(afs)
    assert counts == {name: 1 for name in SERVICES}, counts
    for name in SERVICES:
        assert sum(f"{name}: started" in out for out, _ in outputs) == 1, outputs
        assert sum(f"{name}: already running" in out for out, _ in outputs) == 4, outputs

    out = afs.down()
    assert all(f"{name}: stopped" in out for name in SERVICES), out
    assert stack_processes_main(afs) == {name: 0 for name in SERVICES}
    assert pid_files(afs) == []


# --- pid files ---


def test_stale_pid_files_are_removed_never_signalled(afs: Artifactfs) -> None:
    assert afs.down().strip() == f"nothing is running under {afs.root}"
    afs.run("list-repos")  # the state root exists, nothing runs
    assert afs.down().strip() == f"nothing is running under {afs.root}"

    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        me = identify(sleeper.pid)
        assert me is not None
        run = afs.root / "run"
        (run / "worker.pid").write_text(f"{me.pid} {me.start_time + 1}\n")  # the pid, reused since
        (run / "redis.pid").write_text(f"{me.pid}\n")  # the old one-number format
        write_pid_file(run / "flower.pid", me.pid)  # the very process, but it is no Flower
        (run / "mounts" / "gone.pid").write_text(f"{me.pid} {me.start_time + 1}\n")

        out = afs.down()
        for name in ("worker", "redis", "flower"):
            assert f"{name}: removed the stale pid file {run / name}.pid" in out, out
        assert f"removed the stale pid file {run / 'mounts' / 'gone.pid'}" in out, out
        assert sleeper.poll() is None and identify(sleeper.pid) == me  # never signalled
        assert pid_files(afs) == [] and not list((run / "mounts").iterdir())
    finally:
        sleeper.kill()
        sleeper.wait()


# --- a failed `up` ---


@pytest.mark.parametrize("service", ["flower", "metrics"])
def test_a_taken_port_fails_before_anything_starts(afs: Artifactfs, service: str) -> None:
    port = int(afs.env[f"ARTIFACTFS_{service.upper()}_PORT"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        line = afs.fail("up")
    assert f"port {port} on 127.0.0.1 is taken (another {service}?)" in line and f"--{service}-port" in line
    assert not (afs.root / "log" / "redis.log").exists()  # nothing was started, not even for a while
    assert stack_processes_main(afs) == {name: 0 for name in SERVICES}
    assert pid_files(afs) == []


def test_a_service_dying_at_start_stops_only_what_this_up_started(afs: Artifactfs) -> None:
    # Bound but not listening: `up` sees no server there, Flower cannot bind and exits.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", afs.flower_port))
        line = afs.fail("up", "--flower-port", str(afs.flower_port))
    # The metrics started beside Flower: stopped with the rest.
    assert "flower exited at start" in line and "stopped what this up had started (metrics, mountd, worker, redis)" in line, line
    assert stack_processes_main(afs) == {name: 0 for name in SERVICES}
    assert pid_files(afs) == []

    # Services that ran before a failed `up` keep running.
    afs.up()
    before = {name: afs.service_pid(name) for name in ("redis", "worker", "mountd")}
    afs.stop_service("flower")
    # A port of its own: Flower's old one may linger in TIME_WAIT, where this bind would fail.
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        line = afs.fail("up", "--flower-port", str(port))
    assert "flower exited at start" in line and "stopped what" not in line, line
    counts = stack_processes_main(afs)
    assert counts == {"redis": 1, "worker": 1, "mountd": 1, "flower": 0, "metrics": 1}, counts
    assert {name: afs.service_pid(name) for name in before} == before
    assert "flower.pid" not in pid_files(afs)


# --- mounts ---


def test_down_clears_a_mount_left_by_a_killed_mountd(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.up()
    afs.add("left", sample.url)
    mnt = afs.wait_mounted("left")
    mountd = afs.service_pid("mountd")
    os.killpg(mountd, signal.SIGKILL)  # mountd and whatever shares its process group
    wait_until(lambda: identify(mountd) is None, 30, what="mountd to die")
    assert str(mnt) in fuse_mounts()  # left behind (stale, or still served by its process)

    out = afs.down()
    assert f"left: unmounted {mnt}" in out, out
    assert "mountd: removed the stale pid file" in out, out
    assert str(mnt) not in fuse_mounts()
    assert stack_processes_main(afs) == {name: 0 for name in SERVICES}


def start_mount_process(afs: Artifactfs, name: str) -> subprocess.Popen[bytes]:
    """A mount process of a registered, prepared repository that no running mountd knows: what
    stays behind once mount processes outlive mountd. It records its pid where they do."""
    mnt = afs.mount_path(name)
    mnt.mkdir(parents=True, exist_ok=True)
    (afs.root / "state" / name).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([PYTHON, "-m", "mountd.mountproc"], env=afs.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    mount = {"op": "mount", "name": name, "mount_path": str(mnt),
             "stats_file": str(afs.root / "state" / name / "fetch-stats.json")}  # fmt: skip
    proc.stdin.write(json.dumps(mount).encode() + b"\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == b"mounted"  # its pid file and control socket are there
    # Once mounted, it takes orders on its control socket alone (its stdin is gone), as from mountd.
    client = ControlClient(afs.root / "run" / "mounts" / f"{name}.sock", timeout=10, expected_pid=proc.pid)
    try:
        client.request({"op": "ready", "git_dir": str(afs.root / "git" / f"{name}.git"), "head": str(afs.status(name)["head"])})
    finally:
        client.close()
    return proc


def test_a_mount_whose_mountd_dies_before_it_hears_back_keeps_serving(afs: Artifactfs, sample: SampleRepo) -> None:
    """mountd killed between its mount order and the mount's answer: the answer meets a closed
    pipe, and the mount must stay up for the next mountd to adopt, not vanish."""
    afs.add("orphan", sample.url)
    mnt = afs.mount_path("orphan")
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([PYTHON, "-m", "mountd.mountproc"], env=afs.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        proc.stdout.close()  # what a SIGKILL of mountd does to the pipe, before the mount answers
        proc.stdin.write(json.dumps({"op": "mount", "name": "orphan", "mount_path": str(mnt)}).encode() + b"\n")
        proc.stdin.flush()
        pid_file = afs.root / "run" / "mounts" / "orphan.pid"
        wait_until(lambda: pid_file.exists() or proc.poll() is not None, 20, what="the mount to be up")
        client = ControlClient(afs.root / "run" / "mounts" / "orphan.sock", timeout=10, expected_pid=proc.pid)
        try:  # what the next mountd does once it adopts the mount
            client.request({"op": "ready", "git_dir": str(afs.root / "git" / "orphan.git"), "head": str(afs.status("orphan")["head"])})
        finally:
            client.close()
        assert (mnt / "README.md").read_bytes() == sample.files["README.md"] and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert str(mnt) not in fuse_mounts()


def test_down_takes_mounts_down_unless_told_to_keep_them(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("served", sample.url)  # registered and cloned; no mountd runs
    proc = start_mount_process(afs, "served")
    try:
        readme = afs.mount_path("served") / "README.md"
        wait_until(lambda: readme.read_bytes() == sample.files["README.md"], 20, what="the mount to serve")

        out = afs.run("down", "--keep-mounts").stdout
        assert "1 mount(s) left serving (--keep-mounts)" in out, out
        assert readme.read_bytes() == sample.files["README.md"] and proc.poll() is None

        out = afs.down()
        assert f"served: unmounted {afs.mount_path('served')}" in out, out
        assert f"mount process {proc.pid} (served): " in out, out
        assert str(afs.mount_path("served")) not in fuse_mounts()
        assert proc.wait(timeout=30) is not None
        assert not (afs.root / "run" / "mounts" / "served.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- logs ---


def test_rotate_log_keeps_a_few_generations(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    for run in range(1, 6):
        rotate_log(log, generations=3)
        assert not log.exists()
        log.write_text(f"run {run}\n")
    assert [(tmp_path / f"worker.log{suffix}").read_text() for suffix in ("", ".1", ".2", ".3")] == \
        ["run 5\n", "run 4\n", "run 3\n", "run 2\n"]  # fmt: skip
    assert not (tmp_path / "worker.log.4").exists()
