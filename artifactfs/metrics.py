"""Prometheus metrics: what mountd, its mount processes and the workers count, and the endpoint.

Every process of the stack writes its samples to files of its own under <root>/run/metrics
(prometheus_client's multiprocess mode): a Celery worker runs jobs in pool processes, and mountd
runs one mount process per repository, so no single process could answer a scrape alone. The
`metrics` service that `up` starts adds those files up at each scrape, with what it reads itself
at that moment: the repositories of this host by state (the registry) and the mount processes
running (their pid files).

Labels are small closed sets (a phase, an outcome, a lane, a kind), never a repository name: a fleet
host serves thousands of repositories, and a series per repository would be the scraper's cost.
A process that never called enable() (a blocking `add-repo`, a test) counts in memory only. A
process that counts calls open_files() as it starts (mountd, each mount process, each pool process).
"""
from __future__ import annotations

import base64
import binascii
import enum
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from .config import Settings
from .history import lazy_fetches
from .model import HistoryState, PrepareState
from .procs import is_running, read_pid_file

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: from a metadata-only wait to a clone of a large repository.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)
_NODE = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())
_DB_FILE = re.compile(r"^[a-z_]+_(?P<node>[A-Za-z0-9.-]+)-(?P<pid>\d+)\.db$")


class ErrorKind(str, enum.Enum):
    """What `artifactfs_errors_total` counts, by where the error struck."""

    OPERATION = "operation"  # a file system operation failed with EIO on an unexpected error
    FETCH = "fetch"  # a fetch transaction of a mount failed
    PREPARE = "prepare"  # a preparation ended failed
    RECONCILE = "reconcile"  # mountd could not bring one repository (or all) where the log says
    MOUNT_PROCESS = "mount_process"  # a mount process exited while it should have served
    PUBLISH = "publish"  # mountd could not publish a prepare job (the broker down)


class GateOutcome(str, enum.Enum):
    OPENED = "opened"
    FAILED = "failed"  # EIO: the preparation failed, or the mount is going away
    INTERRUPTED = "interrupted"  # the caller was signalled (EINTR)


PREPARE_PHASE_SECONDS = Histogram(
    "artifactfs_prepare_phase_seconds", "Time spent in one phase of a preparation, by phase and outcome (ok, failed).",
    ["phase", "outcome"], buckets=DURATION_BUCKETS,
)  # fmt: skip
PREPARE_SECONDS = Histogram(
    "artifactfs_prepare_seconds", "Time a prepare job took, by outcome (ready, failed, retry, skipped, crashed).",
    ["outcome"], buckets=DURATION_BUCKETS,
)  # fmt: skip
READY_SECONDS = Histogram(
    "artifactfs_ready_seconds",
    "Time from a prepare job's start to its ready event, by whether the history follows it (behind) or came before (whole).",
    ["history"], buckets=DURATION_BUCKETS,
)  # fmt: skip
GATE_WAIT_SECONDS = Histogram(
    "artifactfs_gate_wait_seconds",
    "Time a file system operation waited at a closed gate (its _count is the number of waits), by outcome.",
    ["outcome"], buckets=DURATION_BUCKETS,
)  # fmt: skip
FETCH_TRANSACTIONS = Counter(
    "artifactfs_fetch_transactions", "Fetch transactions of file contents, by lane (urgent, bulk) and outcome.",
    ["lane", "outcome"],
)  # fmt: skip
FETCH_SECONDS = Histogram(
    "artifactfs_fetch_seconds", "Time one fetch transaction took, by lane.", ["lane"], buckets=DURATION_BUCKETS
)
HYDRATED_OBJECTS = Counter("artifactfs_hydrated_objects", "Objects a fetch transaction brought, by lane.", ["lane"])
HYDRATED_BYTES = Counter(
    "artifactfs_hydrated_bytes", "Bytes of file contents (uncompressed) a fetch transaction brought, by lane.", ["lane"]
)
ERRORS = Counter("artifactfs_errors", "Errors by kind (see ErrorKind in artifactfs/metrics.py).", ["kind"])

LANES = ("urgent", "bulk")


def recorded(record: Callable[..., None]) -> Callable[..., None]:
    """A count never costs the operation it counts: a failure to record is logged and dropped."""

    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            record(*args, **kwargs)
        except Exception as exc:
            log.debug("metrics: could not record %s: %s", record.__name__, exc)

    return guarded


