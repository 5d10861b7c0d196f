"""The remote helper through which git's lazy fetches reach the promisor remote, widened.

Git fetches a missing object the moment it needs it, in a transaction of its own. A diff, a
checkout or a status batch their objects first; a history walk does not: `git blame` asks for
each older version of a file one at a time, `git log -p` for each commit's changes as it reaches
the commit. What comes next is known locally, since a blobless clone has every commit and tree.

Preparation configures a promisor remote in front of the clone's own (configure() below):

    [remote "artifactfs"]                     # before origin's section: git asks promisor
        url = artifactfs::origin              # remotes in config order; it runs
        promisor = true                       # `git remote-artifactfs artifactfs origin`
    [alias] remote-artifactfs = !<python> -I -S <this file>

Git finds no `git-remote-artifactfs` program and runs the alias (as for any command it does not
know), so nothing is installed outside the repository's own config; the helper runs for whoever
runs git, as them. It speaks the `fetch` capability of gitremote-helpers(7): git names the
objects it wants, and the helper widens a small request (a walk's) to what the walk will need:

- it locates the requested blobs in history (`git log --raw`, newest first: the commit whose
  change introduced each, and its path);
- adds every version of those paths from there back (what blame and `log -p PATH` read), then
  both sides of every change of the commits that follow in the walk (what `log -p` reads next);
- no further than the asking git will read, when its command line (our ancestor's, in /proc)
  limits its walk: `log -p -20` gets the changes of 20 commits, not of 64;
- and fetches all of it from the real remote in one transaction, with the command git's own lazy
  fetch runs, into a promisor pack. The objects are the remote's: git's output is unchanged.

A large request is git batching already (a diff, a checkout): it is fetched as asked.

A repository made ready in one commit's time (a depth-1 clone whose `shallow` file is gone, see
artifactfs/history.py) lacks the parents of that commit: git takes them for promised objects and
asks for them the moment a walk reaches them. While its history marker is in the git directory,
the helper first fetches the whole missing history (commits and trees, never a blob) in one
transaction together with what git asked for, under the history lock that the background fetch
holds too (so a git that asks while that fetch runs waits for it, and then finds everything
here). A widening walk would reach the missing commits itself: it waits until history is whole.

Should the helper fail, git goes on to the next promisor remote, origin, and fetches as asked: the widening
can cost a lazy fetch its speed, never its result.

It runs in the middle of a git command, so it starts fast: the standard library only, no
site-packages (-I -S), and of that only what the interpreter has loaded already (os, sys, io):
subprocess, re, dataclasses, typing and pathlib would cost 25 ms more than its whole start. It
runs git with posix_spawn, and git's own plumbing reads history.
"""
from __future__ import annotations

import io
import os
import sys

TYPE_CHECKING = False  # typing's own costs its import
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

HELPER_REMOTE = "artifactfs"
PROMISOR_OPTIONS = ("filter", "from-promisor", "progress", "verbosity")
HEX_DIGITS = frozenset("0123456789abcdef")
NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
NESTED = "ARTIFACTFS_LAZY_FETCH"  # set for the git the helper runs: it never asks the helper again
# In the git directory: while HISTORY_MARKER is there, history is incomplete; it names the missing
# commits ("missing <id>" lines) and, if any, a commit whose history is whole, to negotiate from
# ("tip <id>"). HISTORY_LOCK serialises the fetches that complete it. LAZY_FETCH_LOG has a line
# per fetch the helper made for git: "<objects asked> <objects fetched> <history 0|1>".
HISTORY_MARKER = "artifactfs-history"
HISTORY_SHALLOW = "artifactfs-shallow"  # the commits whose parents are missing (see shallow_args)
HISTORY_LOCK = "artifactfs-history.flock"  # an flock, held while it lives: no git lock file
LAZY_FETCH_LOG = "artifactfs-lazy-fetches"

# What git's own lazy fetch runs (promisor-remote.c), for many objects at once.
LAZY_FETCH_ARGS = (
    "-c", "fetch.negotiationAlgorithm=noop",
    "-c", "maintenance.auto=false",  # the mount consolidates packs itself (Hydrator._consolidate)
    "fetch", "origin",
    "--no-tags", "--no-write-fetch-head", "--recurse-submodules=no",
    "--filter=blob:none", "--stdin",
)  # fmt: skip


def is_object_id(text: str) -> bool:
    return len(text) in (40, 64) and HEX_DIGITS.issuperset(text)


