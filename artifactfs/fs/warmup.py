"""The warm-up: what git status reads first, brought into the kernel's caches before git asks.

git status in a mount whose untracked cache is valid opens each directory's recorded .gitignore
and looks for a .gitattributes beside it, and nothing else of the tree. On a fresh mount each of
those names costs the kernel a LOOKUP round trip per path component on top of the OPEN, and the
first status takes about three times the second. Once a commit is shown, a thread of the mount
process does those lookups and opens itself, through the mount: the kernel then holds the
entries, the attributes and (TreeFS._store_pages) the pages, and the first status costs what the
second does.

It reads only blobs the git directory holds (preparation fetched them), so it never fetches. It
stops when the mount shows another commit or goes away, and whatever fails costs the one name.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pygit2

log = logging.getLogger("artifactfs.mount")

IGNORE, ATTRIBUTES, MODULES = ".gitignore", ".gitattributes", ".gitmodules"
# A bound on the trees walked (all trees are local, but a huge repository is no reason to spend
# seconds of a core at every mount); the directories past it are simply left cold.
TREES_LIMIT = 50_000
# The mount is gone: nothing more can be warmed.
GONE = frozenset({errno.ENOTCONN, errno.ENODEV, errno.ESHUTDOWN})


@dataclass(frozen=True)
class Plan:
    """Paths relative to the mount root: files to open (present in the git directory) and names
    to look up, present or not (the kernel caches an absence too)."""

    opens: list[str] = field(default_factory=list)
    looks: list[str] = field(default_factory=list)


@dataclass
class Warmed:
    opened: int = 0
    looked_up: int = 0
    seconds: float = 0.0
    done: bool = False


def plan(repo: pygit2.Repository, tree: pygit2.Tree, trees_limit: int = TREES_LIMIT) -> Plan:
    """What a status reads of `tree`, in the order git reads it:
    - in every directory that holds a .gitignore, or is on the way to one, the .gitignore and
      the .gitattributes (present or not), parents before children, and the top's .gitmodules;
    - every submodule's path and the .git in it (git looks at submodules at every status)."""
    wanted: dict[str, pygit2.Tree] = {}
    submodules: list[str] = []
    walked = 0

    def walk(directory: pygit2.Tree, prefix: str) -> bool:
        nonlocal walked
        walked += 1
        wants = IGNORE in directory
        for entry in directory:
            if entry.filemode == pygit2.GIT_FILEMODE_COMMIT:
                submodules.append(f"{prefix}{entry.name}")
            elif entry.type_str == "tree" and walked < trees_limit:
                sub = repo[entry.id]
                assert isinstance(sub, pygit2.Tree)
                wants = walk(sub, f"{prefix}{entry.name}/") or wants
        if wants:
            wanted[prefix] = directory
        return wants

    walk(tree, "")
    wanted.setdefault("", tree)
    result = Plan()
    for prefix in sorted(wanted, key=lambda p: (p.count("/"), p)):
        names = (IGNORE, ATTRIBUTES, MODULES) if prefix == "" else (IGNORE, ATTRIBUTES)
        for name in names:
            _place(repo, wanted[prefix], name, prefix + name, result)
    for path in submodules:
        result.looks.extend((path, f"{path}/.git"))
    return result


def _place(repo: pygit2.Repository, directory: pygit2.Tree, name: str, path: str, into: Plan) -> None:
    if name not in directory:
        # git looks for a .gitattributes in each such directory; a .gitignore the untracked
        # cache knows to be absent it does not look for.
        if name == ATTRIBUTES:
            into.looks.append(path)
        return
    entry = directory[name]
    # A blob the git directory lacks would be fetched by the open: leave it to whoever needs it.
    if entry.type_str == "blob" and entry.filemode != pygit2.GIT_FILEMODE_LINK and entry.id in repo:
        into.opens.append(path)


class WarmUp:
    """One warm-up of one commit shown, run by a thread of its own."""

    def __init__(self, mount_path: Path, git_dir: Path, commit: str, still_shown: Callable[[], bool]) -> None:
        self.mount_path = mount_path
        self.git_dir = git_dir
        self.commit = commit
        self.still_shown = still_shown  # False once the mount shows another commit
        self.warmed = Warmed()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="artifactfs-warm-up", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # Never joined from the mount's own loop: the thread may be inside a call that loop serves.
        self._stop.set()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            repo = pygit2.Repository(str(self.git_dir))  # its own: pygit2 objects are not shared across threads
            commit = repo[self.commit]
            assert isinstance(commit, pygit2.Commit)
            self._touch(plan(repo, commit.tree))
        except Exception as exc:  # a help, never a reason to trouble the mount
            log.warning("%s: warm-up stopped: %s: %s", self.mount_path, type(exc).__name__, exc)
        self.warmed.seconds = round(time.perf_counter() - start, 3)
        self.warmed.done = True
        log.info("%s: warmed %d files and %d absent names in %.3f s", self.mount_path, self.warmed.opened,
                 self.warmed.looked_up, self.warmed.seconds)  # fmt: skip

    def _touch(self, todo: Plan) -> None:
        root = str(self.mount_path)
        for path in todo.opens:
            if not self._go_on():
                return
            if self._try(lambda: os.close(os.open(os.path.join(root, path), os.O_RDONLY | os.O_NOFOLLOW))):
                self.warmed.opened += 1
        for path in todo.looks:
            if not self._go_on():
                return
            if self._try(lambda: os.lstat(os.path.join(root, path)), absent_too=True):
                self.warmed.looked_up += 1

    def _go_on(self) -> bool:
        return not self._stop.is_set() and self.still_shown()

    def _try(self, call: Callable[[], object], absent_too: bool = False) -> bool:
        """Whether `call` returned (or, `absent_too`, found nothing there). Any other failure
        (the name changed in the overlay since, an I/O error) costs this name; a mount gone ends
        the warm-up."""
        try:
            call()
            return True
        except OSError as exc:
            if exc.errno in GONE:
                self._stop.set()
            return absent_too and exc.errno == errno.ENOENT
