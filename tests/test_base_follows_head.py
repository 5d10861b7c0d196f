"""When git moves HEAD inside a mount, the mount's base moves along: what is committed leaves the
overlay, what is not stays, the tree looks the same as in a plain clone throughout, and so it does
after the mount process restarts."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from .conftest import Artifactfs, wait_until
from .gitremote import SampleRepo
from .test_git_in_mount import Both, both, edit, git  # noqa: F401  (both: the fixture)


def content_files(afs: Artifactfs) -> list[str]:
    """The overlay's content files: copies of what was written through the mount."""
    return sorted(os.listdir(afs.root / "state" / "both" / "overlay" / "data"))


def wait_base(afs: Artifactfs, root: Path) -> str:
    """Wait until the mount's base is the commit HEAD names (it looks every second, and when git
    asks its fsmonitor hook)."""
    head = git(root, "rev-parse", "HEAD").strip()
    wait_until(lambda: afs.describe_mount("both")["base"] == head, 20, interval=0.05, what=f"the base to reach {head}")
    return head


def test_a_commit_takes_its_content_out_of_the_overlay(both: tuple[Both, Artifactfs, SampleRepo]) -> None:
    pair, afs, _ = both
    pair.do(edit)
    (pair.mnt / "notes.txt").write_bytes(b"not for the commit\n")
    (pair.plain / "notes.txt").write_bytes(b"not for the commit\n")
    held = content_files(afs)
    assert len(held) == 4  # src/app.py, new.txt, pkg/deep/mod.py and notes.txt (the rest by reference)
    pair.git("add", "-A", ":!notes.txt")
    pair.git("commit", "-q", "-m", "Edit")
    wait_base(afs, pair.mnt)
    assert len(content_files(afs)) == 1  # only the uncommitted notes.txt keeps a copy
    pair.same("the base followed the commit")
    assert git(pair.mnt, "status", "--porcelain") == "?? notes.txt\n"


def test_reset_and_checkout_keep_the_tree_and_the_base_survives_a_restart(
    both: tuple[Both, Artifactfs, SampleRepo],
) -> None:
    pair, afs, _ = both
    pair.git("switch", "-q", "-c", "topic")
    pair.do(edit)
    pair.git("add", "-A")
    pair.git("commit", "-q", "-m", "On topic")
    pair.git("reset", "-q", "--soft", "HEAD~1")  # HEAD back, files not: kept by reference
    wait_base(afs, pair.mnt)
    pair.same("git reset --soft")
    pair.git("commit", "-q", "-m", "Again on topic")
    pair.git("checkout", "-q", "main")
    wait_base(afs, pair.mnt)
    pair.same("git checkout main")
    assert content_files(afs) == []  # everything git wrote is main's own content again
    pair.do(lambda root: (root / "src/lib/util.py").write_bytes(b"uncommitted\n"))
    pair.git("checkout", "-q", "topic")  # carries the edit along, as git does
    base = wait_base(afs, pair.mnt)
    server = afs.wait_mount_process("both")
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: afs.mount_process("both") not in (None, server), 30, what="mountd to remount")
    afs.wait_mounted("both")
    wait_until(lambda: (pair.mnt / "src").exists(), what="the remounted tree")
    assert afs.describe_mount("both")["base"] == base  # not the prepared commit: the overlay is against this one
    pair.same("a restart of the mount process")
