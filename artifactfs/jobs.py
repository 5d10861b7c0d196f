"""Prepare jobs, apart from Celery: what a job does (run_prepare_job), how it fails, and how mountd
hands one to this host's queue (publish_prepare). The Celery task in workers/tasks.py is a thin shell.

A job works under the repository's lock and ends in one PrepareOutcome (in a JobResult, which
the task turns into what Flower shows: READY and SKIPPED as SUCCESS, READY's result naming the head
it published; FAILED as FAILURE with the redacted error; RETRY as RETRY):
- READY: prepared, and READY published;
- SKIPPED: nothing for this job to do, and nothing appended: the attempt was superseded, removed or
  already done, or it is not a worker's to run (a repository with inline credentials, or one that
  the command which began the attempt prepares in its own process);
- RETRY: a transient git failure (a connection reset): the task runs the job again after a while;
- FAILED: recorded with a one-line error (git's, redacted; the time limit exceeded; an internal
  error), so that nothing stays `preparing` until the deadline.
A registry that answers RegistryBusy is tried again with backoff for REGISTRY_PATIENCE busy timeouts;
past that, RegistryBusy leaves run_prepare_job and the task hands the whole job back to the queue.
Every append of a job carries a dedupe key, so running a job again (or twice at once) is harmless.
"""
from __future__ import annotations

import ctypes
import enum
import logging
import os
import shutil
import signal
import time
from contextlib import suppress
from dataclasses import dataclass

from .config import Settings
from .locks import repo_lock
from .logs import about
from .metrics import ErrorKind, count_error, observe_prepare
from .model import ArtifactError, GitError, HistoryState, Phase, PrepareState, PrepareTimeout, RegistryBusy, RepoState, StaleAttempt
from .attempts import Patience, fail_attempt
from .prepare import Preparation
from .procs import all_pids, parent_pid
from .progress import Publisher
from .registry import Registry, open_registry
from .repos import forget_earlier_registration
from .remotes import redact, validate_name

log = logging.getLogger("artifactfs.jobs")

PREPARE_TASK = "artifactfs.prepare"
FAILPOINT_VARIABLE = "ARTIFACTFS_FAILPOINT"
# How many busy timeouts (ARTIFACTFS_DB_BUSY_TIMEOUT, 30 s by default: three minutes in all) a job
# keeps trying a busy registry before the task hands it back to the queue.
REGISTRY_PATIENCE = 6

PR_SET_CHILD_SUBREAPER = 36
_LIBC = ctypes.CDLL(None, use_errno=True)


class PrepareOutcome(str, enum.Enum):
    READY = "ready"
    FAILED = "failed"
    RETRY = "retry"  # transient failure: the caller backs off and runs the job again
    SKIPPED = "skipped"  # nothing to do: removed, already prepared, superseded, or not a worker's


@dataclass(frozen=True)
class JobResult:
    """How a job ended: what Flower shows of it, and what the task does next."""

    outcome: PrepareOutcome
    head: str | None = None  # READY: the commit it published
    error: str | None = None  # FAILED: the error it recorded, redacted

    def shown(self) -> dict[str, str]:
        """The task's result, as Flower lists it."""
        return {"outcome": self.outcome.value, **({"head": self.head} if self.head else {})}


SKIPPED = JobResult(PrepareOutcome.SKIPPED)


def task_id(host: str, name: str, attempt_version: int) -> str:
    """Deterministic per attempt of a repository on a host: a duplicate publish of the same attempt
    is the same job, and the same name on two hosts makes two jobs (the ids also make the dedupe
    keys of what a job appends)."""
    return f"prepare:{host}:{name}:{attempt_version}"


def publish_prepare(settings: Settings, repo: RepoState) -> str:
    """Send the prepare job of `repo`'s current attempt to this host's queue."""
    from workers.app import app

    tid = task_id(settings.host, repo.name, repo.attempt_version)
    app.send_task(
        PREPARE_TASK,
        kwargs={"repo": repo.name, "attempt": repo.prepare_attempt, "version": repo.attempt_version, "host": settings.host},
        task_id=tid,
        queue=settings.queue,
    )
    return tid


