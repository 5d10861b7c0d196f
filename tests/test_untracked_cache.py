"""The untracked cache preparation writes is the one git writes itself for the same tree (stat
data aside, which git does not compare while its fsmonitor hook answers)."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from artifactfs.fs.untracked_cache import encode_varint, tree_of_directories, untracked_extension
from artifactfs.prepare import excludes_hash

STAT = 36


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def extension(index: Path, signature: bytes) -> bytes:
    data = index.read_bytes()
    start = data.index(signature)
    size = struct.unpack(">I", data[start + 4 : start + 8])[0]
    return data[start : start + 8 + size]


def test_git_writes_the_same_untracked_cache(tmp_path: Path) -> None:
    work = tmp_path / "work"
    files = {"README": "r\n", "a/.gitignore": "*.o\n", "a/b/f.c": "f\n", "a/b/c/deep": "d\n", "z/.gitignore": "x\n",
             "z/y": "y\n", "m/n": "n\n"}  # fmt: skip
    for path, content in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(content)
    git(tmp_path, "init", "-q", str(work))
    git(work, "add", "-A")
    git(work, "-c", "user.name=a", "-c", "user.email=a@example.com", "commit", "-q", "-m", "tree")
    git(work, "-c", "core.untrackedCache=true", "status", "--porcelain")  # git writes its cache
    theirs = bytearray(extension(work / ".git" / "index", b"UNTR"))
    directories = [b"a", b"a/b", b"a/b/c", b"m", b"z"]
    gitignores = {d.encode(): bytes.fromhex(git(work, "rev-parse", f"HEAD:{d}/.gitignore").strip()) for d in ("a", "z")}
    ours = untracked_extension(work, tree_of_directories(directories, gitignores),
                               info_exclude=excludes_hash(work / ".git" / "info" / "exclude", "sha1"), hash_size=20)  # fmt: skip
    # Stat data differs by nature: zero git's (info/exclude's, then one per valid directory).
    ident = theirs[8]
    theirs[9 + ident : 9 + ident + STAT] = bytes(STAT)
    stats_end = len(theirs) - 1 - 20 * 1  # only a/'s rules were read: z has no subdirectory
    theirs[stats_end - STAT * (len(directories) + 1) : stats_end] = bytes(STAT * (len(directories) + 1))
    assert bytes(theirs) == ours


def test_varints_are_gits() -> None:
    # varint.c: 127 fits one byte; 128 is 0x80 0x00 (each continuation byte's value less one).
    assert [encode_varint(v) for v in (0, 1, 127, 128, 255, 16511)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x00", b"\x80\x7f", b"\xff\x7f"]  # fmt: skip
