"""Preparation: the phases that turn a registration into a git directory the mount can show.

validate (the remote answers and has the ref) -> clone (blobless, into a temporary directory,
renamed into place) or fetch + update_branch (into an existing or someone else's prepared git
directory) -> index (read-tree: trees only, no blobs) -> publish (the READY event, with the head).

Each phase is an event, so `status` and `events` show progress while a preparation runs. Events
carry the job id and a dedupe key, so a redelivered job appends nothing twice. The same code runs
for a blocking `add-repo` and inside a worker's prepare job; callers hold the repository's lock.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .attempts import Patience, current_attempt, record
from .config import Settings
from .fs.fsmonitor import add_index_extensions, base_token, fsmonitor_extension, hook_command
from .fs.untracked_cache import PER_DIRECTORY_EXCLUDES, tree_of_directories, untracked_extension
from .gitstore import (PREPARE_REFLOG_MESSAGE, check_git_dir, classify_git_error, clone_blobless, die_with_parent, fetch_objects,
                       git_env, remove_abandoned_packs, run_git)
from .history import count_commits, defers_history, fetch_history, history_pending, one_commit_first
from .logs import set_context as set_log_context
from .metrics import PhaseClock, observe_ready
from .model import (
    EventType,
    GitError,
    HistoryState,
    NewEvent,
    Owner,
    Phase,
    PrepareState,
    RefNotFound,
    RemoteUnreachable,
    RepoState,
    SourceUnverified,
)
from .owners import call_as, git_dir_owner, give_to
from .partial.helper import configure as configure_lazy_fetch
from .partial.helper import shallow_args
from .progress import Note, Report
from .registry import Registry
from .remotes import redact

log = logging.getLogger("artifactfs.prepare")


class RemoteCheck:
    """The remote and the ref, checked with `git ls-remote`: an unreachable remote or a missing ref
    named plainly, before (or, with verdict() deferred, beside) any clone or fetch."""

    patience = 15.0  # seconds a failed clone waits for the check's plainer word before raising its own

    def __init__(self, remote_url: str, ref: str, credential_file: Path | None) -> None:
        self.remote_url, self.ref = remote_url, ref
        self.args = ["ls-remote", "--", remote_url, ref]
        # A process group of its own: stop() ends what it started too (ssh holds its pipes open).
        self.proc = subprocess.Popen(["git", *self.args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=git_env(credential_file), preexec_fn=die_with_parent,
                                     process_group=0)  # fmt: skip

    def verdict(self, timeout: float | None = None) -> str:
        """The ref's commit; RemoteUnreachable or RefNotFound, each with what to check;
        subprocess.TimeoutExpired if the check has not ended within `timeout` seconds."""
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            exc = classify_git_error(self.args, err)
            if isinstance(exc, RemoteUnreachable):
                raise RemoteUnreachable(
                    f"cannot read remote {self.remote_url}: {exc} (check the URL, the network and your access rights)",
                    transient=exc.transient,
                ) from None
            raise exc
        for line in out.decode().splitlines():
            oid, _, name = line.partition("\t")
            if name == self.ref:
                return oid
        raise RefNotFound(f"ref {self.ref} does not exist in {self.remote_url} (see: git ls-remote {self.remote_url})")

    def explain(self, failure: GitError) -> None:
        """Raise the check's plainer error for a clone or fetch that failed with `failure`, if it
        has one in time; else return (the caller raises `failure`)."""
        try:
            self.verdict(timeout=self.patience)
        except subprocess.TimeoutExpired:
            log.warning("the check of %s did not end within %.0f s: %s", redact(self.remote_url), self.patience, redact(str(failure)))

    def stop(self) -> None:
        """No verdict needed (what it checks has just worked, or it was given up): end it, and
        whatever it started, if still running."""
        if self.proc.returncode is None:  # else verdict() has read it already
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.communicate()


def validate_remote(remote_url: str, ref: str, credential_file: Path | None) -> str:
    """Name an unreachable remote or a missing ref plainly, before any clone starts."""
    return RemoteCheck(remote_url, ref, credential_file).verdict()


TreeEntry = tuple[bytes, bytes, bytes]  # (type, id, path), as ls-tree names them


def write_index(git_dir: Path, head: str, work_tree: Path, entries: list[TreeEntry] | None = None) -> None:
    """An index of the commit's tree, every entry valid for git's file system monitor, and the
    untracked cache of a work tree with no untracked file.

    read-tree needs only trees, which a blobless clone has. The index holds no stat data that
    matches the mount, so without help git would stat and hash every tracked file, downloading
    the whole repository for one `git status`. Only the overlay can change a mounted tree, and
    the mount tells git's fsmonitor hook every path it changed (fs/fsmonitor.py): so the index
    starts with every entry valid and a token that asks the mount what changed since this
    commit. The untracked cache (fs/untracked_cache.py), led by the same hook, spares the first
    status the walk of every directory, and the later ones all but the directories that changed.
    """
    # No monitor while the index is made here: read-tree would ask the hook, from no work tree.
    run_git(["-c", "core.fsmonitor=false", "read-tree", head], git_dir=git_dir)
    run_git(["config", "core.fsmonitor", hook_command()], git_dir=git_dir)
    run_git(["config", "core.untrackedCache", "true"], git_dir=git_dir)
    object_format = run_git(["rev-parse", "--show-object-format"], git_dir=git_dir).stdout.decode().strip()
    entries = tree_entries(git_dir, head) if entries is None else entries
    directories = [path for kind, _, path in entries if kind == b"tree"]
    gitignores = {parent(path): bytes.fromhex(oid.decode()) for kind, oid, path in entries
                  if kind == b"blob" and path.rsplit(b"/", 1)[-1] == PER_DIRECTORY_EXCLUDES}  # fmt: skip
    untracked = untracked_extension(
        Path(os.path.realpath(work_tree)),
        tree_of_directories(directories, gitignores, [path for kind, _, path in entries if kind == b"commit"]),
        info_exclude=excludes_hash(git_dir / "info" / "exclude", object_format),
        hash_size=hashlib.new(object_format).digest_size,
    )
    add_index_extensions(git_dir / "index", [fsmonitor_extension(base_token(head)), untracked], object_format)


def excludes_hash(path: Path, object_format: str) -> bytes | None:
    """The hash git gives an excludes file (its content and one more newline), or None if absent."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None
    header = f"blob {len(content) + 1}\0".encode()
    return hashlib.new(object_format, header + content + b"\n").digest()


