"""The embedded stack of one host: `artifactfs up` starts what is missing, `down` stops it.

redis-server (private, on a Unix socket under the state root, unless ARTIFACTFS_REDIS_URL names
one), a Celery worker for this host's queue, mountd, Flower on 127.0.0.1, and the Prometheus
metrics endpoint on 127.0.0.1 (metrics.py). Each runs in its own session with its log under
<root>/log and its pid file under <root>/run.

What keeps a local process from using the stack against root:
- Flower asks for HTTP basic auth on its pages and its API (which can shut workers down and send
  jobs), and the metrics endpoint for the same credential (its series describe what the host
  serves). The credential reaches both through their environment, never a command line (which
  `ps` shows to every user), and lives in <root>/flower-auth (0600) unless the operator sets it.
- A pid file holds a pid and its start time (procs.py): a process is signalled only while it is
  that very process, running the program of that service. A stale file is removed, never obeyed.
- Services start in the run directory: `python -m` puts the working directory first on sys.path
  and Flower reads ./flowerconfig.py, so starting them from the caller's directory (say /tmp)
  would run whatever someone left there, as root.
- `up` and `down` hold an exclusive lock, so concurrent calls start one stack, not several.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEFAULT_FLOWER_PORT, DEFAULT_METRICS_PORT, Settings
from .model import ArtifactError, InvalidInput, MountRefused
from .procs import ProcessId, cmdline, is_running, read_pid_file, write_pid_file
from .wakeup import ping

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
MOUNT_GRACE_SECONDS = 10.0  # for a mount process to exit once unmounted, then after SIGTERM
LOG_GENERATIONS = 3  # <service>.log.1 .. .3 keep the logs of earlier runs
FLOWER_USER = "artifactfs"

# Started in this order, stopped in the reverse one.
SERVICE_NAMES = ("redis", "worker", "mountd", "flower", "metrics")
# What the command line of each service holds (redis and Celery rewrite their process titles,
# so these are words that survive the rewrite). With the start time, this tells a service from a
# process that happens to have its pid after a reboot.
SERVICE_MARKERS: dict[str, tuple[str, ...]] = {
    "redis": ("redis-server",),
    "worker": ("artifactfs", "worker"),
    "mountd": ("artifactfs", "daemon"),
    "flower": ("celery", "flower"),
    "metrics": ("artifactfs", "serve-metrics"),
}
# How `up` hands the metrics service its credential (the same as Flower's): never on a command line.
METRICS_AUTH_ENV = "ARTIFACTFS_METRICS_BASIC_AUTH"
# Never handed to a service: Flower gets its credential as FLOWER_BASIC_AUTH alone, and an open
# API must not be re-enabled from the caller's environment.
WITHHELD_ENV = ("ARTIFACTFS_FLOWER_AUTH", "FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API", METRICS_AUTH_ENV)


class StackError(ArtifactError):
    pass


@dataclass
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    describe: str
    env: dict[str, str]
    umask: int


@dataclass
class Started:
    service: Service
    popen: subprocess.Popen[bytes]
    ident: ProcessId


@dataclass(frozen=True)
class FlowerAuth:
    user: str
    password: str = field(repr=False)

    @property
    def basic(self) -> str:
        """As Flower's --basic-auth spells one credential."""
        return f"{self.user}:{self.password}"


# --- Flower's credential ---


def parse_flower_auth(raw: str, origin: str, fix: str) -> FlowerAuth:
    """`user:password`, refused with a line that names `origin` but never echoes the secret."""
    user, colon, password = raw.partition(":")
    problem = None
    if not raw.isprintable():
        problem = "it holds control characters"
    elif not colon:
        problem = "it has no ':' between user and password"
    elif not user:
        problem = "its user is empty"
    elif not password:
        problem = "its password is empty"
    elif "," in raw:
        problem = "it holds a ',' (Flower reads ',' as a separator between credentials)"
    if problem:
        raise InvalidInput(f"{origin} is not user:password: {problem}: {fix}")
    return FlowerAuth(user, password)


def configured_flower_auth(settings: Settings) -> FlowerAuth | None:
    """ARTIFACTFS_FLOWER_AUTH, checked; None when unset."""
    if settings.flower_auth is None:
        return None
    return parse_flower_auth(settings.flower_auth, "ARTIFACTFS_FLOWER_AUTH",
                             "fix it, or unset it to have a password generated")  # fmt: skip


