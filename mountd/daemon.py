"""mountd: the one process per host that knows every mount.

It follows the registry and keeps one mount process (mountd/mountproc.py) per registered
repository: a gated placeholder while the repository prepares, the commit once it is ready, EIO
once it failed. For every preparing attempt it publishes a prepare job to this host's queue, and it
fails attempts that outlive the prepare deadline.

mountd supervises, it does not own: mount processes run in sessions of their own and keep serving
when mountd exits (SIGTERM, as for an upgrade) or dies (SIGKILL); the next mountd finds each one by
its pid file and control socket under <root>/run/mounts and adopts it. A mount process that does
not answer its start-up handshake in time is replaced. An error while reconciling one repository
is logged and retried with backoff; it never stops mountd and never touches another repository.

The event log is the truth, Redis pub/sub only a wake-up: the daemon subscribes first, then reads
the log; it re-reads it on every (re)subscribe, on every wake-up, and on a timer (a cheap position
check), so a message lost while Redis or mountd was down delays nothing for long. It also follows
Celery's own events: when this host's worker comes (back) online, or a prepare job ends without
having recorded an outcome, the job is published again (jobs are idempotent), instead of waiting
for the broker's visibility timeout.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifactfs.config import Settings
from artifactfs.jobs import history_behind, publish_prepare, task_id
from artifactfs.locks import repo_lock
from artifactfs.logs import about
from artifactfs.metrics import ErrorKind, count_error
from artifactfs.model import ArtifactError, EventType, MountRefused, PrepareState, RepoState, utcnow
from artifactfs.mounts import check_mount_path, is_mounted, is_stale, unmount, under
from artifactfs.attempts import fail_attempt
from artifactfs.refresh import publish_refresh, slot
from artifactfs.procs import ProcessId, cmdline, identify, is_running, read_pid_file, write_pid_file
from artifactfs.registry import Registry
from artifactfs.remotes import validate_name
from artifactfs.repos import discard_leftovers, forget_earlier_registration, nothing_to_forget
from artifactfs.wakeup import CHANNEL
from mountd.control import ControlClient, MountUnresponsive, encode

log = logging.getLogger("artifactfs.mountd")

POLL_SECONDS = 0.5  # how often the log position is checked when nothing wakes the daemon
RESUBSCRIBE_SECONDS = (0.2, 0.5, 1, 2, 5)
# Warm mount processes kept ready: a burst of this many adds mounts without waiting for Python
# to start and import pyfuse3, trio and pygit2 (about half a second each on these machines).
SPARE_MOUNT_PROCESSES = 3
FULL_RECHECK_SECONDS = 5.0
SPARE_START_SECONDS = 60.0  # a spare's imports; slow on a loaded machine, but bounded
STOP_WAIT_SECONDS = 10.0
RESTART_BACKOFF_SECONDS = (0.5, 1, 2, 5, 10, 30)
STABLE_SECONDS = 30.0  # a mount process alive this long has its restart backoff forgiven
MAX_REPUBLISH = 5  # a job that keeps ending without an outcome fails its attempt after this
FORGET_WAIT_SECONDS = 5.0  # a job discarding an earlier registration's git dir; then retried
MOUNT_PROCESS_MODULE = "mountd.mountproc"
SPARE_ARGV = [sys.executable, "-m", MOUNT_PROCESS_MODULE]


def owner_ids(repo: RepoState) -> list[int] | None:
    """Whose the mount's files are: [uid, gid] of add-repo --owner, or None (root's)."""
    if repo.owner_uid is None:
        return None
    return [repo.owner_uid, repo.owner_gid if repo.owner_gid is not None else repo.owner_uid]


class RegistrationUnsettled(ArtifactError):
    """A job still discards what an earlier registration of the name left here: mount later."""


@dataclass
class MountChild:
    """A running mount process: started by this mountd (proc is set) or adopted from an earlier one."""

    name: str
    mount_path: Path
    ident: ProcessId
    client: ControlClient
    proc: subprocess.Popen[bytes] | None = None
    gate: tuple[Any, ...] | None = None  # the last order it carried out, to send each change once
    started: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False  # reaped: our own child exited
        return is_running(self.ident)


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
        self._refused: dict[str, str] = {}  # name -> why it is not mounted (logged once)
        self._published: dict[str, int] = {}  # repo -> attempt_version whose job was sent
        self._republished: dict[tuple[str, int], int] = {}
        self._job_news = threading.Lock()
        self._worker_online = False
        self._ended_jobs: set[str] = set()
        self._spares: list[subprocess.Popen[bytes]] = []  # mount processes, imports done
        self._orphans_checked = False
        # Refreshes (add-repo --refresh): repo -> its interval, and the interval slot whose job was sent.
        self._refresh_every: dict[str, float] = {}
        self._refresh_slot: dict[str, int] = {}

    # --- lifecycle ---

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.settings.ensure_dirs()
        write_pid_file(self.settings.run_root / "mountd.pid", os.getpid())
        self._spares = [self._spawn_spare() for _ in range(SPARE_MOUNT_PROCESSES)]
        # Ready means a placeholder can be mounted at once: wait until a spare has its imports done.
        select.select([self._spares[0].stdout], [], [], SPARE_START_SECONDS)
        threading.Thread(target=self._listen, name="wakeups", daemon=True).start()
        threading.Thread(target=self._follow_jobs, name="celery-events", daemon=True).start()
        log.info("mountd started (root %s, queue %s)", self.settings.root, self.settings.queue)
        failures = 0
        try:
            while not self.stopping:
                try:
                    self.reconcile()
                    failures = 0
                except Exception as exc:  # the registry locked or unreachable, a bug: try again
                    count_error(ErrorKind.RECONCILE)
                    delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS) - 1)]
                    failures += 1
                    log.warning("reconcile failed (%s: %s); again in %gs", type(exc).__name__, exc, delay)
                    self._last_full = 0.0
                    self.wake.wait(delay)
                self.wake.wait(POLL_SECONDS)
                self.wake.clear()
        finally:
            self.shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d: stopping; the mounts keep serving", signum)
        self.stopping = True
        self.wake.set()

    def shutdown(self) -> None:
        """Stop supervising. Mount processes keep serving; the next mountd adopts them."""
        for spare in self._spares:
            if spare.stdin is not None:
                spare.stdin.close()  # a spare that gets no order exits
        for spare in self._spares:
            try:
                spare.wait(STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                spare.kill()
        for child in self.children.values():
            child.client.close()
        pid_file = self.settings.run_root / "mountd.pid"
        if read_pid_file(pid_file) in (None, identify(os.getpid())):
            pid_file.unlink(missing_ok=True)
        log.info("mountd stopped; %d mounts keep serving", len(self.children))

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

    def _follow_jobs(self) -> None:
        """Follow Celery's events: this host's worker coming online, prepare jobs ending."""
        from workers.app import app

        def worker_online(event: dict[str, Any]) -> None:
            if event.get("hostname") == self.settings.worker_name:
                log.info("worker %s is online: publishing the jobs of preparing repositories again", event["hostname"])
                with self._job_news:
                    self._worker_online = True
                self.wake.set()

        def job_ended(event: dict[str, Any]) -> None:
            uuid = str(event.get("uuid", ""))
            if uuid.startswith("prepare:"):
                with self._job_news:
                    self._ended_jobs.add(uuid)
                self.wake.set()

        handlers = {"worker-online": worker_online}
        handlers.update(dict.fromkeys(("task-succeeded", "task-failed", "task-revoked", "task-rejected"), job_ended))
        failures = 0
        while not self.stopping:
            try:
                with app.connection_for_read() as conn:
                    receiver = app.events.Receiver(conn, handlers=handlers)
                    failures = 0
                    receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:  # broker down: the log and the timer still drive everything
                delay = RESUBSCRIBE_SECONDS[min(failures, len(RESUBSCRIBE_SECONDS) - 1)]
                failures += 1
                if failures == 1:
                    log.warning("celery events unavailable (%s); retrying", exc)
                time.sleep(delay)

    # --- following the registry ---

    def reconcile(self) -> None:
        now = time.monotonic()
        with self._job_news:
            worker_online, self._worker_online = self._worker_online, False
            ended, self._ended_jobs = self._ended_jobs, set()
        position = self.registry.position()
        dead = [c for c in self.children.values() if not c.alive()]
        if self._resubscribed or worker_online:
            self._resubscribed = False
            self._published.clear()
        elif (
            position == self._position
            and not dead
            and not ended
            and not self._restart_due(now)
            and not self._refresh_due()
            and now - self._last_full < FULL_RECHECK_SECONDS
        ):
            return
        self._position, self._last_full = position, now
        repos = {repo.name: repo for repo in self.registry.repos()}
        for name in set(self._restart_after) - set(repos):
            del self._restart_after[name]  # removed: nothing to restart
        if not self._orphans_checked:
            self._retire_orphans(repos)
            self._orphans_checked = True
        for name in list(self.children):
            self._guarded(name, self._check_child, name, repos.get(name), now)
        for name, repo in repos.items():
            # The job first: the worker clones while the placeholder is being mounted, instead
            # of after it (starting a mount process is most of what a new registration costs here).
            self._guarded(name, self._drive_preparation, repo, ended)
            if now >= self._restart_after.get(name, 0):
                self._guarded(name, self._keep_mounted, repo, repos)
            self._guarded(name, self._drive_refresh, repo)
        for name in set(self._refresh_every) - set(repos):
            del self._refresh_every[name]
            self._refresh_slot.pop(name, None)

    def _refresh_due(self) -> bool:
        """A repository with --refresh whose next interval has begun."""
        now = time.time()
        return any(int(now // every) != self._refresh_slot.get(name) for name, every in self._refresh_every.items())

    def _drive_refresh(self, repo: RepoState) -> None:
        """Publish a ready repository's refresh job once per interval (add-repo --refresh): in
        each interval after the one of its last refresh (or of its preparation), so that a
        restarted mountd catches up at once and a new registration waits one interval."""
        current = slot(repo, time.time()) if repo.state is PrepareState.READY else None
        if current is None:
            self._refresh_every.pop(repo.name, None)
            self._refresh_slot.pop(repo.name, None)
            return
        assert repo.refresh_seconds is not None
        self._refresh_every[repo.name] = repo.refresh_seconds
        if self._refresh_slot.get(repo.name) == current:
            return
        last = repo.refreshed_at or repo.attempt_started_at
        if last is not None and (slot(repo, last.timestamp()) or 0) >= current:
            self._refresh_slot[repo.name] = current  # refreshed (or prepared) in this interval already
            return
        try:
            tid = publish_refresh(self.settings, repo, current)
        except Exception as exc:  # broker down: the next reconcile tries again
            count_error(ErrorKind.PUBLISH)
            log.warning("%s: could not publish the refresh job: %s", repo.name, exc)
            return
        self._refresh_slot[repo.name] = current
        log.info("%s: published refresh job %s", repo.name, tid)

    def _restart_due(self, now: float) -> bool:
        """A repository without a mount process whose backoff has run out: remount it now, not at
        the next full check (a user's tree is gone until then)."""
        return any(name not in self.children and now >= after for name, after in self._restart_after.items())

    def _guarded(self, name: str, step: Any, *args: Any) -> None:
        """Run one repository's step; an error costs that repository a retry with backoff."""
        with about(repo=name):  # the records of the step, and of its failure
            try:
                step(*args)
            except MountRefused as exc:
                if self._refused.get(name) != str(exc):
                    log.error("%s: not mounted: %s", name, exc)
                    self._refused[name] = str(exc)
                self._backoff(name, RESTART_BACKOFF_SECONDS[-1])
            except Exception as exc:
                count_error(ErrorKind.RECONCILE)
                delay = self._backoff(name)
                log.warning("%s: %s: %s (again in %gs)", name, step.__name__.strip("_"), exc, delay)
                self._last_full = 0.0

    def _check_child(self, name: str, repo: RepoState | None, now: float) -> None:
        child = self.children[name]
        if repo is None or self._mount_path(repo) != child.mount_path:
            self._retire(name)
            if repo is None:
                self._discard_removed(name)
        elif not child.alive():
            code = child.proc.returncode if child.proc is not None else "unknown"
            log.warning("%s: mount process %d exited (%s)", name, child.ident.pid, code)
            count_error(ErrorKind.MOUNT_PROCESS)
            self._discard(name)
            self._backoff(name)
        elif now - child.started > STABLE_SECONDS:
            self._failures.pop(name, None)

    def _keep_mounted(self, repo: RepoState, repos: dict[str, RepoState]) -> None:
        if repo.name not in self.children:
            self._start_child(repo, repos)
        self._refused.pop(repo.name, None)
        self._update_gate(self.children[repo.name], repo)

    def _drive_preparation(self, repo: RepoState, ended: set[str]) -> None:
        """Publish the job of a preparing attempt once (again if it ended without an outcome, or
        this host's worker came back); fail an attempt past the deadline."""
        if history_behind(repo) and repo.asynchronous:
            self._publish_again_if_ended(repo, ended)  # the job fetches the history after ready
            return
        if repo.state is not PrepareState.PREPARING:
            self._published.pop(repo.name, None)
            return
        started = repo.attempt_started_at
        if started is not None and (utcnow() - started).total_seconds() > self.settings.prepare_deadline:
            error = f"preparation did not finish within {self.settings.prepare_deadline:g}s (see: artifactfs events --name {repo.name})"
            self._fail(repo, error, f"deadline:{repo.host}:{repo.name}:{repo.attempt_version}")
            return
        if not repo.asynchronous:
            return  # a blocking add or prepare runs in its own process
        self._publish_again_if_ended(repo, ended)

    def _publish_again_if_ended(self, repo: RepoState, ended: set[str]) -> None:
        """Publish the attempt's job unless published already; again if it ended without an outcome
        (for one whose history is behind: without the history's), a bounded number of times."""
        tid = task_id(repo.host, repo.name, repo.attempt_version)
        if tid in ended and self._published.get(repo.name) == repo.attempt_version:
            # The job ended, yet the attempt is still preparing: it recorded no outcome.
            key = (repo.name, repo.attempt_version)
            count = self._republished[key] = self._republished.get(key, 0) + 1
            if count > MAX_REPUBLISH:
                error = f"the prepare job ended {count} times without recording an outcome (see the worker's log)"
                if repo.state is PrepareState.PREPARING:
                    self._fail(repo, error, f"republish:{repo.host}:{repo.name}:{repo.attempt_version}")
                elif count == MAX_REPUBLISH + 1:  # ready: git in the mount fetches the history itself
                    log.error("%s: %s: its history is left to git's own fetches (retry: artifactfs prepare)", repo.name, error)
                return
            log.warning("%s: job %s ended without an outcome; publishing it again", repo.name, tid)
            del self._published[repo.name]
        if self._published.get(repo.name) == repo.attempt_version:
            return
        try:
            publish_prepare(self.settings, repo)
        except Exception as exc:  # broker down: the next reconcile tries again
            count_error(ErrorKind.PUBLISH)
            log.warning("%s: could not publish the prepare job: %s", repo.name, exc)
            self._last_full = 0.0
            return
        self._published[repo.name] = repo.attempt_version
        log.info("%s: published prepare job %s", repo.name, tid)

    def _fail(self, repo: RepoState, error: str, dedupe_key: str) -> None:
        if fail_attempt(self.settings, self.registry, repo, error, dedupe_key=dedupe_key):
            log.error("%s: %s", repo.name, error)

    def _update_gate(self, child: MountChild, repo: RepoState) -> None:
        state = repo.state
        order: dict[str, str]
        if state is PrepareState.READY and repo.head:
            order = {"op": "ready", "git_dir": str(self.settings.repo_git_dir(repo)), "head": repo.head}
        elif state is PrepareState.FAILED:
            order = {"op": "failed", "error": repo.prepare_error or ""}
        else:
            order = {"op": "reset"}
        key = tuple(order.values())
        if key != child.gate:
            child.client.request(order)  # an error is retried by the next reconcile
            child.gate = key

    # --- mount processes ---

    def _mount_path(self, repo: RepoState) -> Path:
        """The checked mount path of `repo`: under an allowed mount root, never inside another
        repository's mount (mountd would wait on the gate of a placeholder it serves itself)."""
        return check_mount_path(self.settings, repo.name, repo.mount_path)

    def _start_child(self, repo: RepoState, repos: dict[str, RepoState]) -> None:
        mount_path = self._mount_path(repo)
        for other in repos.values():
            if other.name != repo.name and under(mount_path, Path(other.mount_path)) and mount_path != Path(other.mount_path):
                raise MountRefused(f"mount path {mount_path} lies inside {other.name}'s mount {other.mount_path}")
        if self._adopt(repo.name, mount_path):
            return
        if is_mounted(mount_path):
            # Left over, and nobody we can talk to serves it (often stale: ENOTCONN).
            log.info("%s: taking down an old mount at %s (stale: %s)", repo.name, mount_path, is_stale(mount_path))
            if not unmount(mount_path):
                unmount(mount_path, lazy=True)
        self._forget_earlier_registration(repo)
        mount_path.mkdir(parents=True, exist_ok=True)
        self.settings.repo_state_dir(repo.name).mkdir(parents=True, exist_ok=True)
        proc = self._spares.pop(0) if self._spares else self._spawn_spare()
        self._spares.append(self._spawn_spare())  # started now, warm by the time it is needed
        try:
            self._mount_with(proc, repo.name, mount_path, owner_ids(repo))
        except BaseException:
            proc.kill()
            proc.wait()
            raise

    def _forget_earlier_registration(self, repo: RepoState) -> None:
        """Discard what an earlier registration of the name left here, before mounting. A prepare
        job that holds the repository's lock does so first (jobs.py): the job is published before
        the mount starts, so it may be removing that state right now. Wait for its mark, which it
        writes once it is done, not for its lock, which it holds for the whole clone."""
        with repo_lock(self.settings.lock_file(repo.name), blocking=False) as locked:
            if locked:
                if forget_earlier_registration(self.settings, repo):
                    log.info("%s: discarded what an earlier registration of the name left on this host", repo.name)
                return
        deadline = time.monotonic() + FORGET_WAIT_SECONDS
        while not nothing_to_forget(self.settings, repo):
            if time.monotonic() > deadline:
                raise RegistrationUnsettled(f"the job holding {repo.name}'s lock has not settled its state within {FORGET_WAIT_SECONDS:g}s")
            time.sleep(0.02)

    def _mount_with(self, proc: subprocess.Popen[bytes], name: str, mount_path: Path, owner: list[int] | None) -> None:
        """Hand the mount order to a spare and wait, bounded, for it to report the mount."""
        assert proc.stdin is not None and proc.stdout is not None
        if _read_line(proc, SPARE_START_SECONDS) != b"ready":  # already read for a warm spare
            raise MountUnresponsive(f"a mount process did not start within {SPARE_START_SECONDS:g}s")
        proc.stdin.write(encode({"op": "mount", "name": name, "mount_path": str(mount_path), "owner": owner}))
        proc.stdin.flush()
        timeout = self.settings.mount_handshake_timeout
        if _read_line(proc, timeout) != b"mounted":
            raise MountUnresponsive(f"could not mount at {mount_path} (no answer within {timeout:g}s; see the log above)")
        proc.stdin.close()
        proc.stdout.close()
        ident = identify(proc.pid)
        if ident is None:
            raise MountUnresponsive(f"the mount process for {mount_path} exited at once")
        client = ControlClient(self.settings.mount_socket(name), timeout=timeout, expected_pid=proc.pid)
        log.info("%s: mounted at %s (pid %d)", name, mount_path, proc.pid)
        self.children[name] = MountChild(name, mount_path, ident, client, proc=proc)

    def _adopt(self, name: str, mount_path: Path) -> bool:
        """Take over a mount process a previous mountd started, if one serves `mount_path`."""
        ident = self._mount_process(name)
        if ident is None:
            return False
        client = ControlClient(self.settings.mount_socket(name), timeout=self.settings.mount_handshake_timeout,
                               expected_pid=ident.pid)  # fmt: skip
        try:
            hello = client.request({"op": "hello"})
        except MountUnresponsive as exc:
            log.warning("%s: mount process %d does not answer (%s): replacing it", name, ident.pid, exc)
            client.close()
            self._kill(ident)
            return False
        if hello.get("name") != name or Path(str(hello.get("mount_path"))) != mount_path:
            log.warning("%s: mount process %d serves %s, not %s: stopping it", name, ident.pid, hello.get("mount_path"), mount_path)
            self._stop(name, ident, client, Path(str(hello.get("mount_path"))))
            return False
        log.info("%s: adopted mount process %d at %s (gate %s)", name, ident.pid, mount_path, hello.get("gate"))
        self.children[name] = MountChild(name, mount_path, ident, client)
        return True

    def _mount_process(self, name: str) -> ProcessId | None:
        """The live mount process that the pid file of `name` names, if it is one of ours."""
        ident = read_pid_file(self.settings.mount_pid_file(name))
        if ident is None or MOUNT_PROCESS_MODULE not in cmdline(ident.pid):
            return None
        return ident

    def _retire_orphans(self, repos: dict[str, RepoState]) -> None:
        """Mount processes of repositories removed while no mountd was running."""
        for pid_file in sorted(self.settings.mount_run_root.glob("*.pid")):
            name = pid_file.stem
            if name in repos:
                continue
            try:
                validate_name(name)
            except ArtifactError:
                continue
            ident = self._mount_process(name)
            if ident is None:
                pid_file.unlink(missing_ok=True)
                continue
            client = ControlClient(self.settings.mount_socket(name), timeout=self.settings.mount_handshake_timeout,
                                   expected_pid=ident.pid)  # fmt: skip
            log.info("%s: no longer registered: stopping its mount process %d", name, ident.pid)
            self._stop(name, ident, client, None)
            self._discard_removed(name)

    def _discard_removed(self, name: str) -> None:
        """Delete what a repository removed from this host left here (a removal made on another
        host deleted nothing here). Only when this host's log says it was removed: a mountd
        pointed at the wrong registry, which knows nothing of the name, deletes nothing."""
        with repo_lock(self.settings.lock_file(name), blocking=False) as locked:
            if not locked or self.registry.get(name) is not None:
                return  # registered again meanwhile, or its lock is busy: whoever holds it decides
            events = self.registry.events(name)
            if events and events[-1].kind in (EventType.REMOVED, EventType.ADD_ABANDONED):
                discard_leftovers(self.settings, name)
                log.info("%s: removed: deleted its state on this host", name)

    def _retire(self, name: str) -> None:
        child = self.children.pop(name)
        self._stop(name, child.ident, child.client, child.mount_path, child.proc)

    def _discard(self, name: str) -> None:
        """Forget a mount process that died; take down the stale mount it left."""
        child = self.children.pop(name)
        child.client.close()
        if child.proc is not None:
            child.proc.wait()
        if is_mounted(child.mount_path) and not unmount(child.mount_path):
            unmount(child.mount_path, lazy=True)

    def _stop(self, name: str, ident: ProcessId, client: ControlClient, mount_path: Path | None,
              proc: subprocess.Popen[bytes] | None = None) -> None:  # fmt: skip
        """Unmount through the process's own control socket; signals only as a fallback."""
        try:
            client.request({"op": "unmount"})
        except MountUnresponsive as exc:
            log.warning("%s: unmount order not taken (%s): signalling %d", name, exc, ident.pid)
            if is_running(ident):
                os.kill(ident.pid, signal.SIGTERM)
        finally:
            client.close()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while is_running(ident) and time.monotonic() < deadline:
            if proc is not None:
                proc.poll()
            time.sleep(0.02)
        if is_running(ident):
            self._kill(ident)
        if proc is not None:
            proc.wait()
        if mount_path is not None:
            try:
                path = check_mount_path(self.settings, name, mount_path)
            except MountRefused:
                return
            if is_mounted(path) and not unmount(path):
                unmount(path, lazy=True)
            log.info("%s: unmounted %s", name, path)

    @staticmethod
    def _kill(ident: ProcessId) -> None:
        if is_running(ident):
            os.kill(ident.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while is_running(ident) and time.monotonic() < deadline:
            time.sleep(0.02)

    @staticmethod
    def _spawn_spare() -> subprocess.Popen[bytes]:
        # A session of its own: a signal to mountd's process group (a `down` that escalates to
        # SIGKILL, Ctrl-C in mountd's terminal) must not reach the mounts.
        return subprocess.Popen(SPARE_ARGV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def _backoff(self, name: str, delay: float | None = None) -> float:
        failures = self._failures[name] = self._failures.get(name, 0) + 1
        if delay is None:
            delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS)) - 1]
        self._restart_after[name] = time.monotonic() + delay
        return delay


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
    """One line from a spare's stdout within `timeout` seconds; None if it hung or exited."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 1)  # byte by byte: nothing after the line may be consumed
        if not chunk:
            return None
        line += chunk
    return line.strip()


def run_daemon(settings: Settings, registry: Registry) -> None:
    MountDaemon(settings, registry).run()
