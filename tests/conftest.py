"""Fixtures that run the real thing: the artifactfs CLI and mountd as processes, real git
remotes (see gitremote.py), real FUSE mounts."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from artifactfs.mounts import fuse_mounts, unmount
from artifactfs.procs import all_pids, cmdline, identify, is_running, read_pid_file
from mountd.control import ControlClient

from .gitremote import GitDaemon, SampleRepo, make_sample_repo
from .postgres import PostgresServer, free_port

PYTHON = sys.executable
PROGRESS_LINE = re.compile(r"^[A-Za-z0-9._-]+: (validate|clone|fetch|update_branch|index|publish)(: .* \d+%)?$")


def follows_ready(event_type: str) -> bool:
    """Whether an event comes in its own time after ready: the history behind a ready
    repository (artifactfs/history.py, tested in test_history.py). Tests of what gates ready
    leave such events out of the sequences they compare, since they may or may not have landed."""
    return event_type == "history"


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# Kernel frames of a thread asleep inside a file system call: waiting for the FUSE server's answer
# (request_wait_answer), or held back by the kernel behind another request the server holds (a
# lookup of the same name, the lock of the same directory, as an open with O_CREAT takes it).
FS_CALL_FRAMES = ("fuse_", "request_wait_answer", "walk_component", "path_openat", "filename_lookup", "iterate_dir")


def _asleep_in_fs_call(task: Path) -> bool:
    state = (task / "stat").read_text().rsplit(") ", 1)[1][0]
    return state in "SD" and any(frame in (task / "stack").read_text() for frame in FS_CALL_FRAMES)


def waits_on_fuse(pid: int, tid: int | None = None) -> bool:
    """Whether thread `tid` of process `pid` (every thread if None), or any process it started,
    sleeps in a file system call that the mount holds: at the gate, in a fetch, or behind such a
    request. The tests make their calls on FUSE mounts alone, so that is the mount holding them."""
    task_root = Path(f"/proc/{pid}/task")
    try:
        tids = [str(tid)] if tid is not None else [t.name for t in task_root.iterdir()]
    except OSError:
        return False
    for task in tids:
        try:
            if _asleep_in_fs_call(task_root / task):
                return True
            children = (task_root / task / "children").read_text().split()
        except OSError:
            continue
        if any(waits_on_fuse(int(child)) for child in children):
            return True
    return False


def command_lines() -> dict[int, str]:
    """Every process's command line, its arguments joined by spaces (kernel threads have none)."""
    return {pid: " ".join(args) for pid in all_pids() if (args := cmdline(pid))}


def environ_root(pid: int) -> str | None:
    """The ARTIFACTFS_ROOT in process `pid`'s environment: which installation started it."""
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in entries:
        if entry.startswith(b"ARTIFACTFS_ROOT="):
            return entry.removeprefix(b"ARTIFACTFS_ROOT=").decode(errors="replace")
    return None


