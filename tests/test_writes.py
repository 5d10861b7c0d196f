"""The mounted tree is writable: every change lands in the overlay, through a real FUSE mount run
by mountd, and survives the mount process."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Artifactfs, new_installation, sample_mounted, wait_until
from .gitremote import SampleRepo
from .test_drills import HEADROOM, filled, small  # noqa: F401  (small: the fixture)
from .test_mount import present_blobs

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


@pytest.fixture(scope="module")
def writable(tmp_path_factory: pytest.TempPathFactory, sample: SampleRepo) -> Iterator[tuple[Artifactfs, Path]]:
    """The sample repository mounted by a running mountd; each test writes under its own names."""
    with sample_mounted(tmp_path_factory.mktemp("writable"), sample) as mounted:
        yield mounted


def errno_of(action) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        action()
    return info.value.errno  # type: ignore[return-value]


def test_new_files_are_written_appended_and_read_back(writable: tuple[Artifactfs, Path]) -> None:
    _, mnt = writable
    path = mnt / "notes.txt"
    path.write_bytes(b"one\n")
    with open(path, "ab") as fh:
        fh.write(b"two\n")
    assert path.read_bytes() == b"one\ntwo\n"
    assert path.stat().st_size == 8
    assert "notes.txt" in os.listdir(mnt)
    assert errno_of(lambda: os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST
    with open(path, "r+b") as fh:  # a write in the middle, then past the end: a sparse hole
        fh.seek(1)
        fh.write(b"N")
        fh.seek(1 << 20)
        fh.write(b"end")
    data = path.read_bytes()
    assert data[:8] == b"oNe\ntwo\n" and len(data) == (1 << 20) + 3
    assert data[8 : 1 << 20] == bytes((1 << 20) - 8) and data.endswith(b"end")
    os.truncate(path, 3)
    assert path.read_bytes() == b"oNe"


def test_a_tracked_file_is_copied_up_on_write(writable: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    afs, mnt = writable
    git_dir = afs.root / "git" / "sample.git"
    with open(mnt / "src/app.py", "ab") as fh:
        fh.write(b"# edited\n")
    assert (mnt / "src/app.py").read_bytes() == sample.files["src/app.py"] + b"# edited\n"
    assert sample.blob_id("src/app.py") in present_blobs(git_dir)  # hydrated to be copied up
    (mnt / "assets/big.txt").write_bytes(b"small now\n")  # truncated on open
    assert (mnt / "assets/big.txt").read_bytes() == b"small now\n"
    assert (mnt / "assets/big.txt").stat().st_size == 10


def test_directories_are_made_and_removed_only_when_empty(writable: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    _, mnt = writable
    (mnt / "build/out").mkdir(parents=True)
    (mnt / "build/out/a.o").write_bytes(b"\0")
    assert errno_of(lambda: (mnt / "build/out").rmdir()) == errno.ENOTEMPTY
    (mnt / "build/out/a.o").unlink()
    (mnt / "build/out").rmdir()
    (mnt / "build").rmdir()
    assert not (mnt / "build").exists()
    # A tracked directory emptied, removed, then made again: empty, the base does not show through.
    docs = mnt / "docs"
    assert errno_of(lambda: docs.rmdir()) == errno.ENOTEMPTY
    for entry in os.listdir(docs):
        (docs / entry).unlink()
    docs.rmdir()
    assert not docs.exists()
    docs.mkdir()
    assert os.listdir(docs) == []


def test_unlink_hides_a_tracked_file(writable: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    _, mnt = writable
    victim = mnt / "bin/run.sh"
    victim.unlink()
    assert not victim.exists() and "run.sh" not in os.listdir(mnt / "bin")
    assert errno_of(lambda: victim.read_bytes()) == errno.ENOENT
    victim.write_bytes(b"#!/bin/sh\necho again\n")  # made again over the whiteout
    assert victim.read_bytes() == b"#!/bin/sh\necho again\n"
    assert not victim.stat().st_mode & stat.S_IXUSR


def test_renames_of_files_and_whole_directories(writable: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    _, mnt = writable
    src_files = {p[len("src/") :]: (mnt / p).read_bytes() for p in sample.files if p.startswith("src/")}
    (mnt / "src/new_module.py").write_bytes(b"x = 1\n")  # a mixed tree: tracked and new
    (mnt / "src").rename(mnt / "lib")
    assert not (mnt / "src").exists()
    for rel, content in src_files.items():
        assert (mnt / "lib" / rel).read_bytes() == content, rel
    assert (mnt / "lib/new_module.py").read_bytes() == b"x = 1\n"
    (mnt / "lib/new_module.py").rename(mnt / "moved.py")  # across directories
    assert (mnt / "moved.py").read_bytes() == b"x = 1\n"
    (mnt / "over.txt").write_bytes(b"old target\n")
    (mnt / "moved.py").rename(mnt / "over.txt")  # over an existing target
    assert (mnt / "over.txt").read_bytes() == b"x = 1\n" and not (mnt / "moved.py").exists()
    (mnt / "a.txt").write_bytes(b"a")
    assert errno_of(lambda: renameat2(mnt / "a.txt", mnt / "over.txt", RENAME_NOREPLACE)) == errno.EEXIST
    assert errno_of(lambda: renameat2(mnt / "a.txt", mnt / "over.txt", RENAME_EXCHANGE)) == errno.EINVAL
    renameat2(mnt / "a.txt", mnt / "b.txt", RENAME_NOREPLACE)
    assert (mnt / "b.txt").read_bytes() == b"a"
    (mnt / "lib").rename(mnt / "src")  # and back: the tree reads as before
    for rel, content in src_files.items():
        assert (mnt / "src" / rel).read_bytes() == content, rel


def test_links_modes_times_and_what_is_refused(writable: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    _, mnt = writable
    os.symlink("README.md", mnt / "readme-link")
    assert os.readlink(mnt / "readme-link") == "README.md"
    assert (mnt / "readme-link").read_bytes() == sample.files["README.md"]
    os.chmod(mnt / "README.md", 0o755)
    assert (mnt / "README.md").stat().st_mode & 0o777 == 0o755
    os.utime(mnt / "README.md", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    assert (mnt / "README.md").stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    assert errno_of(lambda: os.link(mnt / "README.md", mnt / "hard")) == errno.EPERM
    assert errno_of(lambda: os.setxattr(mnt / "README.md", "user.x", b"1")) == errno.ENOTSUP
    # Refused by the kernel itself after the first ask: `ls -l` asks two of every file.
    assert errno_of(lambda: os.getxattr(mnt / "README.md", "security.selinux")) == errno.ENOTSUP
    assert errno_of(lambda: os.listxattr(mnt / "README.md")) == errno.ENOTSUP
    # git's fsmonitor hook reads its answer from a file that no listing shows and nobody writes.
    question = mnt / ".artifactfs-fsmonitor:afs1:someone-else:0:0"
    assert question.read_bytes().endswith(b"\0/\0")  # a token not this mount's: check everything
    assert question.name not in os.listdir(mnt)
    assert errno_of(lambda: question.write_text("x")) == errno.EPERM
    assert errno_of(lambda: os.mkdir(mnt / ".artifactfs-fsmonitor:x")) == errno.EEXIST
    assert errno_of(lambda: (mnt / ".git").write_text("gitdir: /elsewhere\n")) == errno.EPERM
    assert errno_of(lambda: (mnt / ".git").unlink()) == errno.EPERM
    free, ours = os.statvfs(mnt), os.statvfs(writable[0].root)
    assert free.f_blocks == ours.f_blocks and abs(free.f_bavail - ours.f_bavail) < 10_000


def test_open_handles_survive_rename_and_unlink(writable: tuple[Artifactfs, Path]) -> None:
    _, mnt = writable
    (mnt / "handle.txt").write_bytes(b"first\n")
    with open(mnt / "handle.txt", "r+b") as fh:
        (mnt / "handle.txt").rename(mnt / "renamed.txt")
        fh.seek(0, os.SEEK_END)
        fh.write(b"second\n")
        fh.flush()
        assert (mnt / "renamed.txt").read_bytes() == b"first\nsecond\n"
        (mnt / "renamed.txt").unlink()
        fh.write(b"third\n")
        fh.flush()
        fh.seek(0)
        assert fh.read() == b"first\nsecond\nthird\n"
    assert not (mnt / "renamed.txt").exists()


def test_what_was_fsynced_survives_a_killed_mount_process(tmp_path: Path, sample: SampleRepo) -> None:
    afs = new_installation(tmp_path)
    try:
        afs.add("durable", sample.url)
        afs.start_daemon()
        mnt = afs.wait_mounted("durable")
        server = afs.wait_mount_process("durable")
        fd = os.open(mnt / "synced.txt", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"kept\n")
        os.fsync(fd)
        (mnt / "README.md").write_bytes(b"replaced\n")  # closed, not fsync'd: kept too
        (mnt / "src").rename(mnt / "source")
        os.kill(server, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.close(fd)  # its mount is gone: ENOTCONN
        wait_until(lambda: afs.mount_process("durable") not in (None, server), 30, what="mountd to remount")
        mnt = afs.wait_mounted("durable")
        wait_until(lambda: (mnt / "synced.txt").exists(), what="the remounted tree")
        assert (mnt / "synced.txt").read_bytes() == b"kept\n"
        assert (mnt / "README.md").read_bytes() == b"replaced\n"
        assert not (mnt / "src").exists() and (mnt / "source/app.py").read_bytes() == sample.files["src/app.py"]
    finally:
        afs.cleanup()


HOLDER = """
import os, sys, time
mnt = sys.argv[1]
with open(os.path.join(mnt, "closed.txt"), "wb") as fh:
    fh.write(b"closed before the restart\\n")
