"""The embedded stack of one host: `artifactfs up` starts what is missing, `down` stops it.

redis-server (private, on a Unix socket under the state root, unless ARTIFACTFS_REDIS_URL names
one), a Celery worker for this host's queue, mountd, and Flower on 127.0.0.1. Each runs in its own
session with its log under <root>/log and its pid under <root>/run.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .model import ArtifactError
from .procs import read_pid_file, write_pid_file
from .wakeup import ping

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0


class StackError(ArtifactError):
    pass


@dataclass
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    describe: str
    env: dict[str, str] | None = None


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _log_has(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and text in path.read_text(errors="replace")


def services(settings: Settings, *, flower_port: int, concurrency: int) -> list[Service]:
    logs = settings.root / "log"
    cli = [sys.executable, "-m", "artifactfs.cli", "--log-level", "INFO"]
    found: list[Service] = []
    if not settings.redis_url:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise StackError("redis-server is not installed (apt-get install redis-server), or set ARTIFACTFS_REDIS_URL")
        found.append(Service(
            "redis",
            [redis_server, "--port", "0", "--unixsocket", str(settings.embedded_redis_socket), "--unixsocketperm", "700",
             "--dir", str(settings.run_root), "--appendonly", "yes", "--save", "", "--daemonize", "no"],
            lambda: ping(settings.wakeup_url),
            f"redis on {settings.wakeup_url}",
        ))  # fmt: skip
    found.append(Service(
        "worker", [*cli, "worker", "--concurrency", str(concurrency)],
        _log_has(logs / "worker.log", " ready."), f"worker for queue {settings.queue}",
    ))  # fmt: skip
    found.append(Service(
        "mountd", [*cli, "daemon"], _log_has(logs / "mountd.log", "mountd started"), f"mountd under {settings.mount_root}",
    ))  # fmt: skip
    found.append(Service(
        "flower",
        [sys.executable, "-m", "celery", "-A", "workers.app", "flower", "--address=127.0.0.1", f"--port={flower_port}"],
        lambda: _port_open(flower_port), f"flower on http://127.0.0.1:{flower_port}",
        # Its JSON API too (used by scripts and tests); it listens on loopback only.
        env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
    ))  # fmt: skip
    return found


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_root / f"{name}.pid"


def running_pid(settings: Settings, name: str) -> int | None:
    proc = read_pid_file(_pid_file(settings, name))
    return proc.pid if proc is not None else None


def up(settings: Settings, *, flower_port: int = 5555, concurrency: int = 2) -> Iterator[str]:
    settings.ensure_dirs()
    logs = settings.root / "log"
    logs.mkdir(exist_ok=True)
    for service in services(settings, flower_port=flower_port, concurrency=concurrency):
        pid = running_pid(settings, service.name)
        if pid is not None:
            yield f"{service.name}: already running (pid {pid})"
            continue
        if service.name == "flower" and _port_open(flower_port):
            raise StackError(
                f"port {flower_port} on 127.0.0.1 is taken (another Flower?): "
                "choose another with --flower-port or ARTIFACTFS_FLOWER_PORT"
            )
        log_path = logs / f"{service.name}.log"
        log_path.unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                service.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=service.env,
            )  # fmt: skip
        write_pid_file(_pid_file(settings, service.name), proc.pid)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not service.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
                raise StackError(f"{service.name} did not start (see {log_path}){': ' + tail[0] if tail else ''}")
            time.sleep(0.05)
        yield f"{service.name}: started (pid {proc.pid}), {service.describe}"


def down(settings: Settings) -> Iterator[str]:
    names = [p.stem for p in settings.run_root.glob("*.pid")] if settings.run_root.exists() else []
    order = ["flower", "mountd", "worker", "redis"]
    for name in sorted(names, key=lambda n: order.index(n) if n in order else -1):
        pid = running_pid(settings, name)
        pid_file = _pid_file(settings, name)
        if pid is None:
            pid_file.unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
            yield f"{name}: killed (pid {pid}) after {STOP_TIMEOUT_SECONDS:g}s"
        else:
            yield f"{name}: stopped (pid {pid})"
        pid_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
