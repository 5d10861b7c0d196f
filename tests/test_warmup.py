"""The warm-up's plan (artifactfs/fs/warmup.py) on a real blobless clone: what a status reads,
parents first, and never a blob the clone lacks. The mount's use of it is tested in test_mount.py."""
from __future__ import annotations

from pathlib import Path

import pygit2

from artifactfs.fs.warmup import plan

from .gitremote import add_commit, git, make_sample_repo

RULES = {"a/.gitignore": b"*.o\n", "a/b/c/.gitignore": b"*.tmp\n", "a/b/.gitattributes": b"*.bin binary\n",
         "x/y/z.txt": b"no rules here\n", ".gitmodules": b""}  # fmt: skip


def blobless_clone(tmp_path: Path) -> pygit2.Repository:
    sample = make_sample_repo(tmp_path, "rules")
    add_commit(sample, RULES, "rules in a deep tree")
    clone = tmp_path / "clone.git"
    git("clone", "-q", "--bare", "--filter=blob:none", f"file://{sample.bare}", clone)
    return pygit2.Repository(str(clone))


def tree_of(repo: pygit2.Repository) -> pygit2.Tree:
    return repo.head.peel(pygit2.Commit).tree


def test_the_plan_looks_where_a_status_reads_and_opens_only_present_blobs(tmp_path: Path) -> None:
    repo = blobless_clone(tmp_path)
    cold = plan(repo, tree_of(repo))
    assert cold.opens == []  # a blobless clone holds none of them: opening one would fetch it
    # The .gitattributes of every directory on the way to a .gitignore, parents first; x/ has
    # no rules and is left alone.
    assert cold.looks == [".gitattributes", "a/.gitattributes", "a/b/c/.gitattributes",
                          "vendor/sub", "vendor/sub/.git"]  # and the sample's submodule  # fmt: skip
    wanted = [".gitmodules", "a/.gitignore", "a/b/c/.gitignore", "a/b/.gitattributes"]
    oids = [str(tree_of(repo)[path].id) for path in wanted]
    git("--git-dir", repo.path, "fetch", "-q", "origin", *oids)  # what preparation fetches
    warm = plan(pygit2.Repository(repo.path), tree_of(repo))
    assert warm.opens == [".gitmodules", "a/.gitignore", "a/b/.gitattributes", "a/b/c/.gitignore"]
    assert warm.looks == cold.looks


def test_the_plan_stops_walking_at_its_bound(tmp_path: Path) -> None:
    repo = blobless_clone(tmp_path)
    assert plan(repo, tree_of(repo), trees_limit=1).looks == [".gitattributes"]
