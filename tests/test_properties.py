"""The mounted tree behaves as a plain directory: random sequences of file operations, applied to
a mount and to a plain checkout of the same commit, give the same outcome step by step (success,
or the same errno) and leave the same tree (paths, kinds, contents, permission bits, symlink
targets), across restarts of the mount process too.

Hypothesis drives the sequences (a rule-based state machine) and shrinks a failing one to a short
reproduction, printed as the calls that make it.
"""
from __future__ import annotations

import enum
import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from artifactfs.config import Settings
from artifactfs.mounts import fuse_mounts

from .conftest import Artifactfs, process_gone, sample_mounted, wait_until
from .gitremote import SampleRepo
from .test_writes import RENAME_NOREPLACE, renameat2

NAME = "sample"

# Names new entries get: some are new everywhere, some are taken in a directory of the base
# commit (README.md and docs at the root, app.py and lib in src), so creates, mkdirs and renames
# also land on existing entries.
NAMES = ("a", "b", "c", "new.txt", "README.md", "app.py", "lib", "docs")
# Symbolic link targets: names in the link's own directory (a link never leads out of the tree,
# so a write through it lands in both trees alike), existing or dangling, and a loop (".").
LINK_TARGETS = (*NAMES, ".")
MODES = (0o644, 0o755, 0o600, 0o700)  # the executable bit on and off
CONTENT = st.binary(max_size=64)

# Every example costs a reset of the mount (about a second), a whole-tree comparison after every
# step, and a clean restart at its end (about a second). A crash of the mount process costs
# more (mountd notices it, backs off half a second, then mounts anew), so only about one example
# in two may have one. A whole run takes about a minute.
MAX_RESTARTS = 1  # clean restarts or crashes in one example, besides the one at its end
MAX_CRASHES = 1
SETTINGS = settings(
    max_examples=12,
    stateful_step_count=30,
    deadline=None,  # FUSE round trips and remounts on a shared machine: no per-step deadline
    # derandomize: a fixed seed, so every run of the same code (and CI) tries the same sequences
    # (Hypothesis also mixes in constants it finds in the project's modules, so a change there
    # may shift them); database=None: no example database is written into the checkout.
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)


class EntryKind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    LINK = "link"
    OTHER = "other"  # a device, socket or fifo: neither tree should ever have one


class Write(enum.Enum):
    """The ways the write rule changes a file's content."""

    REPLACE = "replace"  # open with O_CREAT | O_TRUNC, then write: a new file, or a copy-up of nothing
    APPEND = "append"
    TRUNCATE = "truncate"  # to a random size, growing it too (a sparse tail)
    PAST_END = "past the end"  # a write past the end: a sparse hole before what is written


@dataclass(frozen=True)
class Entry:
    """What one path is: its kind, and its permission bits and content, or its link target.
    Times are not compared (a copy-up or a restart may keep them otherwise than a disk does)."""

    kind: EntryKind
    mode: int = 0  # permission bits (of a file or directory), or the type bits of OTHER
    content: bytes = b""
    target: str = ""

    def describe(self) -> str:
        if self.kind is EntryKind.FILE:
            digest = hashlib.sha256(self.content).hexdigest()[:12]
            shown = repr(self.content) if len(self.content) <= 80 else f"{len(self.content)} bytes, sha256 {digest}"
            return f"file {self.mode:o} {shown}"
        if self.kind is EntryKind.LINK:
            return f"link -> {self.target}"
        return f"{self.kind.value} {self.mode:o}"


def tree(root: Path, *, contents: bool = True) -> dict[str, Entry]:
    """Every path under `root` but the root's .git, without following links (files' contents
    read only if `contents`)."""
    found: dict[str, Entry] = {}

    def visit(rel: str) -> None:
        with os.scandir(root / rel if rel else root) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            path = f"{rel}/{name}" if rel else name
            if path == ".git":
                continue
            mode = os.lstat(root / path).st_mode
            if stat.S_ISLNK(mode):
                found[path] = Entry(EntryKind.LINK, target=os.readlink(root / path))
            elif stat.S_ISDIR(mode):
                found[path] = Entry(EntryKind.DIR, stat.S_IMODE(mode))
                visit(path)
            elif stat.S_ISREG(mode):
                content = (root / path).read_bytes() if contents else b""
                found[path] = Entry(EntryKind.FILE, stat.S_IMODE(mode), content)
            else:
                found[path] = Entry(EntryKind.OTHER, stat.S_IFMT(mode))

    visit("")
    return found