def is_remote_name(text: str) -> bool:
    return bool(text) and text[0] not in "._-" and NAME_CHARACTERS.issuperset(text)


class Limits:
    small_request = 16  # a request of more objects is git batching: fetched as asked
    scan_commits = 50_000  # how far back to look for the commit that introduced a request
    path_versions = 1_000  # versions of the requested paths, at most
    next_commits = 64  # commits from the located one on whose changes come along
    total = 2_000  # objects in one widened request, at most


class Commit:
    __slots__ = ("oid", "changes")

    def __init__(self, oid: str) -> None:
        self.oid = oid
        self.changes: list[tuple[str, str, str]] = []  # (path, before, after)


def configure(git_dir: os.PathLike[str], python: str = sys.executable) -> bool:
    """Put the helper in front of the promisor remote of a partial clone; False (and nothing
    changed) for a git directory that is not one, True once it is there (already, or now).

    Its sections go at the top of the config file, before origin's, in one write under git's own
    lock (config.lock, then a rename): a reader sees the file before or after, never between, and
    it costs one git process, not a dozen `git config` calls. (extensions.partialClone would
    order the remotes too, but libgit2 refuses to open a repository that names an extension it
    does not know.)"""
    import shlex

    from ..gitstore import run_git

    out = run_git(["config", "--local", "-z", "--get-regexp", r"^remote\.(origin|artifactfs)\.(promisor|partialclonefilter)$"],
                  git_dir=git_dir, check=False).stdout  # fmt: skip
    found = dict(entry.partition("\n")[::2] for entry in out.decode("utf-8", "surrogateescape").split("\0") if entry)
    if found.get("remote.origin.promisor") != "true":
        return False
    if f"remote.{HELPER_REMOTE}.promisor" in found:
        return True  # put there by an earlier preparation
    blob_filter = found.get("remote.origin.partialclonefilter") or "blob:none"
    section = (f'[remote "{HELPER_REMOTE}"]\n\turl = {HELPER_REMOTE}::origin\n\tpromisor = true\n'
               f"\tpartialclonefilter = {config_value(blob_filter)}\n"
               f"[alias]\n\tremote-{HELPER_REMOTE} = {config_value(f'!{shlex.quote(python)} -I -S {shlex.quote(__file__)}')}\n")  # fmt: skip
    path = os.path.join(git_dir, "config")
    with open(path, "rb") as current:
        mode, text = os.fstat(current.fileno()).st_mode & 0o777, current.read()
    lock = path + ".lock"
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)  # as git's own lock: fails if held
    try:
        with os.fdopen(fd, "wb") as new:
            new.write(section.encode() + text)
            new.flush()
            os.fsync(new.fileno())
        os.rename(lock, path)
    except BaseException:
        os.unlink(lock)
        raise
    return True