with open(os.path.join(mnt, "src/app.py"), "ab") as fh:
    fh.write(b"# appended and closed\\n")
still_open = open(os.path.join(mnt, "open.txt"), "wb", buffering=0)
still_open.write(b"written, never closed\\n")
tracked = open(os.path.join(mnt, "README.md"), "r+b", buffering=0)
tracked.write(b"OVER")
print("ready", flush=True)
time.sleep(600)
"""


def test_a_clean_restart_with_files_open_loses_nothing_that_was_closed(tmp_path: Path, sample: SampleRepo) -> None:
    afs = new_installation(tmp_path)
    holder = None
    try:
        afs.add("clean", sample.url)
        afs.start_daemon()
        mnt = afs.wait_mounted("clean")
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(mnt)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        server = afs.wait_mount_process("clean")
        os.kill(server, signal.SIGTERM)  # a clean stop, with four files open
        wait_until(lambda: afs.mount_process("clean") not in (None, server), 30, what="mountd to remount")
        mnt = afs.wait_mounted("clean")
        wait_until(lambda: (mnt / "closed.txt").exists(), what="the remounted tree")
        assert (mnt / "closed.txt").read_bytes() == b"closed before the restart\n"
        assert (mnt / "src/app.py").read_bytes() == sample.files["src/app.py"] + b"# appended and closed\n"
        # What was written through handles still open was in the overlay too (every write is).
        assert (mnt / "open.txt").read_bytes() == b"written, never closed\n"
        assert (mnt / "README.md").read_bytes() == b"OVER" + sample.files["README.md"][4:]
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        afs.cleanup()


def test_a_full_disk_fails_a_write_with_enospc_and_corrupts_nothing(small: Artifactfs, sample: SampleRepo) -> None:
    afs, top = small, small.root.parent
    afs.add("full", sample.url)
    afs.start_daemon()
    mnt = afs.wait_mounted("full")
    (mnt / "before.txt").write_bytes(b"written before the disk filled\n")
    readme = (mnt / "README.md").read_bytes()
    with filled(top, leave=HEADROOM):
        with pytest.raises(OSError) as failed:
            with open(mnt / "big.bin", "wb", buffering=0) as fh:
                for _ in range(4 * HEADROOM // 65536):
                    fh.write(b"\xa5" * 65536)
        assert failed.value.errno == errno.ENOSPC  # not EIO: the caller can tell what happened
        # The mount still serves, and what was there is intact.
        assert (mnt / "before.txt").read_bytes() == b"written before the disk filled\n"
        assert (mnt / "README.md").read_bytes() == readme
        assert "big.bin" in os.listdir(mnt)  # what was written before the disk filled stays
        # Changes of names need room in the overlay's records too: they fail whole, with ENOSPC.
        names = sorted(os.listdir(mnt))
        for change in (lambda: (mnt / "new-dir").mkdir(), lambda: (mnt / "new.txt").write_bytes(b""),
                       lambda: (mnt / "big.bin").unlink()):  # fmt: skip
            with pytest.raises(OSError) as refused:
                change()
            assert refused.value.errno == errno.ENOSPC
        assert sorted(os.listdir(mnt)) == names  # nothing half made
    (mnt / "big.bin").unlink()
    (mnt / "after.txt").write_bytes(b"space again\n")
    assert (mnt / "after.txt").read_bytes() == b"space again\n"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=mnt, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout == "?? after.txt\n?? before.txt\n", status.stderr
