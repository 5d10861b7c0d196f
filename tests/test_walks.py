"""The rule that tells a walk of the tree from reads of a few files (unit tests of walks.py)."""
from __future__ import annotations

from artifactfs.fs.walks import Reach, Scope, WalkWatch, common_directory, depth, is_under


def test_paths() -> None:
    assert common_directory([b"a/b/c", b"a/b/d", b"a/b"]) == b"a/b"
    assert common_directory([b"a/b", b"c"]) == b""
    assert common_directory([b"", b"a"]) == b""
    assert is_under(b"a/b", b"a") and is_under(b"a", b"a") and is_under(b"a", b"")
    assert not is_under(b"ab", b"a")
    assert (depth(b""), depth(b"a"), depth(b"a/b/c")) == (0, 1, 3)


def test_a_walk_takes_its_subtree_then_everything() -> None:
    watch = WalkWatch()
    assert watch.reach(b"src/a", 0.0) == Reach(Scope.DIRECTORY, b"src/a")
    assert watch.reach(b"src/a/x", 0.1) == Reach(Scope.DIRECTORY, b"src/a/x")
    assert watch.reach(b"src/b", 0.2) == Reach(Scope.SUBTREE, b"src")
    # Inside the subtree taken, nothing more (its batch brings it); outside, a second directory
    # makes it a walk of everything.
    assert watch.reach(b"src/c", 0.3) == Reach(Scope.DIRECTORY, b"src/c")
    assert watch.reach(b"docs", 0.4) == Reach(Scope.DIRECTORY, b"docs")
    assert watch.reach(b"tests", 0.5) == Reach(Scope.COMMIT, b"")


def test_a_walk_from_the_top_takes_everything_at_once() -> None:
    watch = WalkWatch()
    watch.reach(b"", 0.0)
    watch.reach(b"a", 0.1)
    assert watch.reach(b"a/b", 0.2) == Reach(Scope.COMMIT, b"")


def test_reads_far_apart_in_time_are_no_walk() -> None:
    watch = WalkWatch(window=2.0)
    for n, directory in enumerate((b"a", b"b", b"c", b"d")):
        assert watch.reach(directory, n * 3.0).scope is Scope.DIRECTORY


def test_the_same_directory_again_is_no_walk() -> None:
    watch = WalkWatch()
    for n in range(10):
        assert watch.reach(b"a", n * 0.1).scope is Scope.DIRECTORY