def parent(path: bytes) -> bytes:
    return path.rsplit(b"/", 1)[0] if b"/" in path else b""


# What git itself reads from the work tree for a status (ignore rules, attributes, submodules): in a
# mount each is a blob, and git's own lazy fetch would bring them one transaction apiece.
STATUS_NAMES = frozenset({b".gitignore", b".gitattributes"})  # at any depth
STATUS_TOP_LEVEL = frozenset({b".gitmodules"})


def tree_entries(git_dir: Path, head: str) -> list[TreeEntry]:
    """(type, id, path) of every tree, blob and submodule of the commit. Trees only: a blobless
    clone answers without fetching."""
    out = run_git(["ls-tree", "-r", "-t", "-z", "--full-tree", head], git_dir=git_dir).stdout
    found = []
    for entry in out.split(b"\0"):
        meta, _, path = entry.partition(b"\t")
        fields = meta.split()
        if len(fields) == 3:
            found.append((fields[1], fields[2], path))
    return found


def status_blobs(git_dir: Path, head: str, entries: list[TreeEntry] | None = None) -> list[str]:
    """The blob ids at `head` (of its `entries`, if read already) that `git status` reads: every
    .gitignore and .gitattributes, and .gitmodules at the top."""
    return [oid.decode() for kind, oid, path in (tree_entries(git_dir, head) if entries is None else entries)
            if kind == b"blob" and (path.rsplit(b"/", 1)[-1] in STATUS_NAMES or path in STATUS_TOP_LEVEL)]  # fmt: skip


