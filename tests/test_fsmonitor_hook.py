"""The fsmonitor hook git runs (fsmonitor_hook.sh), on a directory that carries the mount's answer
as extended attributes: pages joined in order, NULs kept, and "/" (check everything) wherever no
answer is found."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from artifactfs.fs.fsmonitor import PAGE_BYTES, XATTR_PREFIX, Answers, hook_command
from artifactfs.fs.overlay import EntryKind, Overlay, OverlayEntry

T = 1_700_000_000_000_000_000


def run_hook(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(f"{hook_command()} {' '.join(args)}", shell=True, cwd=cwd, capture_output=True, timeout=30)


def test_an_answer_of_many_pages_arrives_whole(tmp_path: Path) -> None:
    overlay = Overlay(tmp_path / "overlay")
    for n in range(5000):  # three pages of paths
        overlay.put(OverlayEntry(f"dir{n % 7}/file-with-a-long-name-{n:05d}.txt".encode(), EntryKind.FILE, 0o644, T,
                                 data=None, base_oid="0" * 40))  # fmt: skip
    answers = Answers(overlay)
    token = f"afs1:{overlay.id}:{answers.epoch}:0"
    whole = answers.answer(token, None, "")  # type: ignore[arg-type]  (an exact token: no commit read)
    assert len(whole) > 2 * PAGE_BYTES
    with xattr_directory(tmp_path / "served") as served:
        name = XATTR_PREFIX + f"{token}:".encode()
        pages = Answers._paginate(whole)
        os.setxattr(served, name + b"0", f"{len(pages)}\n".encode() + pages[0])
        for index, page in enumerate(pages[1:], start=1):
            os.setxattr(served, name + str(index).encode(), page)
        out = run_hook(served, "2", token)
    assert out.returncode == 0 and out.stdout == whole


@contextmanager
def xattr_directory(path: Path) -> Iterator[Path]:
    """A directory that takes extended attributes as large as the mount's pages: a small tmpfs
    (ext4 keeps all of a file's attributes in one 4 KiB block)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_without_an_answer_git_checks_everything(tmp_path: Path) -> None:
    out = run_hook(tmp_path, "2", "afs1:someone-else:0:0")
    assert out.returncode == 0 and out.stdout == b"afs1:none\0/\0"
    wrong = run_hook(tmp_path, "1", "12345")
    assert wrong.returncode != 0 and b"only hook version 2" in wrong.stderr