def process_gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie waiting for its parent counts as gone)."""
    return identify(pid) is None


@dataclass
class Artifactfs:
    """One isolated artifactfs installation: its own state root, registry and mount root."""

    root: Path
    mount_root: Path
    env: dict[str, str]
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        proc = subprocess.run(
            [PYTHON, "-m", "artifactfs.cli", *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, **kwargs,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"artifactfs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def fail(self, *args: str) -> str:
        """Run a command that must fail with one clear line on stderr; return that line. (A blocking
        add or prepare says its phases first, off a terminal: `<name>: <phase>` lines.)"""
        proc = self.run(*args, check=False)
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        lines = [line for line in proc.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("artifactfs: error: "), lines[0]
        assert "Traceback" not in proc.stderr
        return lines[0]

    def mount_path(self, name: str) -> Path:
        return self.mount_root / name

    def task_id(self, name: str, attempt_version: int | str) -> str:
        """The Celery task id of a prepare job of this installation's host (jobs.task_id)."""
        return f"prepare:{self.env['ARTIFACTFS_HOST']}:{name}:{attempt_version}"

    def add(self, name: str, remote: str, *extra: str) -> None:
        out = self.run("add-repo", "--name", name, "--remote", remote, *extra).stdout
        assert out.strip() == f"added {name}", out

    def status(self, name: str) -> dict[str, object]:
        import json

        return json.loads(self.run("status", "--name", name, "--json").stdout)

    def start_daemon(self, log_name: str = "mountd.log") -> subprocess.Popen[bytes]:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / log_name, "ab")
        proc = subprocess.Popen(
            [PYTHON, "-m", "artifactfs.cli", "--log-level", "INFO", "daemon"], env=self.env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        self.daemons.append(proc)
        return proc

    def stop_daemon(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=30)
        finally:
            if proc in self.daemons:
                self.daemons.remove(proc)

    def wait_mounted(self, name: str, timeout: float = 20.0) -> Path:
        path = self.mount_path(name)
        wait_until(lambda: str(path) in fuse_mounts(), timeout, what=f"{path} to be mounted")
        return path

    def wait_unmounted(self, name: str, timeout: float = 20.0) -> None:
        path = self.mount_path(name)
        wait_until(lambda: str(path) not in fuse_mounts(), timeout, what=f"{path} to be unmounted")

    def up(self) -> str:
        """`artifactfs up`: private redis-server, a worker, mountd and Flower."""
        return self.run("up", "--flower-port", str(self.flower_port), timeout=120).stdout

    def down(self) -> str:
        return self.run("down", timeout=120).stdout

    @property
    def flower_port(self) -> int:
        return int(self.env["ARTIFACTFS_FLOWER_PORT"])

    def mount_process(self, name: str) -> int | None:
        """The live FUSE server of mount `name`, from the pid file it writes."""
        proc = read_pid_file(self.root / "run" / "mounts" / f"{name}.pid")
        return proc.pid if proc is not None else None

    def describe_mount(self, name: str) -> dict[str, object]:
        """What the mount process says of itself on its control socket."""
        client = ControlClient(self.root / "run" / "mounts" / f"{name}.sock", timeout=10)
        try:
            return client.request({"op": "hello"})
        finally:
            client.close()

    def wait_mount_process(self, name: str) -> int:
        """The mount process's pid, once written: that comes just after the mount appears."""
        pid: int = wait_until(lambda: self.mount_process(name), what=f"the pid file of mount {name!r}")
        return pid

    @contextmanager
    def registry_locked(self, *, exclusive: bool = False) -> Iterator[None]:
        """Hold the registry's write lock (readers too are shut out if `exclusive`), as a writer
        that never lets go would."""
        conn = sqlite3.connect(self.root / "registry.db", timeout=30, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE" if exclusive else "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()

    def service_pid(self, name: str) -> int:
        # A pid file holds "<pid> <start time>" (artifactfs/procs.py).
        return int((self.root / "run" / f"{name}.pid").read_text().split()[0])

    def flower_credential(self) -> str:
        """user:password of this installation's Flower: ARTIFACTFS_FLOWER_AUTH, else the one `up`
        generated in <root>/flower-auth."""
        return self.env.get("ARTIFACTFS_FLOWER_AUTH") or (self.root / "flower-auth").read_text().strip()

    def web(self, url: str, *, method: str = "GET", data: bytes | None = None, content_type: str | None = None,
            credential: str | None = None) -> tuple[int, bytes]:  # fmt: skip
        """One request to a web service of the stack, with basic auth as `credential` (by default
        Flower's, which the metrics endpoint shares; "" sends none): (status, body)."""
        import base64
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, data=data, method=method)
        if content_type is not None:
            request.add_header("Content-Type", content_type)
        if credential != "":
            token = base64.b64encode((credential or self.flower_credential()).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def flower(self, path: str, *, method: str = "GET", body: object = None, auth: bool = True,
               credential: str | None = None) -> tuple[int, object]:  # fmt: skip
        """One request to Flower (authenticated unless `auth` is false): (status, decoded body)."""
        import json

        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        status, raw = self.web(f"http://127.0.0.1:{self.flower_port}{path}", method=method, data=data,
                               content_type="application/json" if body is not None else None,
                               credential=credential if auth else "")  # fmt: skip
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def metrics(self, *, credential: str | None = None) -> tuple[int, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
        """Scrape the metrics endpoint `up` serves: (status, {(series, labels): value})."""
        from prometheus_client.parser import text_string_to_metric_families

        status, raw = self.web(f"http://127.0.0.1:{self.env['ARTIFACTFS_METRICS_PORT']}/metrics", credential=credential)
        if status != 200:
            return status, {}
        series = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(raw.decode()) for sample in family.samples
        }  # fmt: skip
        return status, series

    def stop_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Signal one service of the stack and wait until its process is gone."""
        pid = self.service_pid(name)
        os.kill(pid, sig)
        wait_until(lambda: process_gone(pid), 30, what=f"{name} to exit")

    def jobs_settled(self) -> bool:
        """Whether this host's queue is empty and no job is delivered and unacknowledged: every
        prepare job published so far has run to its end (jobs are acknowledged late)."""
        import redis

        client = redis.Redis(unix_socket_path=str(self.root / "run" / "redis.sock"))
        try:
            queue = f"artifactfs.{self.env['ARTIFACTFS_HOST']}"
            waiting = sum(client.llen(key) for key in client.scan_iter(match=f"{queue}*") if client.type(key) == b"list")
            return waiting == 0 and client.hlen("unacked") == 0
        finally:
            client.close()

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> dict[str, object]:
        return wait_until(
            lambda: (row := self.status(name))["state"] == state and row, timeout, interval=0.1,
            what=f"{name} to be {state}",
        )  # fmt: skip

    def wait_phase(self, name: str, phase: str, timeout: float = 60.0) -> None:
        wait_until(lambda: self.status(name)["phase"] == phase, timeout, interval=0.05, what=f"{name} in phase {phase}")

    @property
    def database_url(self) -> str:
        return self.env.get("ARTIFACTFS_DATABASE_URL") or f"sqlite:///{self.root / 'registry.db'}"

    def registry_state(self, name: str) -> str | None:
        """prepare_state straight from the projection (status would also look at the mount)."""
        from artifactfs.registry import open_registry

        registry = open_registry(self.database_url, host=self.env["ARTIFACTFS_HOST"], busy_timeout=30)
        try:
            repo = registry.get(name)
        finally:
            registry.close()
        return repo.prepare_state if repo else None

    def daemon_log(self) -> str:
        path = self.root / "mountd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        if (self.root / "run").exists():
            self.run("down", check=False, timeout=120)
        for proc in list(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # Mount processes outlive mountd by design: take down what this installation mounted.
        for path in fuse_mounts():
            if path.startswith((f"{self.root}/", f"{self.mount_root}/")):
                if not unmount(path):
                    unmount(path, lazy=True)
        for pid_file in (self.root / "run" / "mounts").glob("*.pid"):
            proc = read_pid_file(pid_file)
            if proc is not None:
                os.kill(proc.pid, signal.SIGKILL)
                wait_until(lambda: not is_running(proc), 10, what=f"mount process {proc.pid} to exit")


def new_installation(base: Path) -> Artifactfs:
    root = base / "afs"
    mount_root = base / "mnt"
    env = dict(os.environ)
    flower_port = free_port()
    while (metrics_port := free_port()) == flower_port:
        pass  # the kernel may hand out the same free port twice
    env.update(
        ARTIFACTFS_ROOT=str(root),
        ARTIFACTFS_MOUNT_ROOT=str(mount_root),
        ARTIFACTFS_LOG_LEVEL="INFO",
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        ARTIFACTFS_FLOWER_PORT=str(flower_port),
        ARTIFACTFS_METRICS_PORT=str(metrics_port),
        # A queue of its own: no test takes another's jobs (a host name allows [A-Za-z0-9._-]).
        ARTIFACTFS_HOST=re.sub(r"[^A-Za-z0-9._-]", "-", f"test-{base.name}")[:63],
        # Tests count what reads fetch: a backfill would add to it at its own pace. The tests of
        # the backfill turn it on.
        ARTIFACTFS_BACKFILL="never",
    )
    env.pop("ARTIFACTFS_DATABASE_URL", None)
    env.pop("ARTIFACTFS_REDIS_URL", None)
    return Artifactfs(root=root, mount_root=mount_root, env=env)


@contextmanager
def sample_mounted(base: Path, sample: SampleRepo) -> Iterator[tuple[Artifactfs, Path]]:
    """The sample repository added over file:// as "sample" and mounted by a running mountd."""
    afs = new_installation(base)
    try:
        afs.add("sample", sample.url)
        afs.start_daemon()
        yield afs, afs.wait_mounted("sample")
    finally:
        afs.cleanup()


@pytest.fixture
def afs(tmp_path: Path) -> Iterator[Artifactfs]:
    inst = new_installation(tmp_path)
    try:
        yield inst
    finally:
        inst.cleanup()


@pytest.fixture
def reachable_afs() -> Iterator[Artifactfs]:
    """An installation other users can reach (pytest's own temporary directories are root's alone):
    for tests where a sandbox user reads the mount or runs git in it."""
    base = Path(tempfile.mkdtemp(prefix="artifactfs-shared-"))
    base.chmod(0o755)
    inst = new_installation(base)
    try:
        yield inst
    finally:
        inst.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def sample_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remotes")


@pytest.fixture(scope="session")
def sample(sample_base: Path) -> SampleRepo:
    """The sample repository; tests must not change it (use their own for that)."""
    return make_sample_repo(sample_base, "sample")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the run; each test takes a fresh database from it."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def git_daemon(tmp_path: Path) -> Iterator[GitDaemon]:
    """A git daemon over a directory of the test's own, with a fetch-transaction counter."""
    base = tmp_path / "served"
    base.mkdir()
    with GitDaemon(base) as daemon:
        yield daemon