def fetch_status_blobs(git_dir: Path, head: str, env: dict[str, str], entries: list[TreeEntry] | None = None) -> int:
    """Fetch the blobs `git status` reads that are missing, all in one transaction; return how
    many were fetched.
    Done before `ready`, so that no status in the mount ever waits on the network for them."""
    import pygit2  # libgit2 answers "is it here?" without git's lazy fetch

    odb = pygit2.Repository(str(git_dir)).odb
    return fetch_objects(git_dir, [oid for oid in status_blobs(git_dir, head, entries) if not odb.exists(oid)], env)


def prepare_work_tree(git_dir: Path, head: str, work_tree: Path, env: dict[str, str]) -> bool:
    """What the mount and `git status` need of `head`: the lazy-fetch helper, the index, and the
    blobs a status reads, fetched while the index is written (the network and the disk at once,
    and the tree listed once for both). True for a partial clone."""
    partial = configure_lazy_fetch(git_dir)
    entries = tree_entries(git_dir, head)
    with ThreadPoolExecutor(max_workers=1) as pool:
        fetched = pool.submit(fetch_status_blobs, git_dir, head, env, entries)
        write_index(git_dir, head, work_tree, entries)
        fetched.result()
    return partial


# Lock files git leaves behind when it is killed while writing: the index, the config, HEAD,
# shallow, packed-refs (all at the top of the git directory) and every ref (under refs/).
TOP_LEVEL_LOCKS = "*.lock"
REF_LOCKS = "refs/**/*.lock"


def clear_leftovers(git_dir: Path) -> list[Path]:
    """Remove the lock files and temporary packs a killed git left in one of our git directories;
    return them.

    Safe only under the repository's lock, and only in a git directory of ours (never a prepared
    one, where its owner's git may be at work): only our own prepare jobs write there, and only
    while they hold that lock (a mount's blob fetches add packs, and take none of these locks, but
    hold their temporary pack open, which keeps it). So a lock file found by the holder was left by
    a job that was killed mid-write, and git would refuse to go on ("Unable to create
    '.../index.lock': File exists") until someone removed it.
    """
    found = [*git_dir.glob(TOP_LEVEL_LOCKS), *git_dir.glob(REF_LOCKS)]
    removed = []
    for path in found:
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    removed += remove_abandoned_packs(git_dir)
    if removed:
        log.warning("%s: removed what a killed git left: %s", git_dir,
                    ", ".join(str(p.relative_to(git_dir)) for p in removed))  # fmt: skip
    return removed


def fetch_head(git_dir: Path, remote_url: str, source_ref: str, env: dict[str, str],
               progress: Callable[[str, int], None] | None = None, depth: int | None = None) -> str:  # fmt: skip
    """Fetch `source_ref` into a clone (or a prepared git directory), `depth` commits deep if
    given; the commit fetched."""
    promisor = run_git(["config", "--get", "remote.origin.promisor"], git_dir=git_dir, env=env, check=False)
    # Keep a partial clone partial: fetch through its promisor remote, with the filter it was
    # cloned with (git recorded it).
    if promisor.stdout.strip() == b"true":
        recorded = run_git(["config", "--get", "remote.origin.partialclonefilter"], git_dir=git_dir, env=env, check=False)
        options, source = [f"--filter={recorded.stdout.decode().strip() or 'blob:none'}"], "origin"
    else:
        options, source = [], remote_url
    if depth is not None:
        options.append(f"--depth={depth}")  # git writes the shallow file: none of ours (history.one_commit_first)
    bounded = shallow_args(git_dir) if depth is None else []
    run_git([*bounded, "fetch", "--progress" if progress else "--quiet", "--no-tags", "--recurse-submodules=no", *options,
             "--", source, source_ref], git_dir=git_dir, env=env, progress=progress)  # fmt: skip
    return run_git(["rev-parse", "--verify", "FETCH_HEAD^{commit}"], git_dir=git_dir).stdout.decode().strip()