def stored_flower_auth(settings: Settings) -> FlowerAuth:
    """The credential in <root>/flower-auth, generated on first use and kept, so the password
    stays the same across `up`s."""
    path = settings.flower_auth_file
    try:
        raw = _read_private(path)
    except FileNotFoundError:
        auth = FlowerAuth(FLOWER_USER, secrets.token_urlsafe(24))
        _write_private(path, f"{auth.basic}\n")
        return auth
    return parse_flower_auth(raw.rstrip("\n"), str(path),
                             "remove it to have a new password generated, or set ARTIFACTFS_FLOWER_AUTH")  # fmt: skip


def _read_private(path: Path) -> str:
    """Read a root-only file, refusing a symbolic link and tightening a mode that lets others in."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(path) from None
        raise StackError(f"cannot read {path}: {exc.strerror} (remove it to have a new one generated)") from None
    with os.fdopen(fd) as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise StackError(f"{path} is not a regular file of this user: remove it to have a new one generated")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return fh.read()


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --- services ---


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _log_has(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and text in path.read_text(errors="replace")


def _service_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in WITHHELD_ENV}
    env.update(extra)
    return env


def _redis_server() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise StackError("redis-server is not installed (apt-get install redis-server), or set ARTIFACTFS_REDIS_URL")
    return found


@dataclass(frozen=True)
class Ports:
    flower: int = DEFAULT_FLOWER_PORT
    metrics: int = DEFAULT_METRICS_PORT


def services(settings: Settings, *, ports: Ports, concurrency: int, flower_auth: FlowerAuth) -> list[Service]:
    logs = settings.log_root
    cli = [sys.executable, "-m", "artifactfs.cli", "--log-level", "INFO"]
    found: list[Service] = []
    if not settings.redis_url:
        found.append(Service(
            "redis",
            [_redis_server(), "--port", "0", "--unixsocket", str(settings.embedded_redis_socket),
             "--unixsocketperm", "700", "--dir", str(settings.run_root), "--appendonly", "yes", "--save", "",
             "--daemonize", "no"],
            lambda: ping(settings.wakeup_url),
            f"redis on {settings.wakeup_url}",
            _service_env(),
            0o077,  # its socket, append-only files and dumps are root's alone, whatever the settings
        ))  # fmt: skip
    found.append(Service(
        "worker", [*cli, "worker", "--concurrency", str(concurrency)],
        _log_has(logs / "worker.log", " ready."), f"worker for queue {settings.queue}", _service_env(), settings.umask,
    ))  # fmt: skip
    found.append(Service(
        "mountd", [*cli, "daemon"], _log_has(logs / "mountd.log", "mountd started"),
        f"mountd under {settings.mount_root}", _service_env(), settings.umask,
    ))  # fmt: skip
    banner = _log_has(logs / "flower.log", f"Visit me at http://127.0.0.1:{ports.flower}")
    found.append(Service(
        "flower",
        [sys.executable, "-m", "celery", "-A", "workers.app", "flower", "--address=127.0.0.1", f"--port={ports.flower}"],
        lambda: banner() and _port_open(ports.flower), f"flower on http://127.0.0.1:{ports.flower}",
        _service_env(FLOWER_BASIC_AUTH=flower_auth.basic), settings.umask,
    ))  # fmt: skip
    metrics = _log_has(logs / "metrics.log", f"metrics on http://127.0.0.1:{ports.metrics}/metrics")
    found.append(Service(
        "metrics", [*cli, "serve-metrics", "--port", str(ports.metrics)],
        lambda: metrics() and _port_open(ports.metrics), f"metrics on http://127.0.0.1:{ports.metrics}/metrics",
        _service_env(**{METRICS_AUTH_ENV: flower_auth.basic}), settings.umask,
    ))  # fmt: skip
    return found


# --- knowing our processes again ---


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_root / f"{name}.pid"


def _is_service(pid: int, name: str) -> bool:
    args = cmdline(pid)
    return all(any(marker in arg for arg in args) for marker in SERVICE_MARKERS.get(name, ("\0",)))


def _verified(settings: Settings, name: str) -> ProcessId | None:
    """The process the pid file of service `name` records, if that very process still runs it."""
    ident = read_pid_file(_pid_file(settings, name))
    if ident is None or not _is_service(ident.pid, name):
        return None
    return ident


def running_pid(settings: Settings, name: str) -> int | None:
    """The pid of service `name` if it runs (a pid file alone proves nothing)."""
    ident = _verified(settings, name)
    return ident.pid if ident is not None else None


def _reap(pid: int) -> None:
    """Collect a child of ours that exited (up's own children, when it rolls back)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal(ident: ProcessId, sig: int, *, group: bool = False) -> None:
    """Signal `ident` only while it is that very process; `group` also reaches its children
    (a service leads its own process group)."""
    if not is_running(ident):
        return
    try:
        if group and os.getpgid(ident.pid) == ident.pid:
            os.killpg(ident.pid, sig)
        else:
            os.kill(ident.pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(idents: list[ProcessId], timeout: float) -> list[ProcessId]:
    """Wait until each of `idents` exits; those still running at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        for ident in idents:
            _reap(ident.pid)
        left = [ident for ident in idents if is_running(ident)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _stop(ident: ProcessId, timeout: float) -> bool:
    """SIGTERM, then SIGKILL to its group after `timeout`; True if SIGTERM sufficed."""
    return not _stop_all([ident], timeout)


def _stop_all(idents: list[ProcessId], timeout: float) -> list[ProcessId]:
    """SIGTERM to each at once, then SIGKILL to the groups of those still running after
    `timeout`; those that needed it."""
    for ident in idents:
        _signal(ident, signal.SIGTERM)
    stubborn = _wait_gone(idents, timeout)
    for ident in stubborn:
        _signal(ident, signal.SIGKILL, group=True)
    _wait_gone(stubborn, timeout)
    return stubborn


@contextmanager
def _stack_lock(settings: Settings) -> Iterator[None]:
    """One `up` or `down` at a time under this root (concurrent ones wait their turn)."""
    fd = os.open(settings.run_root / "stack.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; services never inherit it (close-on-exec)


# --- logs ---


def rotate_log(path: Path, generations: int = LOG_GENERATIONS) -> None:
    """<name>.log becomes <name>.log.1, .1 becomes .2, ...; the oldest generation is dropped."""
    for n in range(generations - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.1"))


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    tail = lines[-1].strip() if lines else ""
    return "".join(c if c.isprintable() else "?" for c in tail)


# --- up ---


def _start(settings: Settings, service: Service) -> Started:
    log_path = settings.log_root / f"{service.name}.log"
    rotate_log(log_path)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        popen = subprocess.Popen(
            service.argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT, start_new_session=True,
            env=service.env, cwd=settings.run_root, umask=service.umask,
        )  # fmt: skip
    finally:
        os.close(fd)
    try:
        ident = write_pid_file(_pid_file(settings, service.name), popen.pid)
    except ProcessLookupError:
        ident = ProcessId(popen.pid, -1)  # already gone: the readiness check reports it
    return Started(service, popen, ident)


def _wait_ready(settings: Settings, started: Started) -> None:
    service, log_path = started.service, settings.log_root / f"{started.service.name}.log"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not service.ready():
        if started.popen.poll() is not None:
            tail = _last_line(log_path)
            raise StackError(f"{service.name} exited at start (see {log_path}){': ' + tail if tail else ''}")
        if time.monotonic() > deadline:
            raise StackError(f"{service.name} was not ready after {START_TIMEOUT_SECONDS:g}s (see {log_path})")
        time.sleep(0.05)
    # A service may write a pid file of its own (mountd does, and removes it when it exits):
    # record ours again now that it is up.
    try:
        write_pid_file(_pid_file(settings, service.name), started.popen.pid)
    except ProcessLookupError:
        raise StackError(f"{service.name} exited at start (see {log_path})") from None


# Flower, started before the worker is ready, never lists it: it knows the workers that answered
# its first inspection.
AFTER_THE_WORKER = frozenset({"flower"})


def _ready_line(settings: Settings, started: Started) -> str:
    """Wait until `started` is ready; the line that says so."""
    _wait_ready(settings, started)
    return f"{started.service.name}: started (pid {started.popen.pid}), {started.service.describe}"


def _roll_back(settings: Settings, started: list[Started]) -> list[str]:
    """Stop what this `up` started, last first, and forget their pid files; the names of those
    that were still running."""
    stopped = []
    for entry in reversed(started):
        if entry.popen.poll() is None:
            _stop(entry.ident, STOP_TIMEOUT_SECONDS)
            entry.popen.poll()
            stopped.append(entry.service.name)
        _pid_file(settings, entry.service.name).unlink(missing_ok=True)
    return stopped


def _migrate(settings: Settings) -> str:
    """The registry at this version's schema before any service opens it (they refuse an older one)."""
    from .registry import migrate_registry

    applied = migrate_registry(settings.database_url, settings.host, settings.db_busy_timeout)
    return f"registry: migrated ({', '.join(applied)})" if applied else "registry: schema up to date"


def _check_port(settings: Settings, service: str, port: int, option: str) -> None:
    """A port taken by something else than our service, said before anything starts (a port taken
    later still fails the service's start)."""
    if _verified(settings, service) is None and _port_open(port):
        raise StackError(f"port {port} on 127.0.0.1 is taken (another {service}?): choose another with {option}")


def up(settings: Settings, *, ports: Ports = Ports(), concurrency: int = 2) -> Iterator[str]:
    """Start what is not running yet, yielding a line per service. On failure, stop what this
    call started (services that ran before it are left alone) and raise one StackError."""
    configured = configured_flower_auth(settings)  # checked before anything is created
    if not settings.redis_url:
        _redis_server()
    settings.ensure_dirs()
    with _stack_lock(settings):
        auth = configured or stored_flower_auth(settings)
        yield _migrate(settings)
        if ports.flower == ports.metrics:
            raise StackError(f"Flower and the metrics endpoint cannot share port {ports.flower}: choose another "
                             "with --metrics-port or ARTIFACTFS_METRICS_PORT")  # fmt: skip
        _check_port(settings, "flower", ports.flower, "--flower-port or ARTIFACTFS_FLOWER_PORT")
        _check_port(settings, "metrics", ports.metrics, "--metrics-port or ARTIFACTFS_METRICS_PORT")
        started: list[Started] = []
        starting: list[Started] = []
        try:
            for service in services(settings, ports=ports, concurrency=concurrency, flower_auth=auth):
                ident = _verified(settings, service.name)
                if ident is not None:
                    yield f"{service.name}: already running (pid {ident.pid})"
                    continue
                stale = _pid_file(settings, service.name)
                if stale.exists():
                    stale.unlink()
                    yield f"{service.name}: removed the stale pid file {stale} (it named no running {service.name})"
                if service.name in AFTER_THE_WORKER:
                    while starting:  # what started before it, the worker among them, ready first
                        yield _ready_line(settings, starting.pop(0))
                entry = _start(settings, service)
                started.append(entry)
                if service.name == "redis":  # the others connect to it as they start
                    yield _ready_line(settings, entry)
                else:
                    starting.append(entry)
            # Started together, the worker and mountd take the longer one's time (the worker's), not
            # the sum of both; and Flower and the metrics likewise after them.
            for entry in starting:
                yield _ready_line(settings, entry)
        except GeneratorExit:
            raise  # the caller stopped reading: what started is up, not failed
        except BaseException as exc:
            stopped = _roll_back(settings, started)
            if not isinstance(exc, ArtifactError) or not stopped:
                raise
            raise StackError(f"{exc}; stopped what this up had started ({', '.join(stopped)})") from None
        if configured is not None:
            yield f"flower, metrics: basic auth as user {auth.user!r} from ARTIFACTFS_FLOWER_AUTH"
        else:
            yield f"flower, metrics: basic auth as user {auth.user!r}, password in {settings.flower_auth_file}"


# --- down ---


def _stop_services(settings: Settings, names: list[str]) -> Iterator[str]:
    """Stop the services `names` at once (SIGTERM to each, SIGKILL to the groups of those still
    running after STOP_TIMEOUT_SECONDS); a line for each, in the order of `names`. At once, since
    none of them waits on another, and a Celery worker's warm shutdown alone takes seconds."""
    lines: dict[str, str] = {}
    stopping: dict[str, ProcessId] = {}
    for name in names:
        pid_file = _pid_file(settings, name)
        if not pid_file.exists():
            continue
        ident = _verified(settings, name)
        if ident is None:
            pid_file.unlink(missing_ok=True)
            lines[name] = f"{name}: removed the stale pid file {pid_file} (it named no running {name}); nothing signalled"
            continue
        stopping[name] = ident
    stubborn = _stop_all(list(stopping.values()), STOP_TIMEOUT_SECONDS)
    for name, ident in stopping.items():
        _pid_file(settings, name).unlink(missing_ok=True)
        lines[name] = (f"{name}: killed (pid {ident.pid}) after {STOP_TIMEOUT_SECONDS:g}s" if ident in stubborn
                       else f"{name}: stopped (pid {ident.pid})")  # fmt: skip
    yield from (lines[name] for name in names if name in lines)


def _unmount_registered(settings: Settings, *, keep: bool) -> Iterator[str]:
    """Unmount every registered repository's mount (mount processes outlive mountd), or with
    `keep` count those left serving."""
    from .mounts import check_mount_path, is_mounted, unmount
    from .registry import open_registry

    try:
        repos = open_registry(settings.database_url, host=settings.host).repos()
    except ArtifactError as exc:
        raise StackError(f"cannot read the registry to take the mounts down ({exc}); "
                         "fix it, or unmount with fusermount3 -u <mount path>") from None  # fmt: skip
    kept = 0
    for repo in repos:
        try:
            path = check_mount_path(settings, repo.name, repo.mount_path)
        except MountRefused as exc:
            yield f"{repo.name}: mount path left alone: {exc}"
            continue
        if not is_mounted(path):
            continue
        if keep:
            kept += 1
        elif unmount(path) or unmount(path, lazy=True):
            yield f"{repo.name}: unmounted {path}"
        else:
            yield f"{repo.name}: could not unmount {path} (see: fusermount3 -u {path})"
    if kept:
        yield f"{kept} mount(s) left serving (--keep-mounts)"


def _mount_processes(settings: Settings) -> tuple[dict[ProcessId, Path], list[str]]:
    """The running mount processes by their pid files, and a line for each stale pid file removed.
    Read before the mounts go down: an unmounted process exits and removes its own pid file."""
    running: dict[ProcessId, Path] = {}
    said: list[str] = []
    if settings.mount_run_root.is_dir():
        for pid_file in sorted(settings.mount_run_root.glob("*.pid")):
            ident = read_pid_file(pid_file)
            if ident is None:
                pid_file.unlink(missing_ok=True)
                said.append(f"mount: removed the stale pid file {pid_file}")
            else:
                running[ident] = pid_file
    return running, said


def _stop_mount_processes(running: dict[ProcessId, Path]) -> Iterator[str]:
    """Wait for the mount processes to exit (unmounted, they do), then SIGTERM, then SIGKILL."""
    left = _wait_gone(list(running), MOUNT_GRACE_SECONDS)
    for ident in left:
        _signal(ident, signal.SIGTERM)
    stubborn = _wait_gone(left, MOUNT_GRACE_SECONDS)
    for ident in stubborn:
        _signal(ident, signal.SIGKILL)
    _wait_gone(stubborn, MOUNT_GRACE_SECONDS)
    for ident, pid_file in running.items():
        how = "killed" if ident in stubborn else "stopped" if ident in left else "exited"
        if read_pid_file(pid_file) in (None, ident):
            pid_file.unlink(missing_ok=True)
        yield f"mount process {ident.pid} ({pid_file.stem}): {how}"


def down(settings: Settings, *, keep_mounts: bool = False) -> Iterator[str]:
    """Stop the services (last started first), then take the mounts down and wait for their
    processes, unless `keep_mounts`. A pid file that names no running service is removed and
    reported, never signalled."""
    if not settings.root.is_dir():
        yield f"nothing is running under {settings.root}"
        return
    settings.ensure_dirs()
    said = False
    with _stack_lock(settings):
        # The broker last: the worker acknowledges what it finishes, and mountd may still publish.
        clients = [name for name in reversed(SERVICE_NAMES) if name != "redis"]
        for line in itertools.chain(_stop_services(settings, clients), _stop_services(settings, ["redis"])):
            said = True
            yield line
        running, stale = _mount_processes(settings) if not keep_mounts else ({}, [])
        for line in itertools.chain(stale, _unmount_registered(settings, keep=keep_mounts), _stop_mount_processes(running)):
            said = True
            yield line
    if not said:
        yield f"nothing is running under {settings.root}"