def differences(mount: dict[str, Entry], plain: dict[str, Entry]) -> list[str]:
    lines = []
    for path in sorted(mount.keys() | plain.keys()):
        ours, theirs = mount.get(path), plain.get(path)
        if ours != theirs:
            lines.append(f"{path}: mount {ours.describe() if ours else 'absent'}, "
                         f"plain {theirs.describe() if theirs else 'absent'}")  # fmt: skip
    return lines


def outcome(action: Callable[[], object]) -> str:
    """"ok", or the name of the errno the action failed with."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def write_file(path: Path, flags: int, content: bytes) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)


def write_past_end(path: Path, gap: int, content: bytes) -> None:
    """Write `content` `gap` bytes past the end of an existing file: a sparse hole before it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, content, os.fstat(fd).st_size + gap)
    finally:
        os.close(fd)


def fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Mounted:
    """The module's mount, its mountd, and the checkout every example's plain tree copies."""

    afs: Artifactfs
    mnt: Path
    checkout: Path
    scratch: Path
    gitlinks: dict[str, str]

    @property
    def overlay_dir(self) -> Path:
        # Only the path helper is wanted: the other settings do not matter to it.
        return Settings(root=self.afs.root, database_url="", mount_root=self.afs.mount_root,
                        redis_url=None, host=self.afs.env["ARTIFACTFS_HOST"]).overlay_dir(NAME)  # fmt: skip

    def wait_served(self) -> None:
        """Until the mount shows the commit (until then its gate holds every lookup)."""
        wait_until(lambda: os.path.lexists(self.mnt / ".git"), 60, what="the mount to show the commit")

    def stop_services(self) -> None:
        """What `artifactfs down` does to the mount: mountd stops, the mount process unmounts and
        exits (SIGTERM: a clean stop, as an unmount is)."""
        for daemon in list(self.afs.daemons):
            self.afs.stop_daemon(daemon)
        pid = self.afs.mount_process(NAME)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: process_gone(pid), 30, what="the mount process to exit")
        wait_until(lambda: str(self.mnt) not in fuse_mounts(), 30, what=f"{self.mnt} to be unmounted")

    def start_services(self) -> None:
        """What `artifactfs up` does: a new mountd, which mounts the repository anew."""
        self.afs.start_daemon()
        self.mnt = self.afs.wait_mounted(NAME, timeout=60)
        self.wait_served()

    def reset(self) -> None:
        """Bring the mount back to the bare commit: the overlay emptied, a new mount process."""
        self.stop_services()
        shutil.rmtree(self.overlay_dir, ignore_errors=True)
        self.start_services()

    def crash(self) -> None:
        """SIGKILL the mount process; wait until the running mountd has mounted it anew."""
        pid = self.afs.wait_mount_process(NAME)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: self.afs.mount_process(NAME) not in (None, pid), 60, what="mountd to remount")
        self.mnt = self.afs.wait_mounted(NAME, timeout=60)
        self.wait_served()


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory, sample: SampleRepo) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp("properties")
    checkout = base / "checkout"
    subprocess.run(["git", "clone", "-q", sample.url, str(checkout)], check=True, capture_output=True)
    shutil.rmtree(checkout / ".git")
    scratch = base / "plain"
    scratch.mkdir()
    # Hypothesis caches what it learns of the source (constants) in a directory of its own: under
    # this test's temporary directory, not in the checkout.
    set_hypothesis_home_dir(base / "hypothesis")
    with sample_mounted(base / "installation", sample) as (afs, mnt):
        assert len(sample.gitlinks) == 1, "the machine follows one gitlink"
        try:
            yield Mounted(afs, mnt, checkout, scratch, sample.gitlinks)
        finally:
            set_hypothesis_home_dir(None)


