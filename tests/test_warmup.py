"""The warm-up's plan (artifactfs/fs/warmup.py) on a real blobless clone: the names a status looks
up, in git's order. The mount's use of it is tested in test_mount.py."""
from __future__ import annotations

from pathlib import Path

import pygit2

from artifactfs.fs.warmup import plan

from .gitremote import add_commit, git, make_sample_repo

RULES = {"a/.gitignore": b"*.o\n", "a/b/c/.gitignore": b"*.tmp\n", "a/b/.gitattributes": b"*.bin binary\n",
         "x/y/z.txt": b"no rules here\n"}  # fmt: skip


def blobless_clone(tmp_path: Path) -> pygit2.Repository:
    sample = make_sample_repo(tmp_path, "rules")
    add_commit(sample, RULES, "rules in a deep tree")
    clone = tmp_path / "clone.git"
    git("clone", "-q", "--bare", "--filter=blob:none", f"file://{sample.bare}", clone)
    return pygit2.Repository(str(clone))


def tree_of(repo: pygit2.Repository) -> pygit2.Tree:
    return repo.head.peel(pygit2.Commit).tree


def test_the_plan_names_what_a_status_looks_up_parents_first(tmp_path: Path) -> None:
    repo = blobless_clone(tmp_path)
    # Every directory on the way to a .gitignore, parents first: its .gitignore if it has one
    # (a blobless clone lacks their blobs: a lookup needs none) and its .gitattributes, there or
    # not; x/ has no rules and is left alone. Then the .gitmodules and the sample's submodule.
    assert plan(repo, tree_of(repo)) == [
        ".gitattributes", "a/.gitignore", "a/.gitattributes", "a/b/.gitattributes", "a/b/c/.gitignore",
        "a/b/c/.gitattributes", ".gitmodules", "vendor/sub", "vendor/sub/.git",
    ]  # fmt: skip


def test_the_plan_stops_walking_at_its_bound(tmp_path: Path) -> None:
    repo = blobless_clone(tmp_path)
    assert plan(repo, tree_of(repo), trees_limit=1) == [".gitattributes", ".gitmodules"]