def process_identifier() -> str:
    """What names this process's files: its pid, and the machine's name (in compose.yaml each
    container has pids of its own, and they share the metrics directory). No '_': the collector
    splits file names on it."""
    return f"{_NODE}-{os.getpid()}"


# prometheus_client's files start at 1 MiB, which our closed label sets never outgrow.
FILE_BYTES = 1 << 20
FILE_KINDS = ("counter", "histogram")  # no gauge is counted in a process: the endpoint reads them


def allocate_files() -> bool:
    """Give this process's files their disk space now, or count in memory only.

    prometheus_client writes through a memory map of a sparse file: on a full disk, the first
    write to a page that has no block yet kills the process with SIGBUS, and a full state root
    must cost a preparation or a read, never a worker or a mount. So the space is taken here, at
    the start of each process, while there is some; without it this process keeps its counts in
    memory (they are not exported) and the files are not made at all."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return False
    made = []
    try:
        for kind in FILE_KINDS:
            path = Path(directory, f"{kind}_{process_identifier()}.db")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                if os.fstat(fd).st_size == 0:
                    made.append(path)
                    os.posix_fallocate(fd, 0, FILE_BYTES)
            finally:
                os.close(fd)
    except OSError as exc:
        for path in made:
            path.unlink(missing_ok=True)
        values.ValueClass = values.MutexValue
        log.warning("metrics: this process counts in memory only (%s)", exc.strerror or exc)
        return False
    return True


def enable(settings: Settings) -> None:
    """Make this process (and those it starts) write its samples to the stack's metrics directory
    (Settings.ensure_dirs makes it).

    Called once at the start of a service, before it counts anything. prometheus_client chooses
    where values live when a value is made: every metric here has labels, so none exists yet.
    A forked process (Celery's pool) finds its new pid and writes files of its own."""
    os.environ[MULTIPROC_ENV] = str(settings.metrics_dir)
    values.ValueClass = values.MultiProcessValue(process_identifier)


@recorded
def open_files() -> None:
    """Take this process's files (allocate_files) and make its values now, which opens the files
    while it may: a mount process that becomes a repository's owner can no longer create files in
    root's directory, but keeps writing those it holds open."""
    allocate_files()
    GATE_WAIT_SECONDS.labels(GateOutcome.OPENED.value)
    for lane in LANES:
        for outcome in ("ok", "failed"):
            FETCH_TRANSACTIONS.labels(lane, outcome)
        FETCH_SECONDS.labels(lane)
        HYDRATED_OBJECTS.labels(lane)
        HYDRATED_BYTES.labels(lane)
    for kind in ErrorKind:
        ERRORS.labels(kind.value)


@recorded
def count_error(kind: ErrorKind) -> None:
    ERRORS.labels(kind.value).inc()


@recorded
def observe_prepare(outcome: str, seconds: float) -> None:
    PREPARE_SECONDS.labels(outcome).observe(seconds)


@recorded
def observe_ready(history_behind: bool, seconds: float) -> None:
    READY_SECONDS.labels("behind" if history_behind else "whole").observe(seconds)


@recorded
def observe_phase(phase: str, outcome: str, seconds: float) -> None:
    PREPARE_PHASE_SECONDS.labels(phase, outcome).observe(seconds)


@recorded
def observe_gate_wait(outcome: GateOutcome, seconds: float) -> None:
    GATE_WAIT_SECONDS.labels(outcome.value).observe(seconds)


@recorded
def observe_fetch(lane: str, ok: bool, seconds: float, objects: int, size: int) -> None:
    FETCH_TRANSACTIONS.labels(lane, "ok" if ok else "failed").inc()
    FETCH_SECONDS.labels(lane).observe(seconds)
    if objects:
        HYDRATED_OBJECTS.labels(lane).inc(objects)
    if size:
        HYDRATED_BYTES.labels(lane).inc(size)
    if not ok:
        ERRORS.labels(ErrorKind.FETCH.value).inc()


class PhaseClock:
    """Times the phases of one preparation: each begin() ends the phase before it as ok."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._phase: str | None = None
        self._since = 0.0

    def begin(self, phase: str) -> None:
        self.end("ok")
        self._phase, self._since = phase, self._clock()

    def end(self, outcome: str) -> None:
        if self._phase is not None:
            observe_phase(self._phase, outcome, self._clock() - self._since)
            self._phase = None


@contextmanager
def gate_wait() -> Iterator[Callable[[GateOutcome], None]]:
    """Time a wait at a closed gate; the body says how it ended."""
    started = time.monotonic()
    ended: list[GateOutcome] = []
    try:
        yield ended.append
    finally:
        observe_gate_wait(ended[-1] if ended else GateOutcome.INTERRUPTED, time.monotonic() - started)


# --- what the endpoint reads at each scrape ---


def forget_dead_processes(directory: Path) -> list[Path]:
    """Remove the files of this machine's processes that no longer run: a host that has run
    thousands of mount processes would make every scrape read thousands of files. Their counters
    go with them, which a scraper sees as a restart of those counters. Files of another machine
    (another container) are left alone: their pids mean nothing here."""
    removed = []
    for path in directory.glob("*.db"):
        found = _DB_FILE.match(path.name)
        if found is None or found["node"] != _NODE:
            continue
        try:
            os.kill(int(found["pid"]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except PermissionError:
            pass  # it runs, as another user
    return removed


class StackCollector:
    """What no process counts: the repositories by state and the mount processes running, read at
    the moment of the scrape."""

    def __init__(self, settings: Settings, registry: Any) -> None:
        self.settings = settings
        self.registry = registry
        self._lock = threading.Lock()  # scrapes run in threads; the registry's connection is one

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            return list(self._collect())

    def _collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("artifactfs_registry_up", "Whether the registry answered this scrape (1) or not (0).")
        repos = GaugeMetricFamily("artifactfs_repositories", "Repositories of this host, by state.", labels=["state"])
        history = GaugeMetricFamily("artifactfs_repositories_history",
                                    "Ready repositories of this host, by the state of their history.", labels=["state"])  # fmt: skip
        lazy = GaugeMetricFamily("artifactfs_git_lazy_fetches",
                                 "git's own lazy fetches from the git directories of this host's repositories.")  # fmt: skip
        try:
            counts = {state.value: 0 for state in PrepareState}
            histories = {state.value: 0 for state in HistoryState}
            fetches = 0
            for repo in self.registry.repos():
                counts[repo.state.value] = counts.get(repo.state.value, 0) + 1
                if repo.state is PrepareState.READY:
                    histories[repo.history] = histories.get(repo.history, 0) + 1
                fetches += lazy_fetches(self.settings.repo_git_dir(repo))
        except Exception as exc:  # the registry unreachable: the other series still answer
            log.warning("metrics: could not read the registry: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for state, count in counts.items():
                repos.add_metric([state], count)
            for state, count in histories.items():
                history.add_metric([state], count)
            lazy.add_metric([], fetches)
            yield from (repos, history, lazy)
        yield up
        mounts = GaugeMetricFamily("artifactfs_mount_processes", "Mount processes serving a mount on this host.")
        mounts.add_metric([], self._mount_processes())
        yield mounts

    def _mount_processes(self) -> int:
        root = self.settings.mount_run_root
        if not root.is_dir():
            return 0
        return sum(1 for pid_file in root.glob("*.pid") if (ident := read_pid_file(pid_file)) and is_running(ident))


def scrape_registry(settings: Settings, registry: Any) -> CollectorRegistry:
    collectors = CollectorRegistry()
    MultiProcessCollector(collectors, path=str(settings.metrics_dir))
    collectors.register(StackCollector(settings, registry))
    return collectors


# --- the endpoint ---


def basic_auth_app(app: Callable[..., Any], user: str, password: str) -> Callable[..., Any]:
    """`app` behind HTTP basic auth: every listening service authenticates, and the series name
    what this host serves."""
    expected = f"{user}:{password}".encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        try:
            given = base64.b64decode(token, validate=True) if scheme.lower() == "basic" else b""
        except (binascii.Error, ValueError):
            given = b""
        if not secrets.compare_digest(given, expected):
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="artifactfs"'),
                                                ("Content-Type", "text/plain")])  # fmt: skip
            return [b"authentication required\n"]
        return app(environ, start_response)

    return guarded


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scraper that hangs holds a thread, not the service


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line per scrape would drown the log


def serve(settings: Settings, registry: Any, port: int, user: str, password: str, address: str = "127.0.0.1") -> None:
    """Serve /metrics on `address`:`port` until the process is stopped (0.0.0.0 only inside a
    container whose port is published on the host's loopback: compose.yaml)."""
    forget_dead_processes(settings.metrics_dir)
    app = basic_auth_app(make_wsgi_app(scrape_registry(settings, registry)), user, password)
    with make_server(address, port, app, server_class=_Server, handler_class=_QuietHandler) as server:
        log.info("metrics on http://%s:%d/metrics", address, port)
        server.serve_forever()
