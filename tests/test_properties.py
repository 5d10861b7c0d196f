"""Random sequences of file operations, applied to a mount and to a plain directory holding the
same tree, give the same outcome (success, or the same errno) and leave the same tree after every
step: paths, kinds, contents, link targets and the executable bit. One step may kill the mount
process (SIGKILL, after which mountd mounts it again): nothing acknowledged may be lost.

Hypothesis draws the sequences (a stateful machine) and shrinks a failing one to the shortest it
can find. Derandomized, with no example database: CI runs the same sequences every time.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .conftest import Artifactfs, sample_mounted, wait_until
from .gitremote import SampleRepo

NAMES = ["a", "b", "c.txt", "app.py", "lib", "README.md"]  # new names and some the sample has
CONTENTS = st.binary(max_size=64)
Tree = dict[str, tuple[str, bytes, bool]]


def snapshot(root: Path) -> Tree:
    """Every path under `root` but the top .git: kind, content (a link's target), executable."""
    found: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            filenames = [f for f in filenames if f != ".git"]
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            rel = str(rel_dir / name)
            if stat.S_ISLNK(mode):
                found[rel] = ("link", os.readlink(path).encode(), False)
            elif stat.S_ISDIR(mode):
                found[rel] = ("dir", b"", False)
            else:
                found[rel] = ("file", path.read_bytes(), bool(mode & stat.S_IXUSR))
    return found


def copy_tree(source: Path, target: Path) -> None:
    """A plain copy of a tree (links as links, the executable bit kept), without the top .git."""
    target.mkdir()
    for rel, (kind, content, executable) in snapshot(source).items():
        path = target / rel
        if kind == "dir":
            path.mkdir()
        elif kind == "link":
            os.symlink(content, path)
        else:
            path.write_bytes(content)
            os.chmod(path, 0o755 if executable else 0o644)


def restore(root: Path, wanted: Tree) -> None:
    """Make the tree under `root` show `wanted` again, through ordinary file operations."""
    current = snapshot(root)
    for rel in sorted(current, reverse=True):  # deepest first
        path = root / rel
        if not os.path.lexists(path) or (rel in wanted and wanted[rel][0] == current[rel][0] == "dir"):
            continue
        if current[rel][0] == "dir":
            shutil.rmtree(path)
        elif current[rel] != wanted.get(rel):
            path.unlink()
    for rel, (kind, content, executable) in sorted(wanted.items()):
        path = root / rel
        if os.path.lexists(path):
            continue
        if kind == "dir":
            path.mkdir()
        elif kind == "link":
            os.symlink(content, path)
        else:
            path.write_bytes(content)
            os.chmod(path, 0o755 if executable else 0o644)


def outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory, sample: SampleRepo) -> Iterator[tuple[Artifactfs, Path]]:
    with sample_mounted(tmp_path_factory.mktemp("properties"), sample) as (afs, mnt):
        yield afs, mnt


