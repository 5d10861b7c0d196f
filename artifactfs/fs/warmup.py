"""The warm-up: the names git status looks up, brought into the kernel's caches before git asks.

git status in a mount whose untracked cache is valid opens each directory's recorded .gitignore
and looks for a .gitattributes beside it, and reads nothing else of the tree. On a fresh mount
each of those names costs a LOOKUP round trip per path component on top of the OPEN, and the
first status took three times the second. Once a commit is shown, a small process (touch.py)
looks those names up through the mount: the kernel then holds the entries, their attributes and
the absences, and the first status costs about what the second does.

It only looks names up, never opens or reads, and leaves out files whose blobs are not here, so
it fetches nothing and duplicates nothing of a status that runs beside it: it goes through the
names in the reverse of git's order, and the two meet halfway. It is cancelled when the mount
shows another commit, closes or fails its gate, or goes away; a name that fails costs that name.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pygit2
import trio

from .untracked_cache import PER_DIRECTORY_EXCLUDES, Directory, tree_of_directories

log = logging.getLogger("artifactfs.mount")

IGNORE, ATTRIBUTES, MODULES = PER_DIRECTORY_EXCLUDES, b".gitattributes", b".gitmodules"
# A bound on the trees walked (all trees are local, but a huge repository is no reason to spend
# seconds of a core at every mount); the directories past it are simply left cold.
TREES_LIMIT = 50_000
TOUCH_SCRIPT = Path(__file__).with_name("touch.py")


@dataclass
class Warmed:
    looked_up: int = 0  # names the kernel now holds, there or not
    seconds: float = 0.0
    done: bool = False


def plan(repo: pygit2.Repository, tree: pygit2.Tree, trees_limit: int = TREES_LIMIT) -> list[bytes]:
    """The names a status looks up in `tree`, relative to the top, in git's order:
    - in every directory whose .gitignore the untracked cache records (the tree preparation
      writes it from, untracked_cache.py), or that is on the way to one, that .gitignore and the
      .gitattributes (there or not), parents before children; and the top's .gitmodules;
    - every submodule's path and the .git in it (git looks at submodules at every status).
    A file whose blob the git directory lacks is left out: the kernel may ask for its attributes,
    and they would fetch it. So is a name no checkout could have (`..`, one with a slash)."""
    directories: list[bytes] = []
    gitignores: dict[bytes, bytes] = {}  # raw ids by directory, as the untracked cache takes them
    files: dict[bytes, pygit2.Oid] = {}  # the rule files there are, by path
    submodules: list[bytes] = []
    pending = [(tree, b"")]
    while pending and len(directories) < trees_limit:
        directory, path = pending.pop()
        directories.append(path)
        for entry in directory:
            name = os.fsencode(entry.name)
            if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
                continue
            child = path + b"/" + name if path else name
            if entry.filemode == pygit2.GIT_FILEMODE_COMMIT:
                submodules.append(child)
            elif entry.type_str == "tree":
                sub = repo[entry.id]
                assert isinstance(sub, pygit2.Tree)
                pending.append((sub, child))
            elif name in (IGNORE, ATTRIBUTES) or (name == MODULES and not path):
                files[child] = entry.id
                if name == IGNORE:
                    gitignores[path] = entry.id.raw
    wanted: list[bytes] = []

    def keep(directory: Directory, path: bytes) -> bool:
        kept = directory.recorded_gitignore is not None
        for name, child in directory.children.items():
            kept = keep(child, path + b"/" + name if path else name) or kept
        if kept:
            wanted.append(path)
        return kept

    keep(tree_of_directories(directories, gitignores, submodules), b"")
    names = []
    for path in sorted({b"", *wanted}, key=lambda p: (p.count(b"/"), p)):
        prefix = path + b"/" if path else b""
        if path in gitignores:
            names.append(prefix + IGNORE)
        names.append(prefix + ATTRIBUTES)  # there or not
    names.append(MODULES)
    names = [name for name in names if name not in files or files[name] in repo]
    for path in submodules:
        names.extend((path, path + b"/.git"))
    return names


class WarmUp:
    """One warm-up of one commit shown. The plan is made in a worker thread, and the lookups run
    in a process of their own, whose calls the mount's loop answers like anyone's: a thread of
    this process took 2.5 times as long, contending for the interpreter with that very loop."""

    def __init__(self, mount_path: Path, git_dir: Path, commit: str) -> None:
        self.mount_path = mount_path
        self.git_dir = git_dir
        self.commit = commit
        self.warmed = Warmed()
        self._scope = trio.CancelScope()

    def cancel(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        start = time.perf_counter()
        with self._scope:
            try:
                names = await trio.to_thread.run_sync(self._plan)
                self.warmed.looked_up = await self._look_up(names)
            except Exception as exc:  # a help, never a reason to trouble the mount
                log.warning("%s: warm-up stopped: %s: %s", self.mount_path, type(exc).__name__, exc)
        self.warmed.seconds = round(time.perf_counter() - start, 3)
        self.warmed.done = True
        log.info("%s: warmed %d names in %.3f s", self.mount_path, self.warmed.looked_up, self.warmed.seconds)

    def _plan(self) -> list[bytes]:
        repo = pygit2.Repository(str(self.git_dir))  # its own: pygit2 objects stay in the thread that made them
        commit = repo[self.commit]
        assert isinstance(commit, pygit2.Commit)
        return plan(repo, commit.tree)

    async def _look_up(self, names: list[bytes]) -> int:
        payload = b"".join(name + b"\0" for name in reversed(names))  # see the module's doc
        # -I -S and no environment: the script needs os and sys alone.
        proc = await trio.run_process([sys.executable, "-I", "-S", str(TOUCH_SCRIPT), str(self.mount_path)],
                                      stdin=payload, capture_stdout=True, capture_stderr=True, check=False,
                                      env={})  # fmt: skip
        if proc.returncode != 0 or not proc.stdout.strip().isdigit():
            raise RuntimeError(f"touch.py exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
        return int(proc.stdout)
