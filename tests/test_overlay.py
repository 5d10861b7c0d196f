"""The overlay's bookkeeping, on a real SQLite file and real content files (no mount here: the
filesystem tests drive it through FUSE)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifactfs.fs.overlay import Change, EntryKind, Overlay, OverlayEntry

T = 1_700_000_000_000_000_000


def file(path: bytes, data: int | None = None, base_oid: str | None = None, mode: int = 0o644) -> OverlayEntry:
    return OverlayEntry(path, EntryKind.FILE, mode, T, data=data, base_oid=base_oid)


def directory(path: bytes, base_tree: str | None = None, opaque: bool = False) -> OverlayEntry:
    return OverlayEntry(path, EntryKind.DIR, 0o755, T, base_tree=base_tree, opaque=opaque)


@pytest.fixture
def overlay(tmp_path: Path) -> Overlay:
    return Overlay(tmp_path / "overlay")


def test_a_new_file_and_its_content_survive_a_reopen(overlay: Overlay, tmp_path: Path) -> None:
    data = overlay.new_data()
    overlay.data_path(data).write_bytes(b"hello\n")
    overlay.put(directory(b"src"))
    overlay.put(file(b"src/new.py", data))
    overlay.close()
    again = Overlay(tmp_path / "overlay")
    assert again.entry(b"src/new.py") == file(b"src/new.py", data)
    assert again.data_path(data).read_bytes() == b"hello\n"
    assert list(again.children(b"src")) == [b"new.py"]
    assert again.dirty_paths() == [b"src", b"src/new.py"]
    assert again.new_data() == data + 1  # ids are never reused


def test_removing_a_base_path_leaves_a_whiteout_and_frees_content(overlay: Overlay) -> None:
    data = overlay.new_data()
    overlay.put(file(b"README.md", data))  # copied up, then removed
    assert overlay.remove(b"README.md", in_base=True, mtime_ns=T) == [data]
    assert overlay.entry(b"README.md") == OverlayEntry(b"README.md", EntryKind.WHITEOUT, 0, T)
    overlay.put(file(b"scratch.txt", overlay.new_data()))  # made here: removing it leaves nothing
    overlay.remove(b"scratch.txt", in_base=False, mtime_ns=T)
    assert overlay.entry(b"scratch.txt") is None


def test_renaming_a_directory_moves_every_entry_under_it_and_nothing_beside_it(overlay: Overlay) -> None:
    a, b = overlay.new_data(), overlay.new_data()
    overlay.put(file(b"lib/x.py", a))
    overlay.put(file(b"lib/deep/y.py", b))
    overlay.put(file(b"lib0", overlay.new_data()))  # sorts right after "lib/": must stay
    overlay.put(file(b"libx/z.py", overlay.new_data()))
    freed = overlay.rename(b"lib", b"pkg", moved=directory(b"lib", base_tree="ab" * 20), old_in_base=True, mtime_ns=T)
    assert freed == []
    assert overlay.entry(b"pkg") == directory(b"pkg", base_tree="ab" * 20)  # the base tree, by reference
    assert overlay.entry(b"pkg/x.py") == file(b"pkg/x.py", a)
    assert overlay.entry(b"pkg/deep/y.py") == file(b"pkg/deep/y.py", b)
    # Only the overlay's own entries: "deep" is a directory of the base tree, listed from it.
    assert list(overlay.children(b"pkg")) == [b"x.py"]
    assert list(overlay.children(b"pkg/deep")) == [b"y.py"]
    assert overlay.entry(b"lib").kind is EntryKind.WHITEOUT
    assert overlay.children(b"lib") == {}
    assert overlay.entry(b"lib0") is not None and overlay.entry(b"libx/z.py") is not None


def test_renaming_over_a_target_frees_what_it_held(overlay: Overlay) -> None:
    old, new = overlay.new_data(), overlay.new_data()
    overlay.put(file(b"a.txt", new))
    overlay.put(file(b"b.txt", old))
    assert overlay.rename(b"a.txt", b"b.txt", moved=file(b"a.txt", new), old_in_base=False, mtime_ns=T) == [old]
    assert overlay.entry(b"b.txt") == file(b"b.txt", new)
    assert overlay.entry(b"a.txt") is None
    overlay.free(old)
    assert not overlay.data_path(old).exists()
    overlay.free(new)  # still referenced: kept
    assert overlay.data_path(new).exists()


def test_a_base_file_renamed_is_recorded_by_reference(overlay: Overlay) -> None:
    moved = file(b"src/app.py", base_oid="cd" * 20, mode=0o755)
    overlay.rename(b"src/app.py", b"app.py", moved=moved, old_in_base=True, mtime_ns=T)
    assert overlay.entry(b"app.py") == file(b"app.py", base_oid="cd" * 20, mode=0o755)
    assert overlay.entry(b"src/app.py").kind is EntryKind.WHITEOUT  # type: ignore[union-attr]


def test_changes_are_numbered_and_survive_a_reopen(overlay: Overlay, tmp_path: Path) -> None:
    start = overlay.seq
    overlay.put(file(b"a.txt", overlay.new_data()))
    middle = overlay.seq
    overlay.rename(b"a.txt", b"docs/a.txt", moved=file(b"a.txt"), old_in_base=False, mtime_ns=T)
    overlay.touch(b"docs/a.txt")
    assert overlay.changes_since(start) == [Change(b"a.txt", True), Change(b"docs/a.txt", True)]
    assert overlay.changes_since(middle) == [Change(b"a.txt", True), Change(b"docs/a.txt", True)]
    assert overlay.changes_since(overlay.seq) == []
    seq, ident = overlay.seq, overlay.id
    overlay.close()
    again = Overlay(tmp_path / "overlay")
    assert again.id == ident
    assert again.seq == seq - 1  # the content write was numbered in memory only
    assert again.changes_since(start) == [Change(b"a.txt", True), Change(b"docs/a.txt", True)]


def test_content_files_nothing_refers_to_are_collected_at_open(overlay: Overlay, tmp_path: Path) -> None:
    kept, orphan = overlay.new_data(), overlay.new_data()
    overlay.put(file(b"kept.txt", kept))
    overlay.close()
    Overlay(tmp_path / "overlay")
    assert overlay.data_path(kept).exists() and not overlay.data_path(orphan).exists()


def test_a_change_acknowledged_survives_a_kill(tmp_path: Path) -> None:
    root = tmp_path / "overlay"
    code = (
        "import os, sys; from artifactfs.fs.overlay import Overlay, OverlayEntry, EntryKind; "
        "o = Overlay(__import__('pathlib').Path(sys.argv[1])); "
        "o.put(OverlayEntry(b'kept.txt', EntryKind.FILE, 0o644, 1, data=o.new_data())); "
        "print('done', flush=True); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == -9 and proc.stdout == "done\n", proc.stderr
    assert Overlay(root).entry(b"kept.txt") is not None
