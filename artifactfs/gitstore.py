"""The git store: blobless partial clones, batched blob fetches, and reading trees in process.

Everything that talks to a remote goes through the git CLI (libgit2 has no partial clone); trees
and present objects are read in process with pygit2. Git never prompts here: a job or a mount that
waits on a terminal nobody watches would hang forever.
"""
from __future__ import annotations

import ctypes
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .credentials import Credential, helper_command, write_credential_file
from .model import GitError, InvalidInput, RefNotFound, RemoteUnreachable
from .partial.helper import LAZY_FETCH_ARGS, fetch_command, shallow_args
from .procs import open_files
from .progress import git_progress
from .remotes import Remote, redact

PR_SET_PDEATHSIG = 1
# The reflog message of preparation's moves of HEAD: the mount follows git's moves, not these.
PREPARE_REFLOG_MESSAGE = "artifactfs: prepare"
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: preexec_fn must not dlopen

# Substrings of git's stderr that mean "try again later" rather than "this will never work".
TRANSIENT_MARKERS = (
    "connection reset",
    "early eof",
    "the remote end hung up unexpectedly",
    "connection timed out",
    "operation timed out",
    "temporary failure in name resolution",
    "could not resolve host",
    "returned error: 500",
    "returned error: 502",
    "returned error: 503",
    "returned error: 504",
    "rpc failed",
    "unexpected disconnect",
    "index-pack failed",
)
UNREACHABLE_MARKERS = (
    "could not read from remote repository",
    "does not appear to be a git repository",
    "unable to access",
    "repository not found",
    "connection refused",
    "authentication failed",
    "could not resolve host",
    "not found",
    "no such file or directory",
    "access denied",
    "permission denied",
)


