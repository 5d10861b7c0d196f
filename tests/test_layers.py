"""The merged view of a real commit (the sample repository's trees, through pygit2) under a real
overlay: what each path shows after writes, removals and renames."""
from __future__ import annotations

from pathlib import Path

import pygit2
import pytest

from artifactfs.fs.layers import Layers, NotADirectory
from artifactfs.fs.nodes import Kind
from artifactfs.fs.overlay import EntryKind, Overlay, OverlayEntry

from .gitremote import SampleRepo

T = 1_700_000_000_000_000_000


@pytest.fixture
def layers(sample: SampleRepo, tmp_path: Path) -> Layers:
    repo = pygit2.Repository(str(sample.bare))
    return Layers(repo, str(repo.get(sample.head).tree_id), Overlay(tmp_path / "overlay"))


def names(layers: Layers, path: bytes) -> list[bytes]:
    shown = layers.resolve(path)
    assert shown is not None and shown.kind is Kind.DIR
    return list(layers.listing(shown))


def test_an_untouched_commit_shows_the_base(layers: Layers, sample: SampleRepo) -> None:
    app = layers.resolve(b"src/app.py")
    assert app is not None and app.kind is Kind.FILE and app.oid == sample.blob_id("src/app.py") and app.entry is None
    assert layers.resolve(b"bin/run.sh").kind is Kind.EXEC  # type: ignore[union-attr]
    assert layers.resolve(b"srclink").kind is Kind.LINK  # type: ignore[union-attr]
    assert layers.resolve(b"vendor/sub").kind is Kind.GITLINK  # type: ignore[union-attr]
    assert names(layers, b"src") == [b"app.py", b"lib"]
    assert layers.resolve(b"src/missing") is None
    with pytest.raises(NotADirectory):
        layers.resolve(b"README.md/x")


def test_writes_and_removals_show_over_the_base(layers: Layers) -> None:
    overlay = layers.overlay
    overlay.put(OverlayEntry(b"src/new.py", EntryKind.FILE, 0o755, T, data=overlay.new_data()))
    overlay.remove(b"src/app.py", in_base=True, mtime_ns=T)
    assert names(layers, b"src") == [b"lib", b"new.py"]
    assert layers.resolve(b"src/app.py") is None
    assert layers.resolve(b"src/new.py").kind is Kind.EXEC  # type: ignore[union-attr]
    overlay.remove(b"src", in_base=True, mtime_ns=T)  # rm -r src
    assert layers.resolve(b"src/lib/util.py") is None
    overlay.put(OverlayEntry(b"src", EntryKind.DIR, 0o755, T, opaque=True))  # mkdir src again: empty
    assert names(layers, b"src") == []
    assert layers.resolve(b"src/lib") is None


def test_a_renamed_base_directory_brings_its_tree_by_reference(layers: Layers, sample: SampleRepo) -> None:
    overlay = layers.overlay
    lib = layers.resolve(b"src/lib")
    assert lib is not None
    overlay.rename(b"src/lib", b"pkg", moved=OverlayEntry(b"src/lib", EntryKind.DIR, 0o755, T, base_tree=lib.oid),
                   old_in_base=True, mtime_ns=T)  # fmt: skip
    assert names(layers, b"pkg") == [b"data.json", b"util.py"]
    util = layers.resolve(b"pkg/util.py")
    assert util is not None and util.oid == sample.blob_id("src/lib/util.py")  # the same blob: nothing to fetch
    assert names(layers, b"src") == [b"app.py"]
    # A file written into the renamed directory shows beside the base's.
    overlay.put(OverlayEntry(b"pkg/extra.txt", EntryKind.FILE, 0o644, T, data=overlay.new_data()))
    assert names(layers, b"pkg") == [b"data.json", b"extra.txt", b"util.py"]
    # mkdir over a base directory that is still there (non-opaque): the base stays visible.
    overlay.put(OverlayEntry(b"docs", EntryKind.DIR, 0o700, T))
    assert b"link-to-readme" in names(layers, b"docs")