def config_value(value: str) -> str:
    """`value` as a git config file holds it: quoted, with its backslashes and quotes escaped."""
    if "\n" in value or "\0" in value:
        raise ValueError(f"a git config value cannot hold a newline: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def git(git_dir: str | os.PathLike[str], *args: str) -> list[str]:
    """git with lazy fetching off (no promisor remote): what is missing is an error, never a
    fetch, and never a request to this helper again."""
    return ["git", f"--git-dir={git_dir}", "-c", f"remote.{HELPER_REMOTE}.promisor=false",
            "-c", "remote.origin.promisor=false", *args]  # fmt: skip


def commits(git_dir: str | os.PathLike[str], *revs: str) -> Iterator[Commit]:
    """Commits and the blobs each changed (against its first parent), newest first, as `git log
    --raw` writes them; trees only, never a blob. Stops where the history here ends."""
    args = git(git_dir, "-c", "core.quotePath=false", "log", "--no-renames", "--raw", "--no-abbrev", "--format=@%H", *revs)
    read_end, write_end = os.pipe()
    pid = spawn(args, stdout=write_end, quiet=True)  # a walk that fails costs the widening, silently
    os.close(write_end)
    current: Commit | None = None
    try:
        for raw in os.fdopen(read_end, "rb"):
            line = raw.decode("utf-8", "surrogateescape").rstrip("\n")
            if line.startswith("@"):
                if current is not None:
                    yield current
                current = Commit(line[1:])
            elif line.startswith(":") and current is not None:
                meta, _, path = line.partition("\t")
                fields = meta.split()
                if len(fields) >= 5 and not fields[0].endswith("160000") and fields[1] != "160000":
                    current.changes.append((path, fields[2], fields[3]))
        if current is not None:
            yield current
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def spawn(args: list[str], *, stdin: int | None = None, stdout: int | None = None, quiet: bool = False,
          env: dict[str, str] | None = None) -> int:  # fmt: skip
    """Start `args` with `stdin` and `stdout` (/dev/null if None); stderr stays git's unless
    `quiet`. Our own descriptors are not inherited (Python opens them close-on-exec)."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull if stdin is None else stdin, 0),
                   (os.POSIX_SPAWN_DUP2, devnull if stdout is None else stdout, 1)]  # fmt: skip
        if quiet:
            actions.append((os.POSIX_SPAWN_DUP2, devnull, 2))
        return os.posix_spawnp(args[0], args, os.environ if env is None else env, file_actions=actions)
    finally:
        os.close(devnull)


class Collector:
    """Object ids in order, once each (never a null id), up to a total."""

    def __init__(self, first: list[str], total: int) -> None:
        self.objects = list(first)
        self.seen = set(first)
        self.total = total

    @property
    def full(self) -> bool:
        return len(self.objects) >= self.total

    def add(self, oid: str) -> bool:
        if self.full or oid in self.seen or not oid.strip("0"):
            return False
        self.seen.add(oid)
        self.objects.append(oid)
        return True


# git's global options that take their value as the next argument (git.c, handle_options)
GIT_OPTIONS_WITH_VALUE = frozenset(("-c", "-C", "--git-dir", "--work-tree", "--namespace", "--exec-path",
                                    "--config-env", "--super-prefix", "--list-cmds", "--attr-source"))  # fmt: skip
WALKING_COMMANDS = frozenset(("log", "show", "whatchanged"))  # what reads each commit's changes in turn


class AskedWalk:
    """What the asking git's command line says of its walk: how many commits it reads at most
    (`log -20`, `-n 20`, `-n20`, `--max-count=20` or `--max-count 20`; the last one given counts,
    as in git), and whether it names nothing but options (so it walks from HEAD, every path)."""

    __slots__ = ("limit", "options_only")

    def __init__(self, limit: int | None, options_only: bool) -> None:
        self.limit = limit
        self.options_only = options_only


def git_subcommand(argv: list[str]) -> tuple[str, list[str]] | None:
    """The command of the git command line `argv` (after git's own options) and its arguments."""
    index = 1
    while index < len(argv) and argv[index].startswith("-"):  # git's own options, before the command
        index += 2 if argv[index] in GIT_OPTIONS_WITH_VALUE else 1
    return (argv[index], argv[index + 1:]) if index < len(argv) else None


def asked_walk(argv: list[str]) -> AskedWalk | None:
    """The walk of the git command `argv`, if it is a log (log, show, whatchanged); None if not."""
    command = git_subcommand(argv)
    if command is None or command[0] not in WALKING_COMMANDS:
        return None
    walk = AskedWalk(None, True)
    args = iter(command[1])
    for arg in args:
        if arg == "--" or not arg.startswith("-"):  # paths, or a revision
            walk.options_only = False
            break
        value: str | None = None
        if arg in ("-n", "--max-count"):
            value = next(args, None)
        elif arg.startswith("--max-count="):
            value = arg.partition("=")[2]
        elif arg.startswith("-n") or arg[1:].isdigit():
            value = arg[2:] if arg.startswith("-n") else arg[1:]
        if value is not None and value.isdigit():
            walk.limit = int(value) or None  # -0 and -n0 read nothing, and ask for nothing either
    return walk


# Commands that put another commit's tree in the index (by themselves, or as the `git reset
# --hard` that stash and others run). Once done, git repairs its cache of trees, which first
# fetches every blob of the index that is not here (cache_tree_update, prefetch_cache_entries).
TREE_MOVING_COMMANDS = frozenset(("checkout", "switch", "merge", "rebase", "cherry-pick", "revert", "pull", "am", "reset"))
PATH_WRITING_COMMANDS = TREE_MOVING_COMMANDS | {"restore"}  # when they do not move the tree
CHECKOUT_OPTIONS_WITH_VALUE = frozenset(("-b", "-B", "-c", "-C", "--orphan", "--conflict"))


def moves_the_tree(argv: list[str], is_commit: Callable[[str], bool]) -> bool:
    """Whether the git command `argv` moves the index to another tree (so that git will ask for
    every missing blob of the index next), rather than writing some paths: `checkout FILE`,
    `checkout REV -- PATH` and `reset REV PATH` write only those, and must not fetch the rest.
    `is_commit` tells whether a checkout's argument names a commit, as git decides it."""
    command = git_subcommand(argv)
    if command is None or command[0] not in TREE_MOVING_COMMANDS:
        return False
    name, args = command
    if "--" in args or any(arg.startswith("--pathspec-from-file") for arg in args):
        return False
    if name == "reset":
        return any(arg in ("--hard", "--merge", "--keep") for arg in args)
    if name != "checkout":
        return True
    positional: list[str] = []
    values = iter(args)
    for arg in values:
        if arg in CHECKOUT_OPTIONS_WITH_VALUE:
            next(values, None)
        elif arg == "-" or not arg.startswith("-"):
            positional.append(arg)
    return len(positional) <= 1 and all(is_commit("@{-1}" if arg == "-" else arg) for arg in positional)


def names_commit(git_dir: str | os.PathLike[str], rev: str) -> bool:
    """Whether `rev` names a commit here (or a branch of origin's, which checkout creates)."""
    for candidate in (rev, f"refs/remotes/origin/{rev}"):
        args = git(git_dir, "rev-parse", "-q", "--verify", "--end-of-options", f"{candidate}^{{commit}}")
        if os.waitstatus_to_exitcode(os.waitpid(spawn(args, quiet=True), 0)[1]) == 0:
            return True
    return False


def missing_blobs(git_dir: str | os.PathLike[str], rev: str = "HEAD") -> list[str]:
    """The blobs of `rev`'s tree that are not here, from its trees (all here in a blobless clone)."""
    args = git(git_dir, "rev-list", "--objects", "--missing=print", "--end-of-options", f"{rev}^{{tree}}")
    read_end, write_end = os.pipe()
    pid = spawn(args, stdout=write_end, quiet=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as listing:
        missing = [line[1:].decode().strip() for line in listing if line.startswith(b"?")]
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"rev-list of {rev}'s tree exited with {os.waitstatus_to_exitcode(status)}")
    return missing


def process_argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().decode("utf-8", "surrogateescape").split("\0")[:-1]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rpartition(b")")[2].split()[1])  # the name in parentheses may hold spaces


def asking_command(max_depth: int = 6) -> list[str] | None:
    """The command line of the git whose lazy fetch this is: the first of our ancestors above the
    fetch that git ran for it (`git fetch ... --stdin`, which runs `git remote-artifactfs`, which
    runs us through a shell). None where /proc cannot tell."""
    try:
        pid = os.getppid()
        seen_fetch = False
        for _ in range(max_depth):
            argv = process_argv(pid)
            if seen_fetch and argv and os.path.basename(argv[0]) == "git":
                return argv
            seen_fetch = seen_fetch or ("fetch" in argv and "--stdin" in argv)
            pid = parent_of(pid)
            if pid <= 1:
                return None
    except (OSError, ValueError, IndexError):
        return None
    return None


def widen(git_dir: str | os.PathLike[str], wants: list[str], limits: Limits = Limits(),
          walk: int | None = None, path_versions: bool = True) -> list[str]:  # fmt: skip
    """`wants`, then what the walk that asked for them will need next: `walk` commits at most,
    counting the one that asked (its asker's limit, asked_walk), or the Limits; and, unless
    `path_versions` is False (a limited log of the whole tree reads no version beyond the commits
    it walks), the older versions of the requested paths that a blame or `log -p PATH` reads."""
    wanted = list(dict.fromkeys(wants))
    if len(wanted) > limits.small_request:
        return wanted
    next_commits = min(limits.next_commits, walk or limits.next_commits)
    unlocated = set(wanted)
    paths: dict[str, None] = {}
    start: str | None = None
    following: list[Commit] = []
    for scanned, commit in enumerate(commits(git_dir, "HEAD", "--all")):
        for path, before, after in commit.changes:
            if before in unlocated or after in unlocated:
                unlocated.difference_update((before, after))
                paths.setdefault(path)
                start = start or commit.oid
        if start is not None:
            following.append(commit)
        if (not unlocated and len(following) >= next_commits) or scanned >= limits.scan_commits:
            break
    if start is None:
        return wanted
    more = Collector(wanted, limits.total)
    versions = 0
    bounded = [f"--max-count={walk}"] if walk is not None else []  # a limited log reads no further back
    for commit in commits(git_dir, *bounded, start, "--", *paths) if path_versions else []:  # every version of the paths, back
        for _, before, after in commit.changes:
            versions += more.add(after) + more.add(before)
        if versions >= limits.path_versions or more.full:
            break
    for commit in following[:next_commits]:  # what log -p reads next
        for _, before, after in commit.changes:
            more.add(before)
            more.add(after)
    return more.objects


class History:
    """The missing history of a git directory, as its marker names it."""

    __slots__ = ("missing", "tip")

    def __init__(self, missing: list[str], tip: str | None) -> None:
        self.missing = missing
        self.tip = tip

    def text(self) -> str:
        lines = [f"missing {oid}\n" for oid in self.missing]
        return "".join(lines) + (f"tip {self.tip}\n" if self.tip else "")


def pending_history(git_dir: str | os.PathLike[str]) -> History | None:
    """What the marker says is missing, or None: the history here is whole."""
    try:
        with open(os.path.join(git_dir, HISTORY_MARKER), encoding="utf-8") as marker:
            lines = marker.read().split("\n")
    except FileNotFoundError:
        return None
    missing, tip = [], None
    for line in lines:
        kind, _, oid = line.partition(" ")
        if not is_object_id(oid):
            continue
        if kind == "missing":
            missing.append(oid)
        elif kind == "tip":
            tip = oid
    return History(missing, tip)


def shallow_args(git_dir: str | os.PathLike[str]) -> list[str]:
    """git's options for a fetch of ours into `git_dir` while its history is missing: its
    boundary as the shallow file of that fetch alone. A fetch walks the local history from the
    refs (protocol v0 does, to tell the remote what is here), and a walk that reaches a missing
    parent lazily fetches it with a fetch that walks again: endlessly. Bounded there, it never
    reaches one. Git run in the mount sees no shallow file: the whole history, fetched when it
    walks it (complete_history)."""
    path = os.path.join(git_dir, HISTORY_SHALLOW)
    return ["--shallow-file", path] if os.path.exists(path) else []


def history_fetch_args(git_dir: str | os.PathLike[str], source: str, history: History) -> list[str]:
    """The fetch of the missing history: commits and trees of every commit reachable from the
    missing ones. With no commit to negotiate from, git's lazy-fetch command (no negotiation: a
    walk of our history would reach the missing commits); with one, negotiated from it alone, so
    that the remote sends only what that commit's history lacks."""
    if history.tip is None:
        fetch_args = LAZY_FETCH_ARGS
    else:
        start = LAZY_FETCH_ARGS.index("fetch")
        fetch_args = (*LAZY_FETCH_ARGS[2:start], *LAZY_FETCH_ARGS[start:], f"--negotiation-tip={history.tip}")
    return fetch_command(git_dir, source, fetch_args)


def fetch_command(git_dir: str | os.PathLike[str], source: str, fetch_args: tuple[str, ...] = LAZY_FETCH_ARGS) -> list[str]:
    """git running `fetch_args` in `git_dir` from `source` (origin's name or URL), bounded while
    the history is missing (shallow_args)."""
    return ["git", f"--git-dir={git_dir}", *shallow_args(git_dir), *(arg if arg != "origin" else source for arg in fetch_args)]


def run_fetch(args: list[str], objects: list[str]) -> None:
    """Run a fetch of `objects` by id (on its standard input); OSError if it fails."""
    env = {**os.environ, NESTED: "1", "GIT_TERMINAL_PROMPT": "0"}
    read_end, write_end = os.pipe()
    pid = spawn(args, stdin=read_end, env=env)
    os.close(read_end)
    with os.fdopen(write_end, "wb") as requests:
        requests.write("".join(f"{oid}\n" for oid in objects).encode())
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"{' '.join(args[2:4])} exited with {os.waitstatus_to_exitcode(status)}")