def git_env(credential_file: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every git process we start.

    Never prompt (GIT_TERMINAL_PROMPT=0, ssh in batch mode, unless the user set their own ssh
    command). Credentials, when a repository has any, come from our own helper reading a
    root-only file (see credentials.py): they never appear on a command line, in the registry or
    in a log. Without them, git asks the helpers configured for root, as it always does.
    """
    env = dict(os.environ if base is None else base)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    env["GIT_ASKPASS"] = "true"  # an askpass that answers nothing, instead of a GUI dialog
    env.pop("SSH_ASKPASS", None)
    env.setdefault("LC_ALL", "C")  # error texts we classify are git's English ones
    if credential_file is not None:
        # An empty value resets the helper list, so only this repository's file answers.
        env.update(
            GIT_CONFIG_COUNT="2",
            GIT_CONFIG_KEY_0="credential.helper",
            GIT_CONFIG_VALUE_0="",
            GIT_CONFIG_KEY_1="credential.helper",
            GIT_CONFIG_VALUE_1=helper_command(credential_file),
        )
    return env


def die_with_parent() -> None:
    """In the child before exec: be killed when the process that started us dies.

    A worker killed mid-clone must not leave a git clone running on its own (and racing the
    redelivered job).
    """
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_git(
    args: Sequence[str],
    *,
    git_dir: Path | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    progress: Callable[[str, int], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run git; with `progress`, git's own percentages go to it as git writes them."""
    cmd = ["git"]
    if git_dir is not None:
        cmd.append(f"--git-dir={git_dir}")
    cmd.extend(args)
    if progress is not None:
        proc = _run_reporting(cmd, env if env is not None else git_env(), timeout, progress)
        if check and proc.returncode != 0:
            raise classify_git_error(args, proc.stderr)
        return proc
    proc = subprocess.run(
        cmd, input=input, capture_output=True, env=env if env is not None else git_env(), timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL, preexec_fn=die_with_parent,
    )
    if check and proc.returncode != 0:
        raise classify_git_error(args, proc.stderr)
    return proc


def _run_reporting(cmd: list[str], env: dict[str, str], timeout: float | None,
                   progress: Callable[[str, int], None]) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    """subprocess.run for a git that reports progress: its stderr is read as it comes (lines end
    in \r while a percentage counts up) and kept whole for the error, if any. At `timeout` git is
    killed, silent or not, and TimeoutExpired raised, as subprocess.run does."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=die_with_parent)  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    deadline = time.monotonic() + timeout if timeout is not None else None
    stderr = bytearray()
    pending = b""
    try:
        while True:
            left = deadline - time.monotonic() if deadline is not None else None
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(cmd, timeout or 0, None, bytes(stderr))
            if not select.select([proc.stderr], [], [], left)[0]:
                continue  # the deadline passed while git was silent
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            stderr += chunk
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in lines:
                found = git_progress(line.decode("utf-8", "replace"))
                if found is not None:
                    progress(*found)
        stdout = proc.stdout.read()  # git writes nothing there that fills a pipe (clone, fetch)
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stderr.close()
        proc.stdout.close()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, bytes(stderr))


def classify_git_error(args: Sequence[str], stderr: bytes) -> GitError:
    text = redact(stderr.decode("utf-8", "replace")).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith(("fatal:", "error:"))]
    # The first fatal line is the specific one ("'x' does not appear to be a git repository");
    # later ones are git's generic advice ("Could not read from remote repository.").
    summary = (fatal[0] if fatal else (lines[-1] if lines else f"git {args[0]} failed")).strip()
    for prefix in ("fatal: ", "error: "):
        summary = summary.removeprefix(prefix)
    low = text.lower()
    if ("remote branch" in low and "not found" in low) or "couldn't find remote ref" in low:
        return RefNotFound(summary)
    transient = any(marker in low for marker in TRANSIENT_MARKERS)
    if any(marker in low for marker in UNREACHABLE_MARKERS):
        return RemoteUnreachable(summary, transient=transient)
    return GitError(summary, transient=transient)


def store_credentials(remote: Remote, credential_file: Path) -> None:
    """Keep inline credentials where only our helper reads them: a 0600 file of root's."""
    parts = urlsplit(remote.url)
    host = parts.netloc.rpartition("@")[2]  # host[:port] as git will ask for it
    credential = Credential(parts.scheme, host, remote.username or "", remote.password or "")
    write_credential_file(credential_file, credential)


def short_ref(ref: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    raise InvalidInput(f"ref {ref!r} is neither a branch (refs/heads/...) nor a tag (refs/tags/...)")


@dataclass(frozen=True)
class CloneResult:
    git_dir: Path
    head: str


# What git says (LC_ALL=C) when a remote does not serve filters (uploadpack.allowFilter=false):
# it goes on with a full clone, yet records the remote as a promisor of the filter it asked for.
FILTER_REFUSED = b"filtering not recognized by server"


def clone_blobless(
    remote_url: str,
    ref: str,
    git_dir: Path,
    tmp_root: Path,
    *,
    credential_file: Path | None = None,
    timeout: float | None = None,
    blob_filter: str = "blob:none",
    depth: int | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> CloneResult:
    """Blobless, single-branch, tagless clone of `ref` into `git_dir`, atomically; shallow, of
    `depth` commits, if given.

    The clone lands in a temporary directory next to its destination and is renamed into place
    only when complete, so a failed or killed clone never leaves a half-made git directory. A
    remote that ignores the filter gives a full clone: it is then no partial clone at all (see
    drop_promisor; preparation tells it by the promisor config that is left).
    """
    branch = short_ref(ref)
    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{git_dir.name}.", dir=tmp_root))
    try:
        work = tmp / "work"
        env = git_env(credential_file)
        shallow = [f"--depth={depth}"] if depth is not None else []
        cloned = run_git(
            ["clone", "--progress" if progress else "--quiet", f"--filter={blob_filter}", *shallow, "--no-checkout",
             "--single-branch", "--no-tags", f"--branch={branch}", "--", remote_url, str(work)],
            env=env, timeout=timeout, progress=progress,
        )  # fmt: skip
        staged = work / ".git"
        if FILTER_REFUSED in cloned.stderr:
            drop_promisor(staged)
        configure_clone(staged, credential_file)
        head = run_git(["rev-parse", "--verify", "HEAD^{commit}"], git_dir=staged, env=env).stdout.decode().strip()
        git_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, git_dir)  # atomic on one filesystem; fails if git_dir exists
        return CloneResult(git_dir=git_dir, head=head)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drop_promisor(git_dir: Path) -> None:
    """Make a clone that received everything a plain, full clone: no promisor remote, no filter,
    no promisor packs. Left as git made it, every later fetch would ask the remote for a filter it
    does not serve, and git would take any object missing by corruption for one promised."""
    for key in ("remote.origin.promisor", "remote.origin.partialclonefilter"):
        run_git(["config", "--unset-all", key], git_dir=git_dir, check=False)
    for marker in (git_dir / "objects" / "pack").glob("pack-*.promisor"):
        marker.unlink()


def configure_clone(git_dir: Path, credential_file: Path | None) -> None:
    settings = [
        ("gc.auto", "0"),  # repacking under a live mount would only cost time
        ("maintenance.auto", "false"),  # nor would a maintenance process after every lazy fetch
        ("fetch.writeCommitGraph", "false"),
    ]
    for key, value in settings:
        run_git(["config", key, value], git_dir=git_dir)
    if credential_file is not None:
        configure_credential_helper(git_dir, credential_file)


def configure_credential_helper(git_dir: Path, credential_file: Path) -> None:
    """Make the clone's own fetches (the mount's lazy ones, run as root) ask our helper only.

    An empty value first resets the helper list, so no helper of root's answers (or erases) for
    this repository. Replaces whatever an older version configured (git's store helper).
    """
    run_git(["config", "--unset-all", "credential.helper"], git_dir=git_dir, check=False)
    run_git(["config", "--add", "credential.helper", ""], git_dir=git_dir)
    run_git(["config", "--add", "credential.helper", helper_command(credential_file)], git_dir=git_dir)


def batch_fetch_command(git_dir: Path) -> list[str]:
    return fetch_command(git_dir, "origin")


def fetch_objects(git_dir: Path, oids: Sequence[str], env: dict[str, str], timeout: float | None = None) -> int:
    """Fetch `oids` from the promisor remote in one transaction (one negotiation, one pack);
    return how many were asked for. Trees asked for arrive with their subtrees, never blobs."""
    if oids:
        run_git([*shallow_args(git_dir), *LAZY_FETCH_ARGS], git_dir=git_dir, env=env, timeout=timeout,
                input="".join(f"{oid}\n" for oid in oids).encode())  # fmt: skip
    return len(oids)


# Packs consolidated into one: every promisor pack (each batch fetch adds one) and the rest,
# each into a single new pack; git removes a pack only once what it held is in the new one, and
# leaves alone a pack that a fetch adds meanwhile.
CONSOLIDATE_ARGS = ("-c", "maintenance.auto=false", "repack", "-a", "-d", "-q", "--no-write-bitmap-index")


def pack_count(git_dir: Path) -> int:
    return sum(1 for _ in (git_dir / "objects" / "pack").glob("*.pack"))


# What git writes into objects/pack/ before it renames a finished pack into place.
TEMPORARY_PACK_PATTERNS = ("tmp_pack_*", "tmp_idx_*", "tmp_rev_*", "tmp_mtimes_*")


def temporary_packs(git_dir: Path) -> set[Path]:
    pack_dir = git_dir / "objects" / "pack"
    return {p for pattern in TEMPORARY_PACK_PATTERNS for p in pack_dir.glob(pattern) if p.is_file()}


PACK_GRACE_SECONDS = 2.0  # a temporary pack untouched this long, with no fetch at work, is waste


def remove_abandoned_packs(git_dir: Path, among: set[Path] | None = None, *, grace: float = PACK_GRACE_SECONDS) -> list[Path]:
    """Remove the temporary pack files (of `among`, or all) that a fetch which failed or was
    killed left behind, and return them. Nothing else ever removes them (gc.auto is off), and on
    a full disk they hold the very space that is missing.

    A fetch at work holds one of its temporary files open until it renames them all into place:
    while any temporary pack file here is open, nothing is removed. Nor is a file written within
    the last `grace` seconds (a fetch between closing its last file and renaming it)."""
    present = temporary_packs(git_dir)
    candidates = present if among is None else present & among
    if not candidates or open_files(present):
        return []
    cutoff = time.time() - grace
    removed = []
    for path in sorted(candidates):
        try:
            if path.stat().st_mtime <= cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue  # renamed into place, or removed by another cleanup
    return removed


@dataclass(frozen=True)
class HydrationStats:
    blobs: int
    bytes: int


def hydration_stats(git_dir: Path) -> HydrationStats:
    """How many blobs (and bytes) are present locally: the hydrated part of the repository."""
    if not git_dir.is_dir():
        return HydrationStats(0, 0)
    out = run_git(
        ["cat-file", "--batch-all-objects", "--unordered", "--batch-check=%(objecttype) %(objectsize)"],
        git_dir=git_dir,
    ).stdout
    blobs = size = 0
    for line in out.splitlines():
        kind, _, n = line.partition(b" ")
        if kind == b"blob":
            blobs += 1
            size += int(n)
    return HydrationStats(blobs, size)


def check_git_dir(path: Path) -> None:
    """A prepared git directory must exist and be a git directory (not a work tree)."""
    if not (path / "HEAD").is_file() or not (path / "objects").is_dir():
        raise InvalidInput(f"{path} is not a git directory (expected HEAD and objects/ inside it)")
