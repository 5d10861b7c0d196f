"""Benchmark: artifactfs against plain git on one remote, in one run.

What it measures (each step ``--runs`` times in fresh temporary directories;
the table shows median / min / max seconds):

  a   ``git clone -q`` (full clone with checkout)
  b   ``git clone --filter=blob:none --no-checkout`` (blobless)
  c   ``git clone --filter=blob:none`` (blobless, then checkout: a working tree)
  d0  ``artifactfs list-repos`` on a fresh ARTIFACTFS_ROOT: the first command of
      an installation creates the registry (imports SQLAlchemy/SQLModel once)
  d   ``artifactfs add-repo`` (blocking: registers and makes the blobless clone)
      on that installation, its registry already created by (d0)
  e1  ``artifactfs daemon`` start until the mount shows in /proc/self/mountinfo
  e2  then the first ``os.listdir`` of the mount root
  e3  then ``cat README*`` (every README* of the root read to the end)
  e4  SIGTERM to mountd until it has exited (its mount keeps serving), then
      fusermount3 -u until the mount and its process are gone (reference)
  f   every regular file read cold through the mount (scandir walk, one thread);
      fetch transactions from the mount's fetch-stats.json and, for the
      synthetic remote, the packs the git daemon served; the note gives the
      part of the time the mount spent inside those fetches
  f2  the same walk again on the now hydrated mount (FUSE cost alone)
  f*  the --lazy-sample files of (g) read cold by path through a fresh mount
      (no directory listed first), to compare like with like with (g)
  g   git's own lazy fetch: ``git cat-file blob <oid>`` of the sample files,
      one at a time, in a fresh blobless --no-checkout clone (one fetch each);
      g~ extrapolates its per-file time to all files (labelled as such)
      (f* and g run in the first --lazy-runs runs only, default 1: each is
      already --lazy-sample sequential fetches, and they dominate the runtime)
  h   every file of the full clone of (a) read from the native checkout
      (page cache warm: it was just written), for reference

Then the asynchronous path, against the same remote, with one ``artifactfs up``
stack (private redis-server, Celery worker, mountd, Flower; its own
ARTIFACTFS_HOST, so its own queue) for the whole section, ``--async-runs``
registrations of new names per step:

  d1  ``artifactfs add-repo --async`` wall time (returns once mountd has mounted
      the gated placeholder); the note counts the runs in which the placeholder
      was in /proc/self/mountinfo when the command returned
  d2  from the start of ``add-repo --async`` until ``cat README*`` through the
      mount has finished (the listing waits at the gate for the worker's
      blobless clone; the README blobs are then fetched): the time until a
      sandbox has read its first file, to compare with (b); the same
      registrations as (d1), no artificial delay
  d3  readiness latency, in milliseconds: from the time of the worker's
      ``ready`` event (``artifactfs events --json``) until an ``os.listdir`` of
      the mount root, started in a thread right after ``add-repo --async``
      returned and blocked at the gate, returns (time.time(), same clock).
      With the synthetic remote every pack is held back --async-delay seconds
      (default 1) so the clone outlasts the listing's start; an external
      remote cannot be slowed, so the note says in how many runs the listing
      really started before ``ready`` (only those runs are counted, if any)
  u1  ``artifactfs up`` until every service answers, u2 ``artifactfs down``
      (references, once each)

Without --remote a synthetic repository (--files files of ~400 bytes in --dirs
directories plus README.md) is built and served by ``git daemon`` on
127.0.0.1, so every step goes over a real loopback git protocol and the
daemon's pack-objects hook counts server-side fetch transactions.

Run from the repository root:

    .venv/bin/python bench/bench.py                       # synthetic, defaults
    .venv/bin/python bench/bench.py --runs 1 --files 500 --async-runs 3  # quick
    .venv/bin/python bench/bench.py --remote https://github.com/git/git --json out.json
    make bench REPO=https://... BENCH_ARGS="--runs 3"

``--async-runs 0`` leaves the asynchronous section out (no redis-server needed).

Everything it creates lives under one temporary directory that is removed at
the end (the stack is stopped with ``artifactfs down`` and mounts are taken
down first), also on error, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import compileall  # noqa: E402

# Timed as installed: a package installed by pip has its bytecode, and an interpreter that may not
# write any (PYTHONDONTWRITEBYTECODE) would compile every module of every command it times anew.
for package in ("artifactfs", "workers", "mountd"):
    compileall.compile_dir(REPO_ROOT / package, quiet=1)

from artifactfs.mounts import fuse_mounts  # noqa: E402
from tests.gitremote import GitDaemon, git_env, make_many_files_repo  # noqa: E402

REPO_NAME = "bench"
RunResult = TypeVar("RunResult")  # what one run of a benchmark measured
FILE_MODES = {"100644", "100755"}
MOUNT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
GC_WAIT = 60.0
STACK_TIMEOUT = 180.0  # `artifactfs up` / `down`
READY_TIMEOUT = 300.0  # an asynchronous preparation that takes longer fails the benchmark
ASYNC_SETTLE = 0.25  # pause between asynchronous runs (mountd warms its next spare meanwhile)


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------


@dataclass
class Measurement:
    """One row of the table: a step and its samples, one per run."""

    key: str
    label: str
    files: int | None = None
    seconds: list[float] = field(default_factory=list)
    transactions: list[int] = field(default_factory=list)  # client-side fetch transactions
    packs: list[int] = field(default_factory=list)  # packs served by the git daemon
    blobs: list[int] = field(default_factory=list)  # blobs fetched
    fetch_seconds: list[float] = field(default_factory=list)  # time the mount spent fetching
    extrapolated: bool = False
    note: str = ""
    unit: str = "s"  # how the table shows the samples ("ms": times 1000); always seconds in JSON
    counts: dict[str, int] = field(default_factory=dict)  # per-run yes/no tallies for the note
    phase_seconds: list[float] = field(default_factory=list)  # the worker's clone phase, per run
    unblocked: list[float] = field(default_factory=list)  # (d3) runs whose ls did not wait

    def add(self, seconds: float, *, transactions: int | None = None, packs: int | None = None,
            blobs: int | None = None, fetch_seconds: float | None = None) -> None:
        self.seconds.append(seconds)
        if fetch_seconds is not None:
            self.fetch_seconds.append(fetch_seconds)
        if transactions is not None:
            self.transactions.append(transactions)
        if packs is not None:
            self.packs.append(packs)
        if blobs is not None:
            self.blobs.append(blobs)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def per_file_ms(self) -> float | None:
        if not self.files or self.median is None:
            return None
        return self.median / self.files * 1000

    def summary(self) -> dict[str, object]:
        data = asdict(self)
        data.update(median=self.median, min=min(self.seconds, default=None),
                    max=max(self.seconds, default=None), per_file_ms=self.per_file_ms())
        return data


@dataclass
class Results:
    rows: dict[str, Measurement] = field(default_factory=dict)

    def row(self, key: str, label: str, files: int | None = None, note: str = "", unit: str = "s") -> Measurement:
        if key not in self.rows:
            self.rows[key] = Measurement(key, label, files, note=note, unit=unit)
        return self.rows[key]


# --------------------------------------------------------------------------
# clean-up: every process and directory we make is registered here
# --------------------------------------------------------------------------


class Janitor:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.stacks: list[Installation] = []  # installations that ran `artifactfs up`
        self.git_daemon: GitDaemon | None = None

    def close(self) -> None:
        # A second Ctrl-C must not cut the clean-up short (`down` takes a few seconds); children
        # started from here on inherit the ignored signals too.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for inst in list(self.stacks):
                inst.stop_stack()
            for proc in list(self.daemons):
                stop_process(proc)
            self.daemons.clear()
            unmount_under(self.base)
            if self.git_daemon is not None:
                self.git_daemon.stop()
            shutil.rmtree(self.base, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def runs_option(doc: str, default: int) -> int:
    """`--runs` of a benchmark that serves its own repository (its only option)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=default, help=f"runs, each in a fresh installation (default {default})")
    return int(parser.parse_args().runs)