class MountMatchesPlainDirectory(RuleBasedStateMachine):
    """One example: a fresh mount of the sample commit and a fresh copy of its checkout, then a
    sequence of operations applied to both."""

    mounted: Mounted  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        # Each example starts from the bare commit in both trees. The overlay persists across
        # examples, so the mount is reset (overlay emptied, remounted) rather than copied: a
        # copy of whatever an earlier example left would differ from run to run, and Hypothesis
        # could not replay, and so not shrink, a failing sequence; starting from the commit, a
        # sequence means the same operations on the same tree every time it is run. The plain
        # tree is a git checkout of that commit, so the first comparison checks the base too.
        self.mounted.reset()
        self.plain = Path(tempfile.mkdtemp(dir=self.mounted.scratch))
        shutil.copytree(self.mounted.checkout, self.plain, symlinks=True, dirs_exist_ok=True)
        self.restarts = 0
        self.crashes = 0
        self.may_crash = False
        self.changes = 0  # operations that succeeded since the last restart
        self.verified = True  # the trees matched after the last step
        self.written: set[str] = set()  # paths written since the last restart, to fsync
        # Where the sample's gitlink is now: it moves along when a directory above it is renamed.
        self.gitlink = next(iter(self.mounted.gitlinks))

    def teardown(self) -> None:
        """Restart once more and compare: what the tree shows after every step is partly the
        mount process's memory, and what the overlay recorded must come back the same. Every
        example ends so, not only those that drew a restart: with a crash if it may crash and
        has not, else a clean restart. Not after a failed step (Hypothesis reports that one),
        nor when nothing changed since the last restart."""
        try:
            if self.verified and self.changes:
                if self.may_crash and self.crashes < MAX_CRASHES:
                    self._crash()
                    self._compare("after a crash at the end, ")
                else:
                    self._clean_restart()
                    self._compare("after a clean restart at the end, ")
        finally:
            shutil.rmtree(self.plain, ignore_errors=True)

    # --- what exists (read from the plain tree, which the mount must match) ---

    def _paths(self, *kinds: EntryKind) -> list[str]:
        """Existing paths (of one of `kinds`, or any), but the gitlink: a submodule's place is not
        the mount's to change (EPERM, by design), while a checkout shows a plain empty directory."""
        return [path for path, entry in tree(self.plain, contents=False).items()
                if (not kinds or entry.kind in kinds) and path != self.gitlink]  # fmt: skip

    def _dirs(self) -> list[str]:
        return ["", *self._paths(EntryKind.DIR)]

    def _new_path(self, data: st.DataObject, label: str) -> str:
        """A name in an existing directory: mostly a free one, sometimes one taken there (EEXIST,
        or a replacement)."""
        parent = data.draw(st.sampled_from(self._dirs()), label=f"{label} directory")
        taken = data.draw(st.booleans(), label=f"{label} is taken")
        names = [name for name in NAMES if os.path.lexists(self.plain / parent / name) == taken] or list(NAMES)
        name = data.draw(st.sampled_from(names), label=f"{label} name")
        return f"{parent}/{name}" if parent else name

    def _path(self, data: st.DataObject, label: str, *kinds: EntryKind) -> str:
        """An existing path (of one of `kinds`) most of the time, else a name that may not exist."""
        existing = self._paths(*kinds)
        if existing and data.draw(st.integers(0, 3), label=f"{label} from existing paths unless 0") > 0:
            return data.draw(st.sampled_from(existing), label=label)
        return self._new_path(data, label)

    # --- one operation, on both trees ---

    def both(self, what: str, action: Callable[[Path], object]) -> str:
        self.verified = False
        mount_outcome = outcome(lambda: action(self.mounted.mnt))
        plain_outcome = outcome(lambda: action(self.plain))
        assert mount_outcome == plain_outcome, f"{what}: mount {mount_outcome}, plain directory {plain_outcome}"
        self.changes += mount_outcome == "ok"
        return mount_outcome

    # --- rules ---

    @initialize(may_crash=st.booleans())
    def choose_whether_to_crash(self, may_crash: bool) -> None:
        """About one example in two may crash the mount process (that costs seconds)."""
        self.may_crash = may_crash

    @rule(data=st.data(), how=st.sampled_from(Write), content=CONTENT)
    def write(self, data: st.DataObject, how: Write, content: bytes) -> None:
        path = self._path(data, "path", EntryKind.FILE)
        self.written.add(path)
        if how is Write.REPLACE:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            self.both(f"replace {path}", lambda root: write_file(root / path, flags, content))
        elif how is Write.APPEND:
            self.both(f"append to {path}", lambda root: write_file(root / path, os.O_WRONLY | os.O_APPEND, content))
        elif how is Write.TRUNCATE:
            size = data.draw(st.integers(0, 5000), label="size")
            self.both(f"truncate {path} to {size}", lambda root: os.truncate(root / path, size))
        else:
            gap = data.draw(st.integers(1, 70_000), label="gap")
            self.both(f"write {gap} past the end of {path}", lambda root: write_past_end(root / path, gap, content))

    @rule(data=st.data())
    def mkdir(self, data: st.DataObject) -> None:
        path = self._new_path(data, "path")
        self.both(f"mkdir {path}", lambda root: os.mkdir(root / path))

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        empty = [path for path in self._paths(EntryKind.DIR) if not os.listdir(self.plain / path)]
        if empty and data.draw(st.booleans(), label="an empty directory"):
            path = data.draw(st.sampled_from(empty), label="path")
        else:
            path = self._path(data, "path", EntryKind.DIR)
        self.both(f"rmdir {path}", lambda root: os.rmdir(root / path))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self._path(data, "path", EntryKind.FILE, EntryKind.LINK)
        self.both(f"unlink {path}", lambda root: os.unlink(root / path))

    # Renames come as three rules (of a file or link, of a directory, over an existing entry) so
    # that they are drawn as often as they deserve: they are what the overlay records by reference.
    @rule(data=st.data(), noreplace=st.booleans())
    def rename_file(self, data: st.DataObject, noreplace: bool) -> None:
        source = self._path(data, "source", EntryKind.FILE, EntryKind.LINK)
        self._rename(source, self._new_path(data, "target"), noreplace)

    @rule(data=st.data(), noreplace=st.booleans())
    def rename_directory(self, data: st.DataObject, noreplace: bool) -> None:
        source = self._path(data, "source", EntryKind.DIR)
        self._rename(source, self._new_path(data, "target"), noreplace)

    @rule(data=st.data(), noreplace=st.booleans())
    def rename_over(self, data: st.DataObject, noreplace: bool) -> None:
        source = self._path(data, "source")
        self._rename(source, data.draw(st.sampled_from(self._paths()), label="target"), noreplace)

    def _rename(self, source: str, target: str, noreplace: bool) -> None:
        if noreplace:
            done = self.both(f"rename {source} {target} (no replace)",
                             lambda root: renameat2(root / source, root / target, RENAME_NOREPLACE))  # fmt: skip
        else:
            done = self.both(f"rename {source} {target}", lambda root: os.rename(root / source, root / target))
        if done == "ok" and self.gitlink.startswith(f"{source}/"):
            self.gitlink = target + self.gitlink[len(source) :]

    @rule(data=st.data(), link_target=st.sampled_from(LINK_TARGETS))
    def symlink(self, data: st.DataObject, link_target: str) -> None:
        path = self._new_path(data, "path")
        self.both(f"symlink {path} -> {link_target}", lambda root: os.symlink(link_target, root / path))

    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self._path(data, "path")
        self.both(f"chmod {mode:o} {path}", lambda root: os.chmod(root / path, mode))

    def _may_restart(self) -> bool:
        return self.restarts < MAX_RESTARTS and self.changes > 0  # something to keep

    def _may_crash(self) -> bool:
        return self.may_crash and self.crashes < MAX_CRASHES and self._may_restart()

    @precondition(_may_crash)
    @rule()
    def crash(self) -> None:
        """SIGKILL the mount process; the running mountd mounts it anew, as after a real crash."""
        self._crash()

    @precondition(_may_restart)
    @rule()
    def clean_restart(self) -> None:
        """The services stopped and started again (`artifactfs down`, then `up`): the mount
        process stops cleanly, and a new one shows what the overlay recorded."""
        self._clean_restart()

    def _crash(self) -> None:
        """Every other file written since the last restart is fsync'd first, the rest not: the
        overlay records each change before the operation returns, so a crash of the mount
        process loses nothing acknowledged either way (fsync guards against a crash of the
        machine, which cannot be played here)."""
        self.crashes += 1
        for path in sorted(self.written)[::2]:
            with suppress(OSError):  # removed or renamed since, or not a file
                fsync(self.mounted.mnt / path, os.O_RDONLY)
        self._before_restart()
        self.mounted.crash()

    def _clean_restart(self) -> None:
        self._before_restart()
        self.mounted.stop_services()
        self.mounted.start_services()

    def _before_restart(self) -> None:
        self.verified = False
        self.restarts += 1
        self.changes = 0
        self.written.clear()

    # --- after every step ---

    @invariant()
    def trees_match(self) -> None:
        self._compare()
        self.verified = True

    def _compare(self, when: str = "") -> None:
        # One assertion for the invariant and the teardown: Hypothesis tells failures apart by
        # where they are raised, and reports one bug once.
        lines = differences(tree(self.mounted.mnt), tree(self.plain))
        assert not lines, f"{when}the mount and the plain directory differ:\n" + "\n".join(lines)


# A passing run takes about a minute; a failing one is shrunk for up to five minutes (Hypothesis's
# own limit) before it is reported, which the default timeout would cut short.
@pytest.mark.timeout(900)
def test_the_mount_behaves_as_a_plain_directory(mounted: Mounted) -> None:
    MountMatchesPlainDirectory.mounted = mounted
    run_state_machine_as_test(MountMatchesPlainDirectory, settings=SETTINGS)