def check_required_commit(git_dir: Path, head: str, required: str, source_ref: str, depth: int | None) -> None:
    """A verified source: `head`, fetched from `source_ref`, must be `required` or descend from it.
    Asked of libgit2, which never fetches: a commit that is not here is not in the history
    fetched (a shallow one ends at its boundary)."""
    import pygit2

    repo = pygit2.Repository(str(git_dir))
    try:
        contained = head == required or repo.descendant_of(head, required)
    except (KeyError, ValueError, pygit2.GitError):
        contained = False
    if not contained:
        within = f" within its {depth} newest commits (--depth {depth})" if depth is not None else ""
        raise SourceUnverified(
            f"{source_ref} at {head} does not contain the required commit {required}{within}: the remote's ref "
            "is not the verified source (check --require-commit, or the remote)"
        )


def verify_source(repo: RepoState, git_dir: Path, head: str, owner: Owner | None) -> None:
    """A verified source (add-repo --require-commit): SourceUnverified unless `head`, fetched
    into `git_dir`, contains the commit; checked as `owner`. Nothing to check without one."""
    required = repo.require_commit
    if required is not None:
        source_ref, depth = repo.fetch_ref or repo.ref, repo.depth
        call_as(owner, lambda: check_required_commit(git_dir, head, required, source_ref, depth))


def move_branch(git_dir: Path, ref: str, head: str) -> None:
    """Point `ref` at `head` and HEAD at `ref` (HEAD itself for a ref that is no branch)."""
    # Named in the reflog, so that the mount tells this move from git's own (reconcile.py).
    message = ["-m", PREPARE_REFLOG_MESSAGE]
    run_git(["update-ref", *message, ref, head], git_dir=git_dir)
    if ref.startswith("refs/heads/"):
        run_git(["symbolic-ref", *message, "HEAD", ref], git_dir=git_dir)
    else:
        run_git(["update-ref", *message, "--no-deref", "HEAD", head], git_dir=git_dir)


def complete_history(name: str, git_dir: Path, head: str, owner: Owner | None,
                     record_history: Callable[[dict[str, object]], None],
                     started: Callable[[], None] = lambda: None) -> None:  # fmt: skip
    """Fetch the history behind a ready repository `name` (history.py) and check it, recording
    HISTORY started and done (with its commits and seconds) or failed. A failure leaves the
    repository ready: git in the mount fetches the history itself when it walks it, and
    `artifactfs prepare` or the next refresh tries again."""
    if not history_pending(git_dir):
        record_history({"state": "done", "commits": call_as(owner, lambda: count_commits(git_dir, head))})
        return
    record_history({"state": "started"})
    started()
    began = time.monotonic()
    try:
        commits = call_as(owner, lambda: fetch_history(git_dir, head))
    except GitError as exc:
        log.warning("%s: the history fetch failed: %s", name, redact(str(exc)))
        record_history({"state": "failed", "error": redact(str(exc))})
        return
    seconds = round(time.monotonic() - began, 3)
    log.info("%s: history complete: %d commits in %.2fs", name, commits, seconds)
    record_history({"state": "done", "commits": commits, "seconds": seconds})


