"""add-repo --owner USER: the sandbox's user edits, runs git and commits in the mount, and nothing
of theirs (their git configuration, their hooks, their directories) ever runs or is walked with
root's rights."""
from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from .conftest import Artifactfs, wait_until
from .gitremote import GitDaemon, add_commit, make_sample_repo

NOBODY = pwd.getpwnam("nobody")


def as_nobody(mnt: Path, *args: str, check: bool = True) -> str:
    """git as nobody in the mount, with a home of nobody's (theirs does not exist)."""
    proc = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", "HOME=/tmp", "GIT_CONFIG_NOSYSTEM=1", "GIT_AUTHOR_NAME=Nobody",
         "GIT_AUTHOR_EMAIL=nobody@example.com", "GIT_COMMITTER_NAME=Nobody", "GIT_COMMITTER_EMAIL=nobody@example.com",
         "git", "-C", str(mnt), *args], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, f"git {' '.join(args)} as nobody: {proc.stderr}"
    return proc.stdout


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


@pytest.mark.parametrize("how", ["blocking", "async"])
def test_an_owner_edits_runs_git_and_commits_in_the_mount(reachable_afs: Artifactfs, git_daemon: GitDaemon, how: str) -> None:
    afs = reachable_afs
    sample = make_sample_repo(git_daemon.base, "owned")
    if how == "async":
        afs.up()
        afs.run("add-repo", "--async", "--name", "owned", "--remote", git_daemon.url("owned.git"), "--owner", "nobody")
        afs.wait_state("owned", "mounted")
    else:
        afs.add("owned", git_daemon.url("owned.git"), "--owner", "nobody")
        afs.start_daemon()
    mnt = afs.wait_mounted("owned")
    ids = {(p.stat().st_uid, p.stat().st_gid) for p in (mnt, mnt / ".git", mnt / "src/app.py")}
    assert ids == {(NOBODY.pw_uid, NOBODY.pw_gid)}
    # The mount process serves the tree as nobody: it reads their git directory, fetches into it
    # and writes their overlay with their rights alone.
    assert uid_of(afs.wait_mount_process("owned")) == NOBODY.pw_uid
    git_dir = afs.root / "git" / "owned.git"
    assert [p for p in [git_dir, *git_dir.rglob("*")] if p.lstat().st_uid != NOBODY.pw_uid] == []
    subprocess.run(["runuser", "-u", "nobody", "--", "sh", "-c", f"echo 'by nobody' >> {mnt}/src/app.py"], check=True)
    assert (mnt / "src/app.py").read_bytes() == sample.files["src/app.py"] + b"by nobody\n"
    assert as_nobody(mnt, "status", "--porcelain") == " M src/app.py\n"  # no "dubious ownership"
    as_nobody(mnt, "commit", "-q", "-a", "-m", "by nobody")
    assert as_nobody(mnt, "log", "-1", "--format=%s").strip() == "by nobody"
    assert as_nobody(mnt, "status", "--porcelain") == ""
    # Every other repository's git directory stays root's alone: the git root is only traversable.
    assert stat.S_IMODE((afs.root / "git").stat().st_mode) == 0o711
    assert stat.S_IMODE((afs.root / "state").stat().st_mode) == 0o711


def test_what_an_owner_configures_never_runs_as_root(reachable_afs: Artifactfs, git_daemon: GitDaemon) -> None:
    """Their git directory is theirs to configure: a hook there runs when a preparation moves the
    branch, and must run as them, never as root."""
    afs = reachable_afs
    sample = make_sample_repo(git_daemon.base, "hooked")
    afs.add("hooked", git_daemon.url("hooked.git"), "--owner", "nobody")
    git_dir = afs.root / "git" / "hooked.git"
    seen = afs.root.parent / "hook-ran-as"
    seen.mkdir(mode=0o777)
    seen.chmod(0o777)
    hook = git_dir / "hooks" / "reference-transaction"
    script = f"#!/bin/sh\nid -u >> {seen}/uids\n"
    subprocess.run(["runuser", "-u", "nobody", "--", "sh", "-c", f"mkdir -p {hook.parent} && cat > {hook} && chmod +x {hook}"],
                   input=script, text=True, check=True)  # fmt: skip
    newer = add_commit(sample, {"NEWS": b"news\n"}, "News")
    afs.up()
    afs.run("prepare", "--name", "hooked")  # a job: the worker fetches and moves the branch, the hook runs
    wait_until(lambda: afs.status("hooked")["head"] == newer, 60, interval=0.1, what="the refresh")
    uids = (seen / "uids").read_text().split()
    assert uids and set(uids) == {str(NOBODY.pw_uid)}, uids
    wait_until(lambda: not any(p.name.endswith(".lock") for p in git_dir.iterdir()), what="no lock left")
    assert os.stat(git_dir / "index").st_uid == NOBODY.pw_uid  # the new index is theirs too