def history_behind(repo: RepoState) -> bool:
    """Ready, with its history still to fetch by this attempt's job (a job killed after ready, or
    whose worker went away, leaves it so: run again, it fetches the history only). Once a refresh
    has run, the history is the refreshes' to fetch (refresh.py): each takes up what is left."""
    behind = repo.state is PrepareState.READY and repo.history in (HistoryState.PENDING.value, HistoryState.FETCHING.value)
    refreshed = repo.refreshed_at is not None and (repo.ready_at is None or repo.refreshed_at > repo.ready_at)
    return behind and not refreshed


def failpoint_from_env() -> Phase | None:
    """ARTIFACTFS_FAILPOINT=phase:<phase>, a fault-drill aid; inert when unset. Never set it in
    production.

    A prepare job stops for good right after it has recorded the event of <phase> (validate, clone,
    fetch, update_branch, index, publish or history; for clone, once the clone has landed in its temporary
    directory, before it is renamed into place): it logs "failpoint phase:<phase> reached" and
    waits there until it is killed. A drill sets it for a worker, SIGKILLs the worker at that point,
    and checks that the redelivered job (run by a worker without it) completes and leaves nothing
    half-made. A malformed value is logged and ignored.
    """
    raw = os.environ.get(FAILPOINT_VARIABLE, "")
    if not raw:
        return None
    kind, _, phase = raw.partition(":")
    if kind == "phase" and phase in {p.value for p in Phase}:
        return Phase(phase)
    choices = "|".join(p.value for p in Phase)
    log.error("%s=%r is not phase:<%s>: ignored (fix or unset it)", FAILPOINT_VARIABLE, raw, choices)
    return None


def run_prepare_job(
    settings: Settings,
    name: str,
    attempt_version: int,
    *,
    job_id: str,
    may_retry: bool = False,
    time_limit_error: type[BaseException] = PrepareTimeout,
) -> JobResult:
    """Run the job of `name`'s preparation attempt begun at stream version `attempt_version`.

    `time_limit_error` is what the job's soft time limit raises in this process (Celery's
    SoftTimeLimitExceeded in a worker): the job then ends every git process it started, removes
    what they left half-made and records the timeout. The process must run nothing else meanwhile
    (a Celery pool process runs one job at a time): ending the job's processes ends all its children.
    """
    validate_name(name)  # before a lock file or a directory is derived from it
    with about(repo=name, job=job_id, phase=None):  # what the job's log records are about
        become_subreaper()
        patience = Patience(REGISTRY_PATIENCE * settings.db_busy_timeout)
        registry = patience.retry(lambda: open_registry(settings.database_url, host=settings.host), name)
        started = time.monotonic()
        outcome = "crashed"  # anything but a result: the registry stayed busy, a bug
        try:
            job = PrepareJob(settings, registry, name, attempt_version, job_id, patience, may_retry, time_limit_error)
            result = job.run()
            outcome = result.outcome.value
            if result.outcome is PrepareOutcome.FAILED:
                count_error(ErrorKind.PREPARE)
            return result
        finally:
            observe_prepare(outcome, time.monotonic() - started)
            registry.close()
            reap_orphans()