def history_lock(git_dir: str | os.PathLike[str]) -> int | None:
    """Hold the history lock (waiting for whoever holds it); its descriptor, or None when this
    user cannot open it (git run by another user: it goes on unserialised)."""
    try:
        fd = os.open(os.path.join(git_dir, HISTORY_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    os.lockf(fd, os.F_LOCK, 0)
    return fd


def complete_history(git_dir: str | os.PathLike[str], source: str = "origin", wants: list[str] | None = None) -> bool:
    """Fetch the missing history, and `wants` with it, in one transaction; drop the marker once
    it is whole. False if there was none to fetch (whole already, or made whole by whoever held
    the lock before us): `wants` are then still to fetch."""
    lock = history_lock(git_dir)
    try:
        history = pending_history(git_dir)
        if history is None:
            return False
        run_fetch(history_fetch_args(git_dir, source, history), [*history.missing, *(wants or [])])
        # The fetch succeeded: the remote sent the closure of the missing commits (their
        # commits and trees), so the history is whole. (artifactfs/history.py checks it again.)
        # The marker first: a fetch bounded by a boundary no longer missing anything is harmless.
        for name in (HISTORY_MARKER, HISTORY_SHALLOW):
            try:
                os.unlink(os.path.join(git_dir, name))
            except FileNotFoundError:
                pass
        return True
    finally:
        if lock is not None:
            os.close(lock)


def note_lazy_fetch(git_dir: str | os.PathLike[str], asked: int, fetched: int, history: bool) -> None:
    """One line for `status` (what git's own lazy fetches cost); never fails the fetch."""
    try:
        fd = os.open(os.path.join(git_dir, LAZY_FETCH_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    try:
        os.write(fd, f"{asked} {fetched} {int(history)}\n".encode())
    finally:
        os.close(fd)


def plan(git_dir: str | os.PathLike[str], wants: list[str], asker: list[str]) -> list[str]:
    """What to fetch for `wants`, asked for by the git command `asker`. A command that moves the
    index to another tree asks first for the files it writes, then for every other blob of the
    index that is not here (see TREE_MOVING_COMMANDS): both in one transaction. The index it
    moves to holds the blobs of HEAD's tree that stay, and the ones it writes, which it asks for."""
    if moves_the_tree(asker, lambda rev: names_commit(git_dir, rev)):
        return list(dict.fromkeys([*wants, *missing_blobs(git_dir, "HEAD")]))
    command = git_subcommand(asker)
    if command is not None and command[0] in PATH_WRITING_COMMANDS:
        return wants  # `checkout REV -- PATH`: those paths, not the history around them
    walk = asked_walk(asker)
    if walk is not None and walk.limit is not None:
        return widen(git_dir, wants, walk=walk.limit, path_versions=not walk.options_only)
    return widen(git_dir, wants)


def fetch(git_dir: str | os.PathLike[str], source: str, wants: list[str]) -> None:
    """Fetch `wants`, widened, from `source` in one transaction; as asked if widening fails. While
    history is incomplete, the history comes first, with `wants`, in that one transaction."""
    if pending_history(git_dir) is not None:
        if complete_history(git_dir, source, wants):
            note_lazy_fetch(git_dir, len(wants), len(wants), True)
        # Else the history came while we waited for it (the worker's fetch): what git asked for
        # is in it, a walk's missing commit. Planning a widened fetch would walk the history
        # just fetched, for nothing; anything still missing git fetches from origin, as asked.
        return
    try:
        objects = plan(git_dir, wants, asking_command() or [])
    except Exception:  # noqa: BLE001 (a plan is an optimisation: the request itself must go on)
        objects = wants
    run_fetch(fetch_command(git_dir, source), objects)
    note_lazy_fetch(git_dir, len(wants), len(objects), False)


def serve(source: str, git_dir: str | os.PathLike[str], stdin: io.TextIOBase, stdout: io.TextIOBase) -> int:
    """The helper's side of gitremote-helpers(7), `fetch` capability only."""
    wants: list[str] = []
    for raw in stdin:
        line = raw.rstrip("\n")
        if line == "capabilities":
            stdout.write("fetch\noption\n\n")
        elif line.startswith("option "):
            name = line.split(" ", 2)[1]
            stdout.write("ok\n" if name in PROMISOR_OPTIONS else "unsupported\n")
        elif line.startswith("list"):
            stdout.write("\n")  # no refs: git asks for objects by id
        elif line.startswith("fetch "):
            oid = line.split(" ")[1]
            if not is_object_id(oid):
                raise ValueError(f"not an object id: {oid!r}")
            wants.append(oid)
            continue
        elif line == "":
            if not wants:
                return 0  # git has nothing more to ask
            fetch(git_dir, source, wants)
            wants = []
            stdout.write("\n")
        else:
            raise ValueError(f"unknown command {line!r}")
        stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if os.environ.get(NESTED):
        return 1  # asked again from within its own fetch: let git go on to origin
    if len(args) != 2 or not is_remote_name(args[1]):
        print("usage: git remote-artifactfs <remote> artifactfs::<promisor remote>", file=sys.stderr)
        return 1
    git_dir = os.environ.get("GIT_DIR", ".git")
    try:
        return serve(args[1], git_dir, sys.stdin, sys.stdout)
    except Exception as exc:  # noqa: BLE001 (git then asks the next promisor remote)
        print(f"artifactfs remote helper: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # git waits on this process: skip the interpreter's teardown (a few ms)