@dataclass
class Preparation:
    settings: Settings
    registry: Registry
    repo: RepoState
    job_id: str
    credential_file: Path | None = None  # a blocking add's own: a worker's job never holds one
    patience: Patience = field(default_factory=Patience)  # for a busy registry (jobs wait it out)
    failpoint: Phase | None = None  # a fault drill's stop (see jobs.failpoint_from_env)
    clock: PhaseClock = field(default_factory=PhaseClock)  # each phase's time (metrics.py)
    report: Report | None = None  # who waits on it (progress.py): the phases and git's percentages
    # A worker's job: ready in one commit's time, the history fetched after (history.py).
    history_behind: bool = False
    shallow_refused: bool = False  # the remote could not serve that: the whole history came at once
    started: float = field(default_factory=time.monotonic)

    def phase(self, phase: Phase) -> None:
        self.clock.begin(phase.value)
        set_log_context(phase=phase.value)
        self._record(NewEvent(EventType.PHASE, {"phase": phase.value}, job_id=self.job_id,
                              dedupe_key=f"{self.job_id}:{phase.value}"))  # fmt: skip
        if self.report is not None:  # after the event: whoever hears of the phase finds it in the log
            self.report(Note(phase.value))
        if phase is not Phase.CLONE:  # the clone's stop is once it has landed (see _clone)
            self._reached(phase)

    def run(self) -> str:
        """Run every phase; return the head commit now published as READY."""
        try:
            head = self._run()
        except BaseException:
            self.clock.end("failed")
            raise
        self.clock.end("ok")
        return head

    def _run(self) -> str:
        repo = self.repo
        git_dir = self.settings.repo_git_dir(repo)
        source_ref = repo.fetch_ref or repo.ref
        owner = self.owner
        self.phase(Phase.VALIDATE)
        # The check runs beside the clone or fetch instead of before it, which it would delay by
        # a round trip to the remote; when they fail, its error says plainly why (an unreachable
        # remote, a missing ref), and it is the one raised. When they succeed it has nothing to add.
        check = RemoteCheck(repo.remote_url, source_ref, self.credential_file)
        try:
            head = self._clone_or_fetch(git_dir, source_ref)
        except GitError as exc:  # not a time limit, a busy registry or a stale attempt: those go on as they are
            check.explain(exc)
            raise
        finally:
            check.stop()
        self.phase(Phase.INDEX)
        env = git_env(self.credential_file)
        work_tree = Path(repo.mount_path)
        partial = call_as(owner, lambda: prepare_work_tree(git_dir, head, work_tree, env))
        self.phase(Phase.PUBLISH)
        payload: dict[str, object] = {"head": head}
        if not partial and not repo.prepared_gitdir:
            # The remote ignored the filter (uploadpack.allowFilter=false): a full clone, said here
            # and shown by status, since its size and its time are not what the filter promised.
            log.warning("%s: the remote does not support filters: a full clone, not a partial one", repo.name)
            payload["filter_fallback"] = True
        if self.shallow_refused:
            log.warning("%s: the remote cannot serve a shallow fetch: the whole history came before ready", repo.name)
            payload["shallow_refused"] = True
        pending = history_pending(git_dir)
        if pending:
            payload["history"] = HistoryState.PENDING.value
        self._record(NewEvent(EventType.READY, payload, job_id=self.job_id, dedupe_key=f"{self.job_id}:ready"))
        observe_ready(pending, time.monotonic() - self.started)
        if pending:
            self.complete_history(head)
        return head

    def _clone_or_fetch(self, git_dir: Path, source_ref: str) -> str:
        """The commit to show, here: cloned, or fetched into the git directory there already."""
        if self.repo.prepared_gitdir:
            check_git_dir(git_dir)
            return self._fetch(git_dir, source_ref)
        if (git_dir / "HEAD").is_file():
            call_as(self.owner, lambda: len(clear_leftovers(git_dir)))  # we hold the lock: see clear_leftovers
            return self._fetch(git_dir, source_ref)  # a retry or refresh: the clone is there
        self._discard_temporaries()
        self.phase(Phase.CLONE)
        return self._clone(git_dir)

    def complete_history(self, head: str) -> None:
        """The history behind a ready repository, fetched and checked, with its events."""
        self.clock.begin(Phase.HISTORY.value)
        set_log_context(phase=Phase.HISTORY.value)
        git_dir = self.settings.repo_git_dir(self.repo)
        complete_history(self.repo.name, git_dir, head, self.owner, self._record_history,
                         lambda: self._reached(Phase.HISTORY))  # fmt: skip

    def _record_history(self, payload: dict[str, object]) -> None:
        self._record(NewEvent(EventType.HISTORY, payload, job_id=self.job_id,
                              dedupe_key=f"{self.job_id}:history:{payload['state']}"), PrepareState.READY)  # fmt: skip

    @property
    def defers_history(self) -> bool:
        return self.history_behind and defers_history(self.repo)

    def abandon(self) -> None:
        """Clear what a run interrupted mid-way leaves (once its git processes are gone): temporary
        clones, and git's lock files in a git directory of ours."""
        self._discard_temporaries()
        git_dir = self.settings.repo_git_dir(self.repo)
        if not self.repo.prepared_gitdir and git_dir.is_dir():
            call_as(self.owner, lambda: len(clear_leftovers(git_dir)))

    def _record(self, event: NewEvent, state: PrepareState = PrepareState.PREPARING) -> None:
        guard = current_attempt(self.repo.attempt_version, state)
        self.patience.retry(lambda: record(self.settings, self.registry, self.repo.name, event, guard=guard), self.repo.name)

    def _git_progress(self) -> Callable[[str, int], None] | None:
        report = self.report
        if report is None:
            return None
        return lambda stage, percent: report(Note(stage=stage, percent=percent))

    def _reached(self, phase: Phase) -> None:
        """A fault drill's stop: say so in one line, then wait here until killed."""
        if phase is not self.failpoint:
            return
        log.warning("%s: failpoint phase:%s reached", self.repo.name, phase.value)
        while True:
            time.sleep(3600)

    def _clone(self, git_dir: Path) -> str:
        """Clone into a staging directory of this attempt, then rename the clone into place: git_dir
        appears only once the clone is complete and verified (and a drill can stop in between)."""
        tmp_root = self.settings.tmp_root
        tmp_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{git_dir.name}.", dir=tmp_root))
        try:
            staged = staging / git_dir.name
            head = self._clone_into(staged, tmp_root)
            verify_source(self.repo, staged, head, None)  # root's still, in the root-only temporary root
            self._reached(Phase.CLONE)
            git_dir.parent.mkdir(parents=True, exist_ok=True)
            owner = self.owner
            if owner is not None:
                # Now, while it lies under the root-only temporary root: once in place it is
                # theirs to change, and root must not walk it again (see owners.py).
                give_to(staged, owner)
                self.settings.open_to_owner(self.settings.git_root)
            os.rename(staged, git_dir)  # atomic on one filesystem; fails if git_dir is there
            return head
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _clone_into(self, staged: Path, tmp_root: Path) -> str:
        """The clone itself: one commit deep, its history named as missing, when the history comes
        after ready; the whole history if the remote cannot serve a shallow clone (said in READY)."""
        def clone(depth: int | None) -> str:
            return clone_blobless(
                self.repo.remote_url, self.repo.ref, staged, tmp_root, credential_file=self.credential_file,
                blob_filter=self.repo.blob_filter, depth=depth, progress=self._git_progress(),
            ).head  # fmt: skip

        if not self.defers_history:
            return clone(self.repo.depth)
        head, self.shallow_refused = one_commit_first(clone, staged, None)
        return head

    @property
    def owner(self) -> Owner | None:
        """Whose the git directory is (add-repo --owner): every git command on it runs as them."""
        return git_dir_owner(self.repo)

    def _fetch(self, git_dir: Path, source_ref: str) -> str:
        self.phase(Phase.FETCH)
        env = git_env(self.credential_file)
        progress = self._git_progress()
        head = call_as(self.owner, lambda: self._fetch_into(git_dir, source_ref, env, progress))
        verify_source(self.repo, git_dir, head, self.owner)  # before the branch moves: git in the mount never sees it
        self.phase(Phase.UPDATE_BRANCH)
        call_as(self.owner, lambda: move_branch(git_dir, self.repo.ref, head))
        return head

    def _fetch_into(self, git_dir: Path, source_ref: str, env: dict[str, str],
                    progress: Callable[[str, int], None] | None) -> str:  # fmt: skip
        """The fetch of a retry or a refresh: when the history comes after ready, of the new
        commit and its trees first (as a clone), negotiated from the commit shown until now."""
        def fetch(depth: int | None) -> str:
            return fetch_head(git_dir, self.repo.remote_url, source_ref, env, progress, depth)

        if not self.defers_history:
            return fetch(self.repo.depth)
        head, self.shallow_refused = one_commit_first(fetch, git_dir, self.repo.head)
        return head

    def _discard_temporaries(self) -> None:
        """Temporary clones of this repository left by a killed attempt (we hold its lock).

        mkdtemp names them <name>.git.<random>, the random part without a dot: so those of a
        repository named, say, "a.git" (a.git.git.<random>) are not taken for those of "a"."""
        prefix = f"{self.settings.git_dir(self.repo.name).name}."
        for path in self.settings.tmp_root.glob(f"{glob.escape(prefix)}*"):
            if "." not in path.name.removeprefix(prefix):
                shutil.rmtree(path, ignore_errors=True)
