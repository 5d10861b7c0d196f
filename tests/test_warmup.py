"""The warm-up's plan (artifactfs/fs/warmup.py) on a real blobless clone: the names a status looks
up, in git's order. The mount's use of it is tested in test_mount.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pygit2

from artifactfs.fs.warmup import TOUCH_SCRIPT, plan

from .gitremote import add_commit, git, make_sample_repo

RULES = {"a/.gitignore": b"*.o\n", "a/b/c/.gitignore": b"*.tmp\n", "a/b/.gitattributes": b"*.bin binary\n",
         "a/b/c/d/e.txt": b"below c\n", "x/y/.gitignore": b"*.log\n", "x/y/z.txt": b"y has no subdirectory\n"}  # fmt: skip


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
    # Every directory on the way to a .gitignore that the untracked cache records (one with a
    # subdirectory: not x/y's), parents first: its .gitattributes there or not, and only files
    # whose blobs are here (a blobless clone has none: their attributes would fetch them). Then
    # the sample's submodule.
    assert plan(repo, tree_of(repo)) == [
        b".gitattributes", b"a/.gitattributes", b"a/b/c/.gitattributes", b"vendor/sub", b"vendor/sub/.git",
    ]  # fmt: skip
    wanted = [".gitmodules", "a/.gitignore", "a/b/.gitattributes", "a/b/c/.gitignore", "x/y/.gitignore"]
    oids = [str(tree_of(repo)[path].id) for path in wanted]
    git("--git-dir", repo.path, "fetch", "-q", "origin", *oids)  # what preparation fetches
    assert plan(pygit2.Repository(repo.path), tree_of(repo)) == [
        b".gitattributes", b"a/.gitignore", b"a/.gitattributes", b"a/b/.gitattributes", b"a/b/c/.gitignore",
        b"a/b/c/.gitattributes", b".gitmodules", b"vendor/sub", b"vendor/sub/.git",
    ]  # fmt: skip


def test_the_plan_stops_walking_at_its_bound(tmp_path: Path) -> None:
    repo = blobless_clone(tmp_path)
    assert plan(repo, tree_of(repo), trees_limit=1) == [b".gitattributes"]


def test_the_lookups_follow_no_link_out_of_the_mount(tmp_path: Path) -> None:
    """The overlay is the sandbox's: a directory on the way may have become a link to anywhere."""
    mount, outside = tmp_path / "mount", tmp_path / "outside"
    (mount / "real").mkdir(parents=True)
    (mount / "real" / ".gitignore").write_text("*.o\n")
    outside.mkdir()
    (outside / ".gitignore").write_text("secret\n")
    (mount / "pkg").symlink_to(outside)
    names = ["real/.gitignore", "real/.gitattributes", "pkg/.gitignore", "../outside/.gitignore", "/etc/passwd"]
    touched = subprocess.run([sys.executable, "-I", "-S", str(TOUCH_SCRIPT), str(mount)], check=True,
                             input=b"".join(name.encode() + b"\0" for name in names), capture_output=True)  # fmt: skip
    assert touched.stdout == b"2\n"  # the file and the absence in real/; nothing through pkg or ..