def served_runs(label: str, runs: int, make_remote: Callable[[Path], tuple[GitDaemon, dict[str, bytes]]],
                one_run: Callable[[Path, GitDaemon, dict[str, bytes], Janitor], RunResult],
                describe: Callable[[dict[str, bytes]], str]) -> list[RunResult]:  # fmt: skip
    """`runs` runs of `one_run`, each in a directory of its own, against the repository that
    `make_remote` builds and serves; everything started is stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=f"artifactfs-bench-{label}-")).resolve()
    janitor = Janitor(base)
    try:
        daemon, tree = make_remote(base)
        janitor.git_daemon = daemon
        print(f"{label}: {describe(tree)}", file=sys.stderr)
        results = []
        for index in range(runs):
            run_base = base / f"run{index}"
            run_base.mkdir()
            results.append(one_run(run_base, daemon, tree, janitor))
            print(f"bench-{label}: run {index + 1}/{runs} done", file=sys.stderr, flush=True)
        return results
    finally:
        janitor.close()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait; SIGKILL the whole session (started with its own) if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def unmount_under(base: Path) -> None:
    for path in fuse_mounts():
        if path == str(base) or path.startswith(str(base) + os.sep):
            subprocess.run(["fusermount3", "-u", "-q", path], capture_output=True, check=False)
            if path in fuse_mounts():
                subprocess.run(["fusermount3", "-u", "-z", "-q", path], capture_output=True, check=False)


def raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def process_of(pid: int, root: Path) -> bool:
    """Whether `pid` runs for the installation at `root` (a stale pid file may name a reused pid)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"ARTIFACTFS_ROOT=" + os.fsencode(root) in environ


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def run(cmd: Sequence[str | os.PathLike[str]], env: dict[str, str], cwd: Path | None = None,
        timeout: float = 3600) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([os.fspath(c) for c in cmd], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err}")
    return proc