@dataclass
class PrepareJob:
    settings: Settings
    registry: Registry
    name: str
    attempt_version: int
    job_id: str
    patience: Patience
    may_retry: bool
    time_limit_error: type[BaseException]
    repo: RepoState | None = None  # once claimed: the attempt is current and a worker's to run

    def run(self) -> JobResult:
        try:
            with repo_lock(self.settings.lock_file(self.name)):
                try:
                    return self._prepare()
                except self.time_limit_error:
                    return self._timed_out()
        except self.time_limit_error:
            log.warning("%s: the time limit passed while another process held the repository's lock: nothing done", self.name)
            return SKIPPED

    def _claim(self) -> RepoState | None:
        """The repository, if this job's attempt is current and a worker's to run; else None."""
        repo = self.patience.retry(lambda: self.registry.get(self.name), self.name)
        if repo is None or repo.attempt_version != self.attempt_version or not (
            repo.state is PrepareState.PREPARING or history_behind(repo)
        ):
            state = repo.prepare_state if repo else "removed"
            log.info("%s: the attempt begun at version %d has nothing to do (%s)", self.name, self.attempt_version, state)
            return None
        # A background job never holds a credential; nor may a forged job touch what the command that
        # began an attempt prepares in its own process (a blocking add).
        if os.path.lexists(self.settings.credential_file(self.name)):
            log.warning("%s: skipped: the repository has inline credentials, which a background job never holds",
                        self.name)  # fmt: skip
            return None
        if not repo.asynchronous:
            log.warning("%s: skipped: the attempt begun at version %d is prepared by the command that began it",
                        self.name, self.attempt_version)  # fmt: skip
            return None
        self.repo = repo
        return repo

    def _prepare(self) -> JobResult:
        repo = self._claim()
        if repo is None:
            return SKIPPED
        if forget_earlier_registration(self.settings, repo):
            log.info("%s: discarded what an earlier registration of the name left on this host", self.name)
        # Whoever waits on it (prepare --wait, add-repo --host) sees git's percentages too.
        report = Publisher(self.settings.wakeup_url, self.settings.host, self.name, self.attempt_version)
        preparation = Preparation(self.settings, self.registry, repo, self.job_id, patience=self.patience,
                                  failpoint=failpoint_from_env(), report=report, history_behind=True)  # fmt: skip
        try:
            if history_behind(repo):  # ready, its history not yet: the job was killed after ready
                assert repo.head is not None
                preparation.complete_history(repo.head)
                return JobResult(PrepareOutcome.READY, head=repo.head)
            return JobResult(PrepareOutcome.READY, head=preparation.run())
        except (RegistryBusy, self.time_limit_error):
            raise  # the task hands the job back to the queue; the caller records the timeout
        except StaleAttempt:
            current = self.patience.retry(lambda: self.registry.get(self.name), self.name)
            if current is None and not repo.prepared_gitdir:
                shutil.rmtree(self.settings.git_dir(self.name), ignore_errors=True)  # removed while we cloned
            return SKIPPED
        except GitError as exc:
            if exc.transient and self.may_retry:
                log.warning("%s: transient failure, will retry: %s", self.name, redact(str(exc)))
                return JobResult(PrepareOutcome.RETRY)
            return self._fail(repo, str(exc))
        except ArtifactError as exc:
            return self._fail(repo, str(exc))
        except Exception as exc:  # a bug must still fail the repository, not leave it preparing
            log.exception("%s: preparation crashed", self.name)
            return self._fail(repo, f"internal error: {type(exc).__name__}: {exc}")

    def _timed_out(self) -> JobResult:
        """The soft time limit struck: end the job's git processes, remove what they left half-made
        (we still hold the repository's lock), and record the timeout before the hard limit."""
        end_children()
        error = PrepareTimeout(
            f"preparation exceeded its time limit of {self.settings.job_soft_limit:g}s (ARTIFACTFS_JOB_SOFT_LIMIT)"
        )
        repo = self.repo or self._claim()
        if repo is None:
            return SKIPPED
        Preparation(self.settings, self.registry, repo, self.job_id).abandon()
        # The hard limit kills this process a little later: keep the waiting well inside that.
        grace = max(self.settings.job_hard_limit - self.settings.job_soft_limit, 0.0) / 2
        return self._fail(repo, str(error), Patience(min(self.patience.seconds, grace)))

    def _fail(self, repo: RepoState, error: str, patience: Patience | None = None) -> JobResult:
        log.error("%s: preparation failed: %s", repo.name, redact(error))
        failed = (patience or self.patience).retry(
            lambda: fail_attempt(self.settings, self.registry, repo, error, job_id=self.job_id,
                                 dedupe_key=f"{self.job_id}:failed"),
            repo.name,
        )  # fmt: skip
        return JobResult(PrepareOutcome.FAILED, error=redact(error)) if failed else SKIPPED


# --- the job's processes ---------------------------------------------------------------------------


def become_subreaper() -> None:
    """Make the orphans of our children ours rather than init's: a git killed mid-clone leaves its
    own children (ssh, index-pack, a remote helper) behind, and end_children must find them."""
    _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def child_pids(parent: int) -> list[int]:
    return [pid for pid in all_pids() if parent_pid(pid) == parent]


def end_children() -> None:
    """Kill and reap every child of this process, and every orphan that comes back to it (as a
    subreaper) when its parent dies, until none is left."""
    while children := child_pids(os.getpid()):
        for pid in children:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
        log.info("ended processes left by the job: %s", " ".join(map(str, children)))


def reap_orphans() -> None:
    """Collect orphans that came back to us and have exited since (they would stay zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
