"""mountd: the one process per host that knows every mount.

It follows the registry and keeps one mount process (mountd/mountproc.py) per registered
repository: a gated placeholder while the repository prepares, the commit once it is ready, EIO
once it failed. For every preparing attempt it publishes a prepare job to this host's queue, and it
fails attempts that outlive the prepare deadline.

The event log is the truth, Redis pub/sub only a wake-up: the daemon subscribes first, then reads
the log; it re-reads it on every (re)subscribe, on every wake-up, and on a timer (a cheap position
check), so a message lost while Redis or mountd was down delays nothing for long.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from artifactfs.config import Settings
from artifactfs.jobs import publish_prepare
from artifactfs.model import PrepareState, RepoState, utcnow
from artifactfs.mounts import is_mounted, is_stale, unmount
from artifactfs.prepare import fail_attempt
from artifactfs.registry import Registry
from artifactfs.wakeup import CHANNEL

log = logging.getLogger("artifactfs.mountd")

POLL_SECONDS = 0.5  # how often the log position is checked when nothing wakes the daemon
RESUBSCRIBE_SECONDS = (0.2, 0.5, 1, 2, 5)
# Warm mount processes kept ready: a burst of this many adds mounts without waiting for Python
# to start and import pyfuse3, trio and pygit2 (about half a second each on these machines).
SPARE_MOUNT_PROCESSES = 3
FULL_RECHECK_SECONDS = 5.0
MOUNT_WAIT_SECONDS = 10.0
RESTART_BACKOFF_SECONDS = (0.5, 1, 2, 5, 10)


@dataclass
class MountChild:
    name: str
    mount_path: Path
    proc: subprocess.Popen[bytes]
    gate: tuple[str, ...] | None = None  # the last order sent, to send each change once

    def send(self, order: dict[str, str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(order).encode() + b"\n")
        self.proc.stdin.flush()


class MountDaemon:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.children: dict[str, MountChild] = {}
        self.wake = threading.Event()
        self.stopping = False
        self._position = -1
        self._last_full = 0.0
        self._resubscribed = False
        self._restart_after: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._published: dict[str, int] = {}  # repo -> attempt_version whose job was sent
        self._spares: list[subprocess.Popen[bytes]] = []  # mount processes, imports done

    # --- lifecycle ---

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.settings.ensure_dirs()
        self._write_pidfile()
        self._spares = [self._spawn_spare() for _ in range(SPARE_MOUNT_PROCESSES)]
        # Ready means a placeholder can be mounted at once: wait until a spare has its imports done.
        select.select([self._spares[0].stdout], [], [], 30)
        threading.Thread(target=self._listen, name="wakeups", daemon=True).start()
        log.info("mountd started (root %s, queue %s)", self.settings.root, self.settings.queue)
        try:
            while not self.stopping:
                self.reconcile()
                self.wake.wait(POLL_SECONDS)
                self.wake.clear()
        finally:
            self.shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d: unmounting everything", signum)
        self.stopping = True
        self.wake.set()

    def _write_pidfile(self) -> None:
        (self.settings.run_root / "mountd.pid").write_text(f"{os.getpid()}\n")

    def shutdown(self) -> None:
        for spare in self._spares:
            spare.stdin.close()  # type: ignore[union-attr]
            spare.wait()
        # Signal every mount process first, then wait: they unmount in parallel.
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for name in list(self.children):
            self._stop_child(name)
        (self.settings.run_root / "mountd.pid").unlink(missing_ok=True)
        log.info("mountd stopped")

    # --- wake-ups ---

    def _listen(self) -> None:
        """Subscribe to wake-ups; after every (re)subscribe, read the log again."""
        import redis

        failures = 0
        while not self.stopping:
            try:
                client = redis.Redis.from_url(self.settings.wakeup_url, socket_connect_timeout=2)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                log.info("subscribed to wake-ups on %s", CHANNEL)
                failures = 0
                # Anything published while we were away is lost: read the log, and hand jobs
                # out again (a restarted Redis may have lost its queue; jobs are idempotent).
                self._resubscribed = True
                self.wake.set()
                while not self.stopping:
                    if pubsub.get_message(timeout=1.0) is not None:
                        self.wake.set()
            except Exception as exc:  # RedisError, or anything else: never stop listening
                delay = RESUBSCRIBE_SECONDS[min(failures, len(RESUBSCRIBE_SECONDS) - 1)]
                failures += 1
                if failures == 1:
                    log.warning("wake-ups unavailable (%s); following the log by polling", exc)
                time.sleep(delay)

    # --- following the registry ---

    def reconcile(self) -> None:
        now = time.monotonic()
        position = self.registry.position()
        dead = [c for c in self.children.values() if c.proc.poll() is not None]
        if self._resubscribed:
            self._resubscribed = False
            self._published.clear()
        elif position == self._position and not dead and now - self._last_full < FULL_RECHECK_SECONDS:
            return
        self._position, self._last_full = position, now
        repos = {repo.name: repo for repo in self.registry.repos()}
        for name in list(self.children):
            child = self.children[name]
            repo = repos.get(name)
            if repo is None or Path(repo.mount_path) != child.mount_path:
                self._stop_child(name)
            elif child.proc.poll() is not None:
                log.warning("%s: mount process exited with %s", name, child.proc.returncode)
                self._stop_child(name)
                self._backoff(name)
        for name, repo in repos.items():
            if name not in self.children and now >= self._restart_after.get(name, 0):
                self._start_child(repo)
            if name in self.children:
                self._update_gate(self.children[name], repo)
        for repo in repos.values():
            self._drive_preparation(repo)

    def _drive_preparation(self, repo: RepoState) -> None:
        """Publish the job of a preparing attempt once; fail an attempt past the deadline."""
        if repo.state is not PrepareState.PREPARING:
            self._published.pop(repo.name, None)
            return
        started = repo.attempt_started_at
        if started is not None and (utcnow() - started).total_seconds() > self.settings.prepare_deadline:
            error = f"preparation did not finish within {self.settings.prepare_deadline:g}s (see: artifactfs events --name {repo.name})"
            if fail_attempt(self.settings, self.registry, repo, error, dedupe_key=f"deadline:{repo.name}:{repo.attempt_version}"):
                log.error("%s: %s", repo.name, error)
            return
        if not repo.asynchronous or self._published.get(repo.name) == repo.attempt_version:
            return  # a blocking add prepares in its own process
        try:
            tid = publish_prepare(self.settings, repo)
        except Exception as exc:  # broker down: the next reconcile tries again
            log.warning("%s: could not publish the prepare job: %s", repo.name, exc)
            self._last_full = 0.0
            return
        self._published[repo.name] = repo.attempt_version
        log.info("%s: published prepare job %s", repo.name, tid)

    def _update_gate(self, child: MountChild, repo: RepoState) -> None:
        state = repo.state
        if state is PrepareState.READY and repo.head:
            order = {"op": "ready", "git_dir": str(self.settings.repo_git_dir(repo)), "head": repo.head}
        elif state is PrepareState.FAILED:
            order = {"op": "failed", "error": repo.prepare_error or ""}
        else:
            order = {"op": "reset"}
        key = tuple(order.values())
        if key != child.gate:
            try:
                child.send(order)
                child.gate = key
            except (BrokenPipeError, OSError) as exc:
                log.warning("%s: could not reach mount process: %s", child.name, exc)

    # --- mount processes ---

    def _start_child(self, repo: RepoState) -> None:
        mount_path = Path(repo.mount_path)
        if is_mounted(mount_path):
            # Left over from a previous mountd (often stale: ENOTCONN). Only this daemon mounts here.
            log.info("%s: taking down an old mount at %s (stale: %s)", repo.name, mount_path, is_stale(mount_path))
            if not unmount(mount_path):
                unmount(mount_path, lazy=True)
        mount_path.mkdir(parents=True, exist_ok=True)
        self.settings.repo_state_dir(repo.name).mkdir(parents=True, exist_ok=True)
        proc = self._spares.pop(0) if self._spares else self._spawn_spare()
        order = {"op": "mount", "name": repo.name, "mount_path": str(mount_path),
                 "stats_file": str(self.settings.stats_file(repo.name))}  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdout.readline()  # "ready": its imports are done (already read for a warm spare)
        try:
            proc.stdin.write(json.dumps(order).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # a dead spare: reported below like any failed mount
        self._spares.append(self._spawn_spare())  # started now, warm by the time it is needed
        ready_line = proc.stdout.readline()  # the child prints "mounted" once pyfuse3.init returned
        if ready_line.strip() != b"mounted":
            proc.wait()
            log.error("%s: could not mount at %s (exit %s)", repo.name, mount_path, proc.returncode)
            self._backoff(repo.name)
            return
        log.info("%s: mounted at %s (pid %d)", repo.name, mount_path, proc.pid)
        self.children[repo.name] = MountChild(repo.name, mount_path, proc)

    @staticmethod
    def _spawn_spare() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "mountd.mountproc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )  # fmt: skip

    def _backoff(self, name: str) -> None:
        failures = self._failures[name] = self._failures.get(name, 0) + 1
        delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS)) - 1]
        self._restart_after[name] = time.monotonic() + delay

    def _stop_child(self, name: str) -> None:
        child = self.children.pop(name)
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)  # again is harmless: it unmounts once
            try:
                child.proc.wait(timeout=MOUNT_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        if is_mounted(child.mount_path) and not unmount(child.mount_path):
            unmount(child.mount_path, lazy=True)
        log.info("%s: unmounted %s", name, child.mount_path)


def run_daemon(settings: Settings, registry: Registry) -> None:
    MountDaemon(settings, registry).run()