def timed(cmd: Sequence[str | os.PathLike[str]], env: dict[str, str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    run(cmd, env, cwd)
    return time.perf_counter() - start


def iter_files(root: Path) -> Iterator[str]:
    """Regular files under root, depth first in name order, without stat calls (d_type only).
    Symlinks are skipped, and so is a top-level .git."""
    stack = [os.fspath(root)]
    top = stack[0]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            if directory == top and entry.name == ".git":
                continue
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield entry.path
        stack.extend(reversed(subdirs))


def read_file(path: str) -> int:
    with open(path, "rb") as fh:
        return len(fh.read())


def read_all(root: Path) -> tuple[float, int]:
    """Walk and read every file (reads interleaved with listing, like os.walk + open)."""
    start = time.perf_counter()
    count = 0
    for path in iter_files(root):
        read_file(path)
        count += 1
    return time.perf_counter() - start, count


def tree_files(git_dir: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    """(path, blob oid) of every regular file of HEAD, in git's order; trees only, no blobs needed."""
    out = run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "-z", "HEAD"], env).stdout
    files = []
    for record in out.split(b"\0"):
        if not record:
            continue
        meta, path = record.split(b"\t", 1)
        mode, kind, oid = meta.decode().split()
        if kind == "blob" and mode in FILE_MODES:
            files.append((os.fsdecode(path), oid))
    return files


def wait_for_auto_gc(git_dir: Path) -> None:
    """git's lazy fetches may start `git gc --auto` in the background; let it finish before the
    clone is deleted, so that nothing of ours outlives the benchmark."""
    deadline = time.monotonic() + GC_WAIT
    while (git_dir / "gc.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def even_sample(items: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def lazy_fetches(trace_file: Path) -> int:
    """Lazy fetches git started, from a GIT_TRACE2_EVENT log: `git fetch ... --stdin` children."""
    if not trace_file.exists():
        return 0
    count = 0
    for line in trace_file.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        argv = event.get("argv") or []
        if event.get("event") == "child_start" and "fetch" in argv and "--stdin" in argv:
            count += 1
    return count


def short_ref(ref: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    return ref


def command_output(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def event_time(text: str) -> float:
    """An event's ISO 8601 time (UTC if it names no zone) as a time.time() value."""
    when = datetime.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def wait_mounted(path: Path, timeout: float = MOUNT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while str(path) not in fuse_mounts():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout:g}s")
        time.sleep(0.002)


class BlockedListing:
    """``os.listdir(path)`` in a thread, with the wall-clock times it started and returned."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.names: list[str] | None = None
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.returned_at = 0.0
        self.thread = threading.Thread(target=self._run, name=f"ls {path.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.started_at = time.time()
        try:
            self.names = os.listdir(self.path)
        except BaseException as exc:  # noqa: BLE001 - handed to join()
            self.error = exc
        self.returned_at = time.time()

    def join(self, timeout: float) -> list[str]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"ls {self.path} still blocked after {timeout:g}s")
        if self.error is not None:
            raise RuntimeError(f"ls {self.path} failed: {self.error}")
        assert self.names is not None
        return self.names


# --------------------------------------------------------------------------
# the remote
# --------------------------------------------------------------------------


@dataclass
class Remote:
    url: str
    ref: str
    default_head: str | None
    description: str
    git_env: dict[str, str]
    daemon: GitDaemon | None = None

    def packs(self) -> int | None:
        return self.daemon.fetch_count() if self.daemon is not None else None

    def clone_args(self) -> list[str]:
        """--branch only when the ref is not what the remote's HEAD gives anyway."""
        return [] if self.ref == self.default_head else ["--branch", short_ref(self.ref)]


def remote_head(url: str, env: dict[str, str]) -> str | None:
    out = run(["git", "ls-remote", "--symref", url, "HEAD"], env, timeout=120).stdout.decode()
    for line in out.splitlines():
        if line.startswith("ref:") and line.endswith("\tHEAD"):
            return line[4:].split("\t", 1)[0].strip()
    return None


def external_remote(url: str, ref: str | None) -> Remote:
    env = git_env(isolate=False)
    head = remote_head(url, env)
    ref = ref or head or "refs/heads/main"
    if not run(["git", "ls-remote", url, ref], env, timeout=120).stdout.strip():
        raise SystemExit(f"bench: {ref} does not exist on {url}")
    return Remote(url, ref, head, url, env)


def synthetic_remote(base: Path, files: int, dirs: int, janitor: Janitor) -> Remote:
    served = base / "served"
    served.mkdir()
    make_many_files_repo(served, REPO_NAME, files=files, dirs=dirs, file_size=400)
    daemon = GitDaemon(served, state_dir=base / "gitdaemon")
    janitor.git_daemon = daemon
    daemon.start()
    desc = (f"synthetic: {files} files of 400 B in {dirs} dirs + README.md, "
            f"git daemon {daemon.url(REPO_NAME + '.git')}")
    return Remote(daemon.url(REPO_NAME + ".git"), "refs/heads/main", "refs/heads/main", desc, git_env(),
                  daemon)


# --------------------------------------------------------------------------
# artifactfs installations
# --------------------------------------------------------------------------


@dataclass
class Installation:
    root: Path
    mount_root: Path
    env: dict[str, str]
    janitor: Janitor
    daemon: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, base: Path, remote: Remote, janitor: Janitor) -> "Installation":
        env = dict(remote.git_env)
        for key in list(env):
            if key.startswith("ARTIFACTFS_"):  # the caller's database, Redis, host, limits...
                del env[key]
        flower = free_port()
        while (metrics := free_port()) == flower:
            pass  # the kernel may hand out the same free port twice
        env.update(ARTIFACTFS_ROOT=str(base / "afs"), ARTIFACTFS_MOUNT_ROOT=str(base / "mnt"),
                   ARTIFACTFS_LOG_LEVEL="INFO", PYTHONPATH=str(REPO_ROOT),
                   # a queue of its own (artifactfs.<host>): no other worker takes its jobs
                   ARTIFACTFS_HOST=f"{janitor.base.name}-{base.name}",
                   ARTIFACTFS_FLOWER_PORT=str(flower), ARTIFACTFS_METRICS_PORT=str(metrics),
                   # what each step fetches on demand is measured, not what a backfill adds
                   ARTIFACTFS_BACKFILL="never")
        return cls(base / "afs", base / "mnt", env, janitor)

    @property
    def mount_path(self) -> Path:
        return self.mount_root / REPO_NAME

    @property
    def log_file(self) -> Path:
        return self.root.parent / "mountd.log"

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return run([sys.executable, "-m", "artifactfs.cli", *args], self.env, cwd=REPO_ROOT)

    def add_repo(self, remote: Remote) -> float:
        start = time.perf_counter()
        out = self.cli("add-repo", "--name", REPO_NAME, "--remote", remote.url, "--ref", remote.ref)
        elapsed = time.perf_counter() - start
        if out.stdout.decode().strip() != f"added {REPO_NAME}":
            raise RuntimeError(f"unexpected add-repo output: {out.stdout!r}")
        return elapsed

    def start_daemon(self) -> float:
        """Start mountd; return the seconds until the mount is visible."""
        start = time.perf_counter()
        with open(self.log_file, "ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "artifactfs.cli", "--log-level", "INFO", "daemon"], env=self.env,
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.janitor.daemons.append(self.daemon)
        target = str(self.mount_path)
        deadline = start + MOUNT_TIMEOUT
        while target not in fuse_mounts():
            if self.daemon.poll() is not None:
                raise RuntimeError(f"mountd exited with {self.daemon.returncode}:\n{self.log_tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{target} not mounted after {MOUNT_TIMEOUT}s:\n{self.log_tail()}")
            time.sleep(0.002)
        return time.perf_counter() - start

    def stop_daemon(self) -> float:
        """SIGTERM mountd, then unmount: mount processes outlive mountd, so the mount must still
        serve once mountd has exited; return the seconds until mountd exited and the mount and its
        process are gone."""
        assert self.daemon is not None
        start = time.perf_counter()
        stop_process(self.daemon)
        self.janitor.daemons.remove(self.daemon)
        self.daemon = None
        if str(self.mount_path) not in fuse_mounts():
            raise RuntimeError(f"the mount went away with mountd:\n{self.log_tail()}")
        pid_files = list((self.root / "run" / "mounts").glob("*.pid"))
        unmount_under(self.mount_root)
        deadline = time.perf_counter() + STOP_TIMEOUT
        while any(p.exists() for p in pid_files) or str(self.mount_path) in fuse_mounts():
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.mount_path} or its mount process outlived the unmount")
            time.sleep(0.002)
        return time.perf_counter() - start

    def fetch_stats(self, name: str = REPO_NAME) -> dict[str, float]:
        path = self.root / "state" / name / "fetch-stats.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {"transactions": 0, "objects": 0, "seconds": 0.0}

    def status(self) -> dict[str, object]:
        return json.loads(self.cli("status", "--name", REPO_NAME, "--json").stdout)

    def log_tail(self, lines: int = 30, log_file: Path | None = None) -> str:
        try:
            return "\n".join((log_file or self.log_file).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # --- the asynchronous stack (`artifactfs up`) ---

    def stack_logs(self, lines: int = 15) -> str:
        logs = self.root / "log"
        return "\n".join(f"--- {name}.log:\n{self.log_tail(lines, logs / f'{name}.log')}"
                         for name in ("worker", "mountd"))

    def up(self) -> float:
        """`artifactfs up`; return the seconds until every service answered."""
        self.janitor.stacks.append(self)  # before: a failed `up` may leave some services running
        start = time.perf_counter()
        run([sys.executable, "-m", "artifactfs.cli", "up"], self.env, cwd=REPO_ROOT, timeout=STACK_TIMEOUT)
        return time.perf_counter() - start

    def down(self) -> float:
        """`artifactfs down` (mountd unmounts everything on its way out); return its seconds."""
        start = time.perf_counter()
        run([sys.executable, "-m", "artifactfs.cli", "down"], self.env, cwd=REPO_ROOT, timeout=STACK_TIMEOUT)
        elapsed = time.perf_counter() - start
        self.janitor.stacks.remove(self)
        self.reap()
        return elapsed

    def stop_stack(self) -> None:
        """Clean-up path (errors, Ctrl-C): `artifactfs down`, then whatever it left."""
        if self not in self.janitor.stacks:
            return  # never started, or already down
        self.janitor.stacks.remove(self)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([sys.executable, "-m", "artifactfs.cli", "down"], env=self.env, cwd=REPO_ROOT,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=STACK_TIMEOUT, check=False)
        self.reap()

    def reap(self) -> None:
        """SIGKILL any service a pid file still names, and take down mounts left behind."""
        run_root = self.root / "run"
        for pid_file in run_root.glob("*.pid") if run_root.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if process_of(pid, self.root):
                    os.killpg(pid, signal.SIGKILL)  # each service leads its own session
        unmount_under(self.mount_root)

    def add_async(self, name: str, remote: Remote) -> tuple[float, float, bool]:
        """`add-repo --async`: (perf_counter at start, at return, placeholder mounted at return)."""
        start = time.perf_counter()
        out = self.cli("add-repo", "--async", "--name", name, "--remote", remote.url, "--ref", remote.ref)
        returned = time.perf_counter()
        mounted = str(self.mount_root / name) in fuse_mounts()
        if out.stdout.decode().strip() != f"queued {name}":
            raise RuntimeError(f"unexpected add-repo --async output: {out.stdout!r}")
        return start, returned, mounted

    def events(self, name: str) -> list[dict[str, object]]:
        return json.loads(self.cli("events", "--name", name, "--json").stdout)


@dataclass
class Counters:
    """Fetch counters sampled before a step, to report the step's own share."""

    transactions: int
    objects: int
    seconds: float
    packs: int | None

    @classmethod
    def take(cls, inst: Installation | None, remote: Remote) -> "Counters":
        stats = inst.fetch_stats() if inst is not None else {}
        return cls(int(stats.get("transactions", 0)), int(stats.get("objects", 0)),
                   float(stats.get("seconds", 0.0)), remote.packs())

    def since(self, inst: Installation | None, remote: Remote) -> "Counters":
        now = Counters.take(inst, remote)
        packs = None if self.packs is None or now.packs is None else now.packs - self.packs
        return Counters(now.transactions - self.transactions, now.objects - self.objects,
                        now.seconds - self.seconds, packs)


# --------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, remote: Remote, base: Path, janitor: Janitor) -> None:
        self.args = args
        self.remote = remote
        self.base = base
        self.janitor = janitor
        self.results = Results()
        self.files: list[tuple[str, str]] = []
        self.sample: list[tuple[str, str]] = []
        self.extras: list[dict[str, object]] = []

    def clone(self, dest: Path, *flags: str) -> tuple[float, int | None]:
        before = self.remote.packs()
        seconds = timed(["git", "clone", "-q", *flags, *self.remote.clone_args(), "--", self.remote.url, dest],
                        self.remote.git_env)
        after = self.remote.packs()
        return seconds, None if before is None or after is None else after - before

    def run_once(self, index: int) -> None:
        work = self.base / f"run-{index}"
        work.mkdir()
        try:
            lazy = index < self.args.lazy_runs
            self.git_steps(work, lazy)
            self.mount_steps(work / "mounted")
            if lazy and len(self.sample) < len(self.files):
                self.mount_sample_step(work / "sampled")
        finally:
            unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)

    def git_steps(self, work: Path, lazy: bool) -> None:
        r = self.results
        full = work / "full"
        seconds, packs = self.clone(full)
        r.row("a", "git clone (full)").add(seconds, packs=packs)
        seconds, count = read_all(full)
        r.row("h", "read all files, native checkout of (a)", count,
              note="page cache warm").add(seconds)
        shutil.rmtree(full)

        blobless = work / "blobless"
        seconds, packs = self.clone(blobless, "--filter=blob:none", "--no-checkout")
        r.row("b", "git clone --filter=blob:none --no-checkout").add(seconds, packs=packs)
        if not self.files:
            self.choose_files(blobless / ".git")

        checkout = work / "checkout"
        seconds, packs = self.clone(checkout, "--filter=blob:none")
        r.row("c", "git clone --filter=blob:none (+ checkout)").add(seconds, packs=packs)
        shutil.rmtree(checkout)

        if lazy:
            self.git_lazy_step(blobless)
            wait_for_auto_gc(blobless / ".git")
        shutil.rmtree(blobless)

    def choose_files(self, git_dir: Path) -> None:
        self.files = tree_files(git_dir, self.remote.git_env)
        if not self.files:
            raise SystemExit("bench: the tree has no regular files")
        self.sample = even_sample(self.files, self.args.lazy_sample)

    def git_lazy_step(self, clone: Path) -> None:
        trace = clone.parent / "trace2.json"
        env = dict(self.remote.git_env, GIT_TRACE2_EVENT=str(trace))
        before = self.remote.packs()
        start = time.perf_counter()
        for _path, oid in self.sample:
            run(["git", "-C", clone, "cat-file", "blob", oid], env)
        seconds = time.perf_counter() - start
        after = self.remote.packs()
        packs = None if before is None or after is None else after - before
        n = len(self.sample)
        label = "git lazy fetch: cat-file per file, blobless clone"
        if n < len(self.files):
            label += f" ({n}-file sample)"
        r = self.results
        r.row("g", label, n).add(seconds, transactions=lazy_fetches(trace), packs=packs,
                                 blobs=len({oid for _, oid in self.sample}))
        if n < len(self.files):
            r.row("g~", f"  (g) EXTRAPOLATED to all {len(self.files)} files", len(self.files),
                  note="per-file time of (g) x all files").add(seconds / n * len(self.files))
            r.rows["g~"].extrapolated = True

    def mount_steps(self, work: Path) -> None:
        r = self.results
        inst = Installation.create(work, self.remote, self.janitor)
        # The first command on an installation creates the registry (and imports SQLAlchemy and
        # SQLModel for that, once): its own row, so that (d) is add-repo alone.
        r.row("d0", "artifactfs list-repos, fresh installation",
              note="first command on a fresh installation: creates the registry").add(
            timed([sys.executable, "-m", "artifactfs.cli", "list-repos"], inst.env, REPO_ROOT))
        before = Counters.take(None, self.remote)
        seconds = inst.add_repo(self.remote)
        r.row("d", "artifactfs add-repo (blocking: + blobless clone)",
              note="registry already there").add(seconds, packs=before.since(None, self.remote).packs)
        try:
            r.row("e1", "artifactfs daemon start -> mount visible").add(inst.start_daemon())

            start = time.perf_counter()
            names = os.listdir(inst.mount_path)
            r.row("e2", "  then first ls of the mount root").add(time.perf_counter() - start)

            readmes = sorted(n for n in names if n.startswith("README"))
            counters = Counters.take(inst, self.remote)
            start = time.perf_counter()
            for name in readmes:
                path = inst.mount_path / name
                if path.is_file():
                    read_file(os.fspath(path))
            seconds = time.perf_counter() - start
            delta = counters.since(inst, self.remote)
            if readmes:
                r.row("e3", "  then cat README*", len(readmes)).add(
                    seconds, transactions=delta.transactions, packs=delta.packs, blobs=delta.objects)

            counters = Counters.take(inst, self.remote)
            seconds, count = read_all(inst.mount_path)
            delta = counters.since(inst, self.remote)
            r.row("f", "read all files cold through the mount", count).add(
                seconds, transactions=delta.transactions, packs=delta.packs, blobs=delta.objects,
                fetch_seconds=delta.seconds)

            counters = Counters.take(inst, self.remote)
            seconds, count = read_all(inst.mount_path)
            delta = counters.since(inst, self.remote)
            r.row("f2", "  then read all files again (hydrated mount)", count).add(
                seconds, transactions=delta.transactions, packs=delta.packs, blobs=delta.objects)
            self.extras.append({"step": "f", "status": inst.status()})
        finally:
            if inst.daemon is not None:
                r.row("e4", "mountd SIGTERM, then fusermount3 -u (-> gone)").add(inst.stop_daemon())

    def mount_sample_step(self, work: Path) -> None:
        inst = Installation.create(work, self.remote, self.janitor)
        inst.add_repo(self.remote)
        try:
            inst.start_daemon()
            paths = [os.fspath(inst.mount_path / path) for path, _ in self.sample]
            counters = Counters.take(inst, self.remote)
            start = time.perf_counter()
            for path in paths:
                read_file(path)
            seconds = time.perf_counter() - start
            delta = counters.since(inst, self.remote)
            self.results.row(
                "f*", "read (g)'s sample cold by path, fresh mount", len(paths),
                note="no directory listed first",
            ).add(seconds, transactions=delta.transactions, packs=delta.packs, blobs=delta.objects,
                  fetch_seconds=delta.seconds)
        finally:
            if inst.daemon is not None:
                inst.stop_daemon()


    # --- the asynchronous path: one `artifactfs up` stack for the whole section ---

    def async_steps(self) -> None:
        runs = self.args.async_runs
        work = self.base / "async"
        work.mkdir()
        inst = Installation.create(work, self.remote, self.janitor)
        r = self.results
        try:
            inst.cli("list-repos")  # the registry, created before anything is timed
            r.row("u1", "artifactfs up (redis, worker, mountd, flower)").add(inst.up())
            try:
                for index in range(runs):
                    self.async_read_run(inst, index)
                    time.sleep(ASYNC_SETTLE)
                self.async_ready_runs(inst, runs)
                self.async_notes(runs)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{inst.stack_logs()}") from None
            self.extras.append({"step": "async", "status": json.loads(inst.cli("status", "--json").stdout)})
            r.row("u2", "artifactfs down (every mount taken down)").add(inst.down())
        finally:
            inst.stop_stack()
            unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)

    def async_notes(self, runs: int) -> None:
        rows = self.results.rows
        add, first, ready = rows["d1"], rows["d2"], rows["d3"]
        add.note = f"placeholder mounted on return {add.counts.get('placeholder', 0)}/{runs}"
        notes = []
        if first.phase_seconds:
            notes.append(f"worker clone phase {statistics.median(first.phase_seconds):.2f}s")
        first.note = ", ".join([*notes, "compare (b)"])
        blocked = ready.counts.get("blocked", 0)
        notes = [f"ls blocked {blocked}/{runs}"]
        if not blocked:
            # Nothing waited (a remote too fast to slow down): show what there is, and say so.
            ready.seconds, ready.unblocked = ready.unblocked, []
            notes.append("none waited: figures are ready -> return of an ls started after it")
        elif blocked < runs:
            notes.append("only those counted")
        notes.append(f"placeholder mounted on return {ready.counts.get('placeholder', 0)}/{runs}")
        if ready.phase_seconds:
            delay = f", packs {self.args.async_delay:g}s late" if self.remote.daemon is not None else ""
            notes.append(f"clone phase {statistics.median(ready.phase_seconds):.2f}s{delay}")
        ready.note = ", ".join(notes)

    def async_read_run(self, inst: Installation, index: int) -> None:
        """(d1) add-repo --async, and (d2) from its start until README* is read through the mount."""
        name = f"read{index}"
        path = inst.mount_root / name
        before = Counters.take(None, self.remote)
        start, returned, mounted = inst.add_async(name, self.remote)
        if not mounted:
            wait_mounted(path)
        names = os.listdir(path)  # waits at the gate until the worker's clone is in place
        readmes = sorted(n for n in names if n.startswith("README") and (path / n).is_file())
        for readme in readmes:
            read_file(os.fspath(path / readme))
        done = time.perf_counter()
        stats = inst.fetch_stats(name)
        packs = before.since(None, self.remote).packs
        clone = clone_phase_seconds(inst.events(name))
        r = self.results
        add = r.row("d1", "artifactfs add-repo --async (placeholder up)")
        add.add(returned - start)
        add.counts["placeholder"] = add.counts.get("placeholder", 0) + mounted
        done_what = "cat README* done" if readmes else "first ls done (no README*)"
        first = r.row("d2", f"  add-repo --async start -> {done_what}")
        first.add(done - start, transactions=int(stats.get("transactions", 0)), packs=packs,
                  blobs=int(stats.get("objects", 0)))
        if clone is not None:
            first.phase_seconds.append(clone)
        self.extras.append({"step": "d1/d2", "name": name, "add_seconds": returned - start,
                            "placeholder_mounted": mounted, "first_read_seconds": done - start,
                            "readmes": readmes, "clone_phase_seconds": clone})

    def async_ready_runs(self, inst: Installation, runs: int) -> None:
        """(d3): the worker's `ready` event -> a listing blocked at the gate returns."""
        daemon = self.remote.daemon
        try:
            if daemon is not None:
                daemon.set_delay(self.args.async_delay)  # every pack starts late: a slow clone
            for index in range(runs):
                self.async_ready_run(inst, index)
                time.sleep(ASYNC_SETTLE)
        finally:
            if daemon is not None:
                daemon.set_delay(0)

    def async_ready_run(self, inst: Installation, index: int) -> None:
        name = f"ready{index}"
        path = inst.mount_root / name
        _start, _returned, mounted = inst.add_async(name, self.remote)
        if not mounted:
            wait_mounted(path)
        listing = BlockedListing(path)
        listing.join(READY_TIMEOUT)
        events = inst.events(name)
        ready = [e for e in events if e.get("type") == "ready"]
        if not ready:
            raise RuntimeError(f"{name}: the listing returned but there is no ready event: {events}")
        ready_at = event_time(str(ready[-1]["time"]))
        blocked = listing.started_at < ready_at
        latency = listing.returned_at - ready_at
        clone = clone_phase_seconds(events)
        row = self.results.row("d3", "readiness: ready event -> blocked ls returns", unit="ms")
        row.counts["placeholder"] = row.counts.get("placeholder", 0) + mounted
        row.counts["blocked"] = row.counts.get("blocked", 0) + blocked
        if blocked:
            row.add(latency)
        else:
            row.unblocked.append(latency)
        if clone is not None:
            row.phase_seconds.append(clone)
        self.extras.append({"step": "d3", "name": name, "placeholder_mounted": mounted, "blocked": blocked,
                            "ls_started_at": listing.started_at, "ls_returned_at": listing.returned_at,
                            "ready_at": ready_at, "latency_seconds": latency, "clone_phase_seconds": clone,
                            "entries": len(listing.names or [])})


def clone_phase_seconds(events: list[dict[str, object]]) -> float | None:
    """How long the worker's clone phase took: from its `phase clone` event to the next event."""
    for this, following in itertools.pairwise(events):
        payload = this.get("payload")
        if this.get("type") == "phase" and isinstance(payload, dict) and payload.get("phase") == "clone":
            return event_time(str(following["time"])) - event_time(str(this["time"]))
    return None


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

ORDER = ["a", "b", "c", "d0", "d", "d1", "d2", "d3", "e1", "e2", "e3", "e4", "u1", "u2",
         "f", "f2", "f*", "g", "g~", "h"]


def machine_facts(remote: Remote, files: int, args: argparse.Namespace, date: str) -> dict[str, object]:
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "git": command_output(["git", "--version"]).removeprefix("git version "),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": date,
        "remote": remote.description,
        "ref": remote.ref,
        "files": files,
        "runs": args.runs,
        "lazy_sample": args.lazy_sample,
        "lazy_runs": min(args.lazy_runs, args.runs),
        "async_runs": args.async_runs,
        "async_delay": args.async_delay if remote.daemon is not None else None,
        "tmp": tempfile.gettempdir(),
    }


def fmt_seconds(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f}ms" if unit == "ms" else f"{value:.3f}"


def fmt_counts(values: list[int]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    med = statistics.median(values)
    text = f"{med:g}"
    return text if low == high else f"{text} ({low}-{high})"


def render(results: Results, facts: dict[str, object]) -> str:
    rows = [results.rows[k] for k in ORDER if k in results.rows]
    label_w = max(len(f"{m.key:<3} {m.label}") for m in rows)
    header = (f"{'step':<{label_w}}  {'runs':>4} {'median s':>9} {'min s':>9} {'max s':>9} {'files':>6} "
              f"{'ms/file':>8} {'fetch txns':>11} {'server packs':>13} {'blobs fetched':>14}  note")
    lines = [
        (f"machine: nproc={facts['nproc']} git={facts['git']} python={facts['python']} "
         f"kernel={facts['kernel']} date={facts['date']}"),
        (f"remote: {facts['remote']} ref={facts['ref']} files={facts['files']} "
         f"runs={facts['runs']} lazy-sample={facts['lazy_sample']} lazy-runs={facts['lazy_runs']} "
         f"async-runs={facts['async_runs']} tmp={facts['tmp']}"),
        "",
        header,
        "-" * len(header),
    ]
    for m in rows:
        per_file = m.per_file_ms()
        notes = ["EXTRAPOLATED"] if m.extrapolated else []
        if m.fetch_seconds:
            notes.append(f"{statistics.median(m.fetch_seconds):.2f}s of it in fetches")
        if m.note:
            notes.append(m.note)
        note = ", ".join(notes)
        lines.append(
            f"{f'{m.key:<3} {m.label}':<{label_w}}  {len(m.seconds):>4} {fmt_seconds(m.median, m.unit):>9} "
            f"{fmt_seconds(min(m.seconds, default=None), m.unit):>9} "
            f"{fmt_seconds(max(m.seconds, default=None), m.unit):>9} "
            f"{'' if m.files is None else m.files:>6} {'' if per_file is None else f'{per_file:.3f}':>8} "
            f"{fmt_counts(m.transactions):>11} {fmt_counts(m.packs):>13} {fmt_counts(m.blobs):>14}  {note}".rstrip()
        )
    lines += [
        "",
        "fetch txns: client side (the mount's fetch-stats.json; git's lazy fetches from GIT_TRACE2_EVENT).",
        "server packs: packs the synthetic git daemon served (one per fetch transaction).",
        "d0: the first command on a fresh installation creates the registry (SQLAlchemy/SQLModel import, once);",
        "    (d) then runs on that installation, so it is add-repo alone.",
    ]
    if "d1" in results.rows:
        lines += [
            "d1-d3: one `artifactfs up` stack for all of them, a new repository name per run.",
            "d1: placeholder mounted = in /proc/self/mountinfo the moment add-repo --async returned.",
            "d2: add-repo --async start -> README* read through the mount (the listing waits for the worker's",
            "    blobless clone); server packs = that clone + the README fetch; compare (b), the clone alone.",
            "d3: milliseconds; time of the worker's `ready` event (events --json) -> return of an os.listdir of",
            "    the mount root started in a thread right after add-repo --async returned (time.time(), one",
            "    clock); 'ls blocked' = the listing started before the ready event, so it waited at the gate.",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark artifactfs against plain git clones and lazy fetches.")
    p.add_argument("--remote", help="remote URL (default: a synthetic repository served by git daemon)")
    p.add_argument("--ref", help="ref to check out/mount (default: the remote's HEAD, else refs/heads/main)")
    p.add_argument("--runs", type=int, default=5, help="repetitions of every step (default: 5)")
    p.add_argument("--files", type=int, default=5000, help="files of the synthetic repository (default: 5000)")
    p.add_argument("--dirs", type=int, default=50, help="directories of the synthetic repository (default: 50)")
    p.add_argument("--lazy-sample", type=int, default=500,
                   help="files read one by one in (g) and (f*) (default: 500; the rest is extrapolated)")
    p.add_argument("--lazy-runs", type=int, default=1,
                   help="runs that include the sampled steps (g) and (f*) (default: 1)")
    p.add_argument("--async-runs", type=int, default=9,
                   help="registrations per step of the asynchronous section (d1-d3) (default: 9; 0: skip it)")
    p.add_argument("--async-delay", type=float, default=1.0,
                   help="synthetic remote: seconds every pack is held back during (d3), so the clone is slow "
                        "(default: 1.0)")
    p.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    args = p.parse_args(argv)
    if min(args.runs, args.dirs, args.lazy_sample, args.lazy_runs) < 1 or args.files < 0:
        p.error("--runs, --dirs, --lazy-sample and --lazy-runs must be >= 1, --files >= 0")
    if args.async_runs < 0 or args.async_delay < 0:
        p.error("--async-runs and --async-delay must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    base = Path(tempfile.mkdtemp(prefix="artifactfs-bench-")).resolve()
    janitor = Janitor(base)
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        if args.remote:
            remote = external_remote(args.remote, args.ref)
        else:
            if args.ref:
                print("bench: --ref is ignored for the synthetic remote (refs/heads/main)", file=sys.stderr)
            remote = synthetic_remote(base, args.files, args.dirs, janitor)
        bench = Bench(args, remote, base, janitor)
        for index in range(args.runs):
            bench.run_once(index)
            print(f"bench: run {index + 1}/{args.runs} done ({time.perf_counter() - started:.0f}s)",
                  file=sys.stderr, flush=True)
        if args.async_runs:
            bench.async_steps()
            print(f"bench: asynchronous section done ({time.perf_counter() - started:.0f}s)",
                  file=sys.stderr, flush=True)
        facts = machine_facts(remote, len(bench.files), args, date)
        check_counts(bench)
        print(render(bench.results, facts))
        if args.json:
            write_json(args.json, facts, bench)
    except KeyboardInterrupt:
        print("bench: interrupted, cleaning up", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        janitor.close()
    return 0


def check_counts(bench: Bench) -> None:
    """Every reading step must have seen the same files; say so loudly if not."""
    expected = len(bench.files)
    for key in ("f", "h"):
        row = bench.results.rows.get(key)
        if row is not None and row.files != expected:
            print(f"bench: WARNING: step {key} read {row.files} files, the tree has {expected}", file=sys.stderr)


def write_json(path: Path, facts: dict[str, object], bench: Bench) -> None:
    data = {
        "machine": facts,
        "measurements": [bench.results.rows[k].summary() for k in ORDER if k in bench.results.rows],
        "extras": bench.extras,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