def test_file_operations_match_a_plain_directory(mounted: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    afs, mnt = mounted
    untouchable = {"vendor/sub", *(f"vendor/sub/{n}" for n in NAMES)}  # a submodule's place is not ours
    commit = snapshot(mnt)  # what the mount showed before any example

    class Machine(RuleBasedStateMachine):
        """The mount against a plain copy of the commit. The overlay outlives examples: each
        begins by making the mount show the commit again (hypothesis replays examples while it
        shrinks, and must find the same tree to draw the same paths)."""

        @initialize()
        def begin(self) -> None:
            restore(mnt, commit)
            self.scratch = Path(tempfile.mkdtemp(prefix="artifactfs-props-"))
            self.plain = self.scratch / "plain"
            copy_tree(mnt, self.plain)
            assert snapshot(self.plain) == commit
            self.restarted = False

        def teardown(self) -> None:
            shutil.rmtree(self.scratch, ignore_errors=True)

        # --- drawing paths from what exists ---

        def directories(self) -> list[str]:
            tree = snapshot(self.plain)
            return ["", *(p for p, (kind, _, _) in tree.items() if kind == "dir" and p not in untouchable)]

        def entries(self) -> list[str]:
            return [p for p in snapshot(self.plain) if p not in untouchable]

        def new_path(self, data: st.DataObject) -> str:
            directory = data.draw(st.sampled_from(self.directories()), label="in")
            return f"{directory}/{data.draw(st.sampled_from(NAMES), label='name')}".lstrip("/")

        def any_path(self, data: st.DataObject) -> str:
            """An entry that exists, mostly; sometimes a new name (ENOENT must match too)."""
            existing = self.entries()
            if existing and data.draw(st.integers(0, 3), label="existing") > 0:
                return data.draw(st.sampled_from(existing), label="path")
            return self.new_path(data)

        def both(self, action: Callable[[Path], object]) -> None:
            results = [outcome(lambda root=root: action(root)) for root in (self.plain, mnt)]  # type: ignore[misc]
            assert results[0] == results[1], f"plain directory: {results[0]}, mount: {results[1]}"

        # --- the operations ---

        @rule(data=st.data(), content=CONTENTS, append=st.booleans())
        def write(self, data: st.DataObject, content: bytes, append: bool) -> None:
            path = self.any_path(data)

            def act(root: Path) -> None:
                with open(root / path, "ab" if append else "wb") as fh:
                    fh.write(content)

            self.both(act)

        @rule(data=st.data(), size=st.integers(0, 200))
        def truncate(self, data: st.DataObject, size: int) -> None:
            path = self.any_path(data)
            self.both(lambda root: os.truncate(root / path, size))

        @rule(data=st.data(), offset=st.integers(0, 300), content=CONTENTS)
        def write_at(self, data: st.DataObject, offset: int, content: bytes) -> None:
            """A write anywhere, past the end too (a sparse hole in between)."""
            path = self.any_path(data)

            def act(root: Path) -> None:
                fd = os.open(root / path, os.O_WRONLY)
                try:
                    os.pwrite(fd, content, offset)
                finally:
                    os.close(fd)

            self.both(act)

        @rule(data=st.data())
        def mkdir(self, data: st.DataObject) -> None:
            path = self.new_path(data)
            self.both(lambda root: os.mkdir(root / path))

        @rule(data=st.data())
        def rmdir(self, data: st.DataObject) -> None:
            path = self.any_path(data)
            self.both(lambda root: os.rmdir(root / path))

        @rule(data=st.data())
        def unlink(self, data: st.DataObject) -> None:
            path = self.any_path(data)
            self.both(lambda root: os.unlink(root / path))

        @rule(data=st.data())
        def rename(self, data: st.DataObject) -> None:
            """Files and whole directories, to new names and over existing ones, across directories."""
            old = self.any_path(data)
            new = self.any_path(data) if data.draw(st.booleans(), label="over") else self.new_path(data)
            self.both(lambda root: os.rename(root / old, root / new))

        @rule(data=st.data(), link_to=st.sampled_from(["a", "../README.md", "lib", "missing"]))
        def symlink(self, data: st.DataObject, link_to: str) -> None:
            path = self.new_path(data)
            self.both(lambda root: os.symlink(link_to, root / path))

        @rule(data=st.data(), executable=st.booleans())
        def chmod(self, data: st.DataObject, executable: bool) -> None:
            path = self.any_path(data)
            if (self.plain / path).is_symlink():
                return  # chmod follows links: the plain copy's may point outside it
            self.both(lambda root: os.chmod(root / path, 0o755 if executable else 0o644))

        @precondition(lambda self: not self.restarted)
        @rule()
        def restart(self) -> None:
            """SIGKILL the mount process: what was acknowledged is in the overlay already. A new
            mountd mounts it again (the running one would wait out its crash-loop backoff)."""
            self.restarted = True
            server = afs.wait_mount_process("sample")
            afs.stop_daemon(afs.daemons[-1])
            os.kill(server, signal.SIGKILL)
            afs.start_daemon()
            wait_until(lambda: afs.mount_process("sample") not in (None, server), 30, what="mountd to remount")
            afs.wait_mounted("sample")
            wait_until(lambda: outcome(lambda: os.listdir(mnt)) == "ok", 30, what="the remounted tree")

        @invariant()
        def same_tree(self) -> None:
            if hasattr(self, "plain"):
                assert snapshot(mnt) == snapshot(self.plain)

    Machine.TestCase.settings = settings(
        max_examples=20, stateful_step_count=30, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )  # fmt: skip
    Machine.TestCase().runTest()
