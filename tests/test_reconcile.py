"""Moving the overlay to another base (reconcile.py) on real trees and a real overlay: the view is
the same before and after, and what the new base holds leaves the overlay."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pygit2
import pytest

from artifactfs.fs.layers import Layers, Shown
from artifactfs.fs.nodes import KIND_MODES, Kind
from artifactfs.fs.overlay import EntryKind, Overlay, OverlayEntry
from artifactfs.fs.reconcile import plan_move

BASE_TIME = 1_700_000_000_000_000_000  # the time files without an entry show
LATER = BASE_TIME + 5_000_000_000
FILE, EXEC, LINK = pygit2.enums.FileMode.BLOB, pygit2.enums.FileMode.BLOB_EXECUTABLE, pygit2.enums.FileMode.LINK

Files = dict[str, "bytes | tuple[bytes, int]"]


class World:
    """A repository to make trees in, and an overlay over them."""

    def __init__(self, root: Path) -> None:
        self.repo = pygit2.init_repository(str(root / "repo"), bare=True)
        self.overlay = Overlay(root / "overlay")
        self.held: set[int] = set()

    def tree(self, files: Files) -> str:
        index = pygit2.Index()
        for path, spec in files.items():
            content, mode = spec if isinstance(spec, tuple) else (spec, FILE)
            index.add(pygit2.IndexEntry(path, self.repo.create_blob(content), mode))
        return str(index.write_tree(self.repo))

    def file(self, path: str, content: bytes, *, mode: int = 0o644, mtime: int = LATER) -> None:
        data = self.overlay.new_data()
        self.overlay.data_path(data).write_bytes(content)
        self.overlay.put(OverlayEntry(path.encode(), EntryKind.FILE, mode, mtime, data=data))

    def view(self, tree: str) -> dict[bytes, tuple[str, int, bytes | None, int]]:
        """Everything shown over `tree`: kind, mode, content (a file's, a link's target), time."""
        layers = Layers(self.repo, tree, self.overlay)
        found: dict[bytes, tuple[str, int, bytes | None, int]] = {}

        def walk(directory: Shown) -> None:
            for shown in layers.listing(directory).values():
                entry = shown.entry
                mode = entry.mode if entry is not None else KIND_MODES[shown.kind] & 0o777
                mtime = entry.mtime_ns if entry is not None else BASE_TIME
                content: bytes | None = None
                if entry is not None and entry.data is not None:
                    content = self.overlay.data_path(entry.data).read_bytes()
                elif entry is not None and entry.target is not None:
                    content = entry.target
                elif shown.kind in (Kind.FILE, Kind.EXEC, Kind.LINK):
                    content = self.repo.get(shown.oid).data
                found[shown.path] = (shown.kind.value, mode if shown.kind is not Kind.DIR else 0, content, mtime)
                if shown.kind is Kind.DIR:
                    walk(shown)

        walk(Shown(b"", Kind.DIR, tree, None))
        return found

    def move(self, old: str, new: str) -> list[int]:
        """Move the overlay from base `old` to `new`; check the view is the same; the freed files."""
        before = self.view(old)
        plan = plan_move(self.repo, self.overlay, old, new, base_mtime_ns=BASE_TIME, held=lambda d: d in self.held)
        freed = self.overlay.move_base(list(plan.put.values()), sorted(plan.delete), {"base": new})
        for data in freed:
            self.overlay.free(data)
        assert self.view(new) == before
        return freed

    def entries(self) -> dict[bytes, OverlayEntry]:
        return {path: self.overlay.entry(path) for path, _ in self.overlay.entries_by_kind()}  # type: ignore[misc]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_commit_of_edits_takes_their_content_out_of_the_overlay(world: World) -> None:
    old = world.tree({"a.txt": b"one\n", "src/b.py": b"b\n", "gone.txt": b"x\n"})
    world.file("a.txt", b"two\n")
    world.file("src/new.py", b"new\n", mode=0o755)
    world.overlay.remove(b"gone.txt", in_base=True, mtime_ns=LATER)
    world.file("notes.txt", b"not committed\n")
    new = world.tree({"a.txt": b"two\n", "src/b.py": b"b\n", "src/new.py": (b"new\n", EXEC)})
    freed = world.move(old, new)
    entries = world.entries()
    assert len(freed) == 2  # a.txt and src/new.py: the new base has their content
    # Their mode and time stay (a build tool must not see an older file), by reference.
    assert entries[b"a.txt"].data is None and entries[b"a.txt"].base_oid is not None
    assert entries[b"src/new.py"].data is None and entries[b"src/new.py"].mode == 0o755
    assert b"gone.txt" not in entries  # the new base has no such file: the whiteout is moot
    assert entries[b"notes.txt"].data is not None  # uncommitted work stays


def test_an_entry_that_adds_nothing_to_the_new_base_goes(world: World) -> None:
    old = world.tree({"a.txt": b"one\n"})
    world.file("a.txt", b"two\n", mtime=BASE_TIME)  # default mode, a time no later than the base's
    world.move(old, world.tree({"a.txt": b"two\n"}))
    assert world.entries() == {}


def test_what_the_old_base_showed_is_kept_by_reference(world: World) -> None:
    """git reset --soft: HEAD moves back, the files do not."""
    old = world.tree({"a.txt": b"two\n", "dir/x": b"x\n", "link": (b"a.txt", LINK), "f": b"file\n"})
    new = world.tree({"a.txt": b"one\n", "other.txt": b"o\n", "f/inner": b"now a dir\n"})
    world.move(old, new)
    entries = world.entries()
    assert entries[b"a.txt"].base_oid == str(pygit2.hash(b"two\n")) and entries[b"a.txt"].data is None
    assert entries[b"dir"].kind is EntryKind.DIR and entries[b"dir"].base_tree is not None
    assert entries[b"link"].kind is EntryKind.LINK
    assert entries[b"other.txt"].kind is EntryKind.WHITEOUT
    assert entries[b"f"].kind is EntryKind.FILE  # hides the new base's directory


def test_a_made_directory_becomes_the_new_bases_own(world: World) -> None:
    old = world.tree({"a.txt": b"a\n"})
    world.overlay.put(OverlayEntry(b"pkg", EntryKind.DIR, 0o755, LATER, opaque=True))
    world.file("pkg/one.py", b"1\n")
    world.file("pkg/two.py", b"2\n")
    new = world.tree({"a.txt": b"a\n", "pkg/one.py": b"1\n", "pkg/two.py": b"2\n", "pkg/three.py": b"3\n"})
    world.move(old, new)
    entries = world.entries()
    assert not entries[b"pkg"].opaque and entries[b"pkg"].base_tree is None  # the new base's directory now
    assert entries[b"pkg/three.py"].kind is EntryKind.WHITEOUT  # not shown before, not now
    assert entries[b"pkg/one.py"].data is None and entries[b"pkg/two.py"].data is None


def test_a_committed_directory_rename_leaves_the_overlay(world: World) -> None:
    """git mv src lib && git commit: the rename was recorded by reference; the new base has it."""
    old = world.tree({"src/a.py": b"a\n", "src/deep/b.py": b"b\n", "top": b"t\n"})
    src = Layers(world.repo, old, world.overlay).resolve(b"src")
    assert src is not None
    world.overlay.rename(b"src", b"lib", moved=OverlayEntry(b"lib", EntryKind.DIR, 0o755, LATER, base_tree=src.oid),
                         old_in_base=True, mtime_ns=LATER)  # fmt: skip
    world.file("lib/deep/c.py", b"c\n")  # and a new file inside, also committed
    new = world.tree({"lib/a.py": b"a\n", "lib/deep/b.py": b"b\n", "lib/deep/c.py": b"c\n", "top": b"t\n"})
    world.move(old, new)
    entries = world.entries()
    assert set(entries) == {b"lib", b"lib/deep/c.py"}  # lib keeps its time only
    assert entries[b"lib"].base_tree is None and entries[b"lib/deep/c.py"].data is None


def test_a_directory_the_new_base_lacks_keeps_its_tree(world: World) -> None:
    old = world.tree({"docs/a.md": b"a\n", "docs/b.md": b"b\n"})
    world.file("docs/a.md", b"edited\n")
    world.move(old, world.tree({"README": b"r\n"}))
    entries = world.entries()
    assert entries[b"docs"].base_tree is not None  # by reference, nothing copied
    assert entries[b"docs/a.md"].data is not None
    assert entries[b"README"].kind is EntryKind.WHITEOUT


def test_a_file_open_in_a_handle_keeps_its_content_file(world: World) -> None:
    old = world.tree({"a.txt": b"one\n"})
    world.file("a.txt", b"two\n")
    data = world.entries()[b"a.txt"].data
    assert data is not None
    world.held.add(data)
    assert world.move(old, world.tree({"a.txt": b"two\n"})) == []
    assert world.entries()[b"a.txt"].data == data


def test_moving_there_and_back_leaves_the_overlay_as_small(world: World) -> None:
    """checkout other; checkout back: nothing that the first base holds stays."""
    first = world.tree({"a.txt": b"1\n", "d/x": b"x\n", "d/y": b"y\n"})
    second = world.tree({"a.txt": b"2\n", "d/x": b"x2\n", "e/z": b"z\n"})
    world.move(first, second)
    world.move(second, first)
    assert world.entries() == {}


def test_an_unchanged_mode_is_no_reason_to_keep_an_entry_but_a_changed_one_is(world: World) -> None:
    old = world.tree({"run.sh": b"#!/bin/sh\n"})
    world.file("run.sh", b"#!/bin/sh\n", mode=0o755, mtime=BASE_TIME)  # chmod +x, then committed
    world.move(old, world.tree({"run.sh": (b"#!/bin/sh\n", EXEC)}))
    assert world.entries() == {}
    world.file("run.sh", b"#!/bin/sh\n", mode=0o700, mtime=BASE_TIME)
    world.move(world.tree({"run.sh": (b"#!/bin/sh\n", EXEC)}), world.tree({"run.sh": (b"#!/bin/sh\n", EXEC), "x": b""}))
    assert replace(world.entries()[b"run.sh"], data=None).mode == 0o700
