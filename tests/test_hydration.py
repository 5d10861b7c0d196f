"""Hydration at the scale of a real tree: a cold walk of any kind costs a few fetch transactions,
not one per directory, and shows what a plain checkout shows; names cost none.

A real git daemon serves a tree shaped like a source repository (3,425 files in 488 directories,
three levels deep); every walk runs in a mount of its own, cold, and in a plain clone, and the
transactions are the packs the daemon served.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from artifactfs.gitstore import pack_count
from artifactfs.procs import BACKGROUND_NICENESS, parent_pid

from .conftest import Artifactfs, command_lines, new_installation, wait_until
from .gitremote import GitDaemon, SampleRepo, git, make_deep_tree_repo, make_large_file_repo

MAX_WALK_TRANSACTIONS = 10


@dataclass
class Served:
    afs: Artifactfs
    daemon: GitDaemon
    repo: SampleRepo
    plain: Path
    names: list[str]  # registrations made so far

    def cold_mount(self, name: str) -> Path:
        """A new registration of the tree: a mount in which no file's content was read yet."""
        self.afs.add(name, self.daemon.url("deep.git"))
        self.names.append(name)
        return self.afs.wait_mounted(name)

    def transactions(self, action: Callable[[], object]) -> int:
        before = self.daemon.fetch_count("deep.git")
        action()
        return self.daemon.fetch_count("deep.git") - before


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("hydration")
    remotes = base / "served"
    remotes.mkdir()
    repo = make_deep_tree_repo(remotes, "deep")
    plain = base / "plain"
    git("clone", "-q", str(repo.bare), str(plain))
    afs = new_installation(base)
    with GitDaemon(remotes) as daemon:
        try:
            afs.start_daemon()
            yield Served(afs, daemon, repo, plain, [])
        finally:
            afs.cleanup()


def run(cwd: Path, *argv: str) -> str:
    return subprocess.run(argv, cwd=cwd, capture_output=True, check=True, timeout=300).stdout.decode()


def ls_shape(output: str) -> list[str]:
    """`ls -lR` without what a checkout's file system decides (link counts, directory sizes,
    block totals, times): type and permissions, and the size of files, by name."""
    shape = []
    for line in output.splitlines():
        fields = line.split()
        if line.startswith("total ") or not fields:
            continue
        if line.startswith("-"):
            shape.append(f"{fields[0]} {fields[4]} {fields[-1]}")
        elif line.startswith("d"):
            shape.append(f"{fields[0]} {fields[-1]}")
        else:
            shape.append(line)  # a directory's heading
    return shape


def file_sizes(output: str, files: set[str]) -> list[str]:
    """The lines of `du -ab` that are files of the tree (directories' sizes are the file system's)."""
    return sorted(line for line in output.splitlines() if line.split("\t", 1)[1].removeprefix("./") in files)


WALKS: dict[str, tuple[tuple[str, ...], Callable[[str, set[str]], list[str]]]] = {
    "ls -lR": (("ls", "-lR", "--time-style=+"), lambda out, _: ls_shape(out)),
    # (a plain checkout's .git is a directory, a mount's a file: neither is part of the tree)
    "grep -r": (("grep", "-r", "-c", "--exclude=.git", "--exclude-dir=.git", "lazy dog", "."), lambda out, _: sorted(out.splitlines())),
    "find -size +1k": (("find", ".", "-name", ".git", "-prune", "-o", "-size", "+1k", "-print"), lambda out, _: sorted(out.splitlines())),
    "du -ab": (("du", "-ab", "."), file_sizes),
}


@pytest.mark.parametrize("walk", list(WALKS))
def test_a_cold_walk_costs_a_few_transactions_and_shows_what_a_checkout_shows(served: Served, walk: str) -> None:
    argv, shape = WALKS[walk]
    mnt = served.cold_mount(f"walk{list(WALKS).index(walk)}")
    files = set(served.repo.files)
    outputs: list[str] = []
    count = served.transactions(lambda: outputs.append(run(mnt, *argv)))
    assert shape(outputs[0], files) == shape(run(served.plain, *argv), files)
    assert 1 <= count <= MAX_WALK_TRANSACTIONS, f"{walk}: {count} fetch transactions"
    # Everything the walk needed is here now: the same walk again costs nothing.
    assert served.transactions(lambda: run(mnt, *argv)) == 0


def test_names_cost_no_fetch(served: Served) -> None:
    mnt = served.cold_mount("names")
    count = served.transactions(lambda: (
        run(mnt, "ls", "-R"),
        run(mnt, "find", ".", "-name", "f3.txt"),
        run(mnt, "find", ".", "-type", "d"),
        run(mnt, "git", "ls-files"),
    ))  # fmt: skip
    assert count == 0
    assert sorted(run(mnt, "find", ".", "-name", "f3.txt").split()) == sorted(
        run(served.plain, "find", ".", "-name", "f3.txt").split())  # fmt: skip


def test_reading_a_few_files_fetches_only_their_directories(served: Served) -> None:
    """An editor's reads are not a walk: they never bring the subtree or the commit."""
    mnt = served.cold_mount("few")
    paths = ["p0/f1.txt", "p3/m2/f4.txt", "p5/m1/l7/f2.txt"]
    count = served.transactions(lambda: [(mnt / p).read_bytes() for p in paths])
    assert count == len(paths)
    missing = run(mnt, "git", "rev-list", "--objects", "--missing=print", "HEAD").count("\n?")
    assert missing >= len(served.repo.files) - 20  # the three, and what preparation fetched


def read_alone(served: Served, mnt: Path, path: str) -> None:
    """Read `path` while a large batch is held at the remote: it must return, right, in one
    transaction of its own (in a thread, so that a read stuck behind the batch fails the test
    rather than hanging it)."""
    before = served.daemon.fetch_count("deep.git")
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append((mnt / path).read_bytes()), daemon=True)
    reader.start()
    wait_until(lambda: bool(read), 30, what=f"the read of {path} to return while a large batch is held")
    assert read == [served.repo.files[path]]
    assert served.daemon.fetch_count("deep.git") == before + 1


def test_a_read_never_waits_behind_a_large_batch(served: Served) -> None:
    """While a walk's batch of the whole commit is held at the remote, another process's read
    goes in a small transaction of its own and returns; the walk completes once the batch does."""
    mnt = served.cold_mount("lanes")
    served.daemon.hold_large(100)
    try:
        walk = subprocess.Popen(["grep", "-r", "-c", "--exclude=.git", "lazy dog", "."], cwd=mnt,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        wait_until(served.daemon.holding_large, 60, what="the walk's large batch to be held at the remote")
        read_alone(served, mnt, "p6/m4/l8/f5.txt")
        assert walk.poll() is None  # still waiting for its batch
    finally:
        served.daemon.release_large()
    out, _ = walk.communicate(timeout=120)
    assert walk.returncode == 0
    assert len(out.splitlines()) == len(served.repo.files)  # a count for every file


# --- the backfill ---


def distinct_blobs(repo: SampleRepo) -> dict[str, int]:
    """The blobs of the tree by id, with their sizes (identical files are one blob)."""
    out = git("--git-dir", repo.bare, "ls-tree", "-r", "-l", "HEAD").stdout.decode()
    return {fields[2]: int(fields[3]) for fields in (line.split(None, 4) for line in out.splitlines())}


@contextmanager
def backfilling(served: Served, tmp_path: Path, policy: str) -> Iterator[Artifactfs]:
    """An installation of its own whose mounts backfill as `policy` says."""
    afs = new_installation(tmp_path)
    afs.env["ARTIFACTFS_BACKFILL"] = policy
    try:
        afs.start_daemon()
        yield afs
    finally:
        afs.cleanup()


def test_the_backfill_starts_at_the_first_miss_and_fetches_everything(served: Served, tmp_path: Path) -> None:
    blobs = distinct_blobs(served.repo)
    with backfilling(served, tmp_path, "used") as afs:
        afs.add("used", served.daemon.url("deep.git"))
        mnt = afs.wait_mounted("used")
        run(mnt, "ls", "-R")  # names only: not a use that fetches
        assert afs.status("used")["backfill"] == "waiting"
        assert (mnt / "p1/m1/f1.txt").read_bytes() == served.repo.files["p1/m1/f1.txt"]
        row = wait_until_backfilled(afs, "used")
        assert row["backfill_blobs"] == f"{len(blobs)}/{len(blobs)}"
        assert row["backfill_bytes"] == sum(blobs.values())
        missing = run(mnt, "git", "rev-list", "--objects", "--missing=print", "HEAD").count("\n?")
        assert missing == 0
        before = served.daemon.fetch_count("deep.git")
        run(mnt, "grep", "-r", "-c", "--exclude=.git", "lazy dog", ".")
        assert served.daemon.fetch_count("deep.git") == before  # the walk found everything here


def niceness(pid: int | None) -> int:
    assert pid is not None
    return os.getpriority(os.PRIO_PROCESS, pid)


def fetches_into(git_dir: Path) -> list[int]:
    """The git fetch processes at work in `git_dir`."""
    return [pid for pid, line in command_lines().items() if line.startswith("git ") and f"--git-dir={git_dir}" in line
            and " fetch " in line]  # fmt: skip


def test_a_read_during_a_backfill_goes_in_a_small_transaction_of_its_own(served: Served, tmp_path: Path) -> None:
    with backfilling(served, tmp_path, "ready") as afs:
        served.daemon.hold_large(100)
        try:
            afs.add("ready", served.daemon.url("deep.git"))
            mnt = afs.wait_mounted("ready")
            wait_until(served.daemon.holding_large, 60, what="the backfill's first batch to be held at the remote")
            assert afs.status("ready")["backfill"] == "running"
            # The backfill's git yields the cores to the sandbox's own commands (procs.in_background).
            fetches = fetches_into(afs.root / "git" / "ready.git")
            assert fetches and {niceness(pid) - niceness(parent_pid(pid)) for pid in fetches} == {BACKGROUND_NICENESS}
            read_alone(served, mnt, "p2/m3/l4/f6.txt")
        finally:
            served.daemon.release_large()
        row = wait_until_backfilled(afs, "ready")
        assert row["backfill_blobs"] == f"{len(distinct_blobs(served.repo))}/{len(distinct_blobs(served.repo))}"


def test_no_backfill_when_it_is_off(served: Served) -> None:
    mnt = served.cold_mount("off")  # the shared installation has it off
    (mnt / "p1/f1.txt").read_bytes()
    assert served.afs.status("off")["backfill"] == "off"


def wait_until_backfilled(afs: Artifactfs, name: str) -> dict[str, object]:
    rows: list[dict[str, object]] = []

    def done() -> bool:
        rows.append(afs.status(name))
        return rows[-1]["backfill"] == "done"

    wait_until(done, 120, interval=0.2, what=f"{name}'s backfill to finish")
    return rows[-1]


# --- large files ---

LARGE = 256 * 1024 * 1024
RSS_LIMIT = 150 * 1024 * 1024


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_256_mib_file_reads_back_whole_with_bounded_memory(served: Served) -> None:
    block = hashlib.sha256(b"block").digest() * 512  # 16 KiB, under zlib's window: a small pack
    repo = make_large_file_repo(served.daemon.base, "large", LARGE, block)
    expected = hashlib.sha256(repo.files["big.bin"]).hexdigest()
    del repo.files["big.bin"]  # the test process need not hold it either
    served.afs.add("large", served.daemon.url("large.git"))
    mnt = served.afs.wait_mounted("large")
    assert (mnt / "big.bin").stat().st_size == LARGE
    digest = hashlib.sha256()
    with open(mnt / "big.bin", "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == expected
    peak = peak_rss(served.afs.wait_mount_process("large"))
    assert peak < RSS_LIMIT, f"the mount process peaked at {peak / 2**20:.0f} MiB"


# --- the clone's filter ---


def test_a_blob_limit_filter_brings_small_files_with_the_clone(served: Served) -> None:
    served.afs.add("limited", served.daemon.url("deep.git"), "--filter", "blob:limit=1k")
    mnt = served.afs.wait_mounted("limited")
    row = served.afs.status("limited")
    assert row["filter"] == "blob:limit=1k"
    blobs = distinct_blobs(served.repo)
    missing = {line[1:] for line in run(mnt, "git", "rev-list", "--objects", "--missing=print", "HEAD").splitlines()
               if line.startswith("?")}  # fmt: skip
    assert missing == {oid for oid, size in blobs.items() if size >= 1024}  # git omits blobs of SIZE and more
    config = run(mnt, "git", "config", "--get", "remote.origin.partialclonefilter").strip()
    assert config == "blob:limit=1024"  # as git records it
    # Small files cost no fetch, not even a stat of their size; a large one fetches itself.
    small = next(p for p, c in served.repo.files.items() if len(c) < 1024 and p.startswith("p4/"))
    large = next(p for p, c in served.repo.files.items() if len(c) >= 1024 and p.startswith("p4/"))
    count = served.transactions(lambda: ((mnt / small).read_bytes(), (mnt / small).stat()))
    assert count == 0
    assert (mnt / large).read_bytes() == served.repo.files[large]
    served.cold_mount("unfiltered")
    assert served.afs.status("unfiltered")["filter"] == "blob:none"  # the default


# --- packs ---


def test_packs_are_consolidated_while_mounted_and_every_object_stays_readable(served: Served, tmp_path: Path) -> None:
    """Each batch adds a pack; past the limit the mount repacks, serving all along."""
    afs = new_installation(tmp_path)
    afs.env["ARTIFACTFS_PACK_LIMIT"] = "8"
    try:
        afs.start_daemon()
        afs.add("packs", served.daemon.url("deep.git"))
        mnt = afs.wait_mounted("packs")
        git_dir = afs.root / "git" / "packs.git"
        # Files of different directories, read by path one after another: one batch each.
        paths = [f"p{p}/m{m}/f{m % 7}.txt" for p in range(8) for m in range(4)]
        for path in paths:
            assert (mnt / path).read_bytes() == served.repo.files[path]
        log = afs.root / "mountd.log"  # where mountd and its mount processes write (start_daemon)
        wait_until(lambda: "consolidated" in log.read_text(errors="replace"), 60, what="a consolidation to be logged")
        wait_until(lambda: pack_count(git_dir) <= 8, 60, what="the packs to be consolidated")
        for path in paths:  # through the mount again, and straight from git: all here, all right
            assert (mnt / path).read_bytes() == served.repo.files[path]
        ids = "".join(f"{served.repo.blob_id(p)}\n" for p in paths)
        check = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "--batch-check"], input=ids.encode(),
                               capture_output=True, check=True).stdout.decode()  # fmt: skip
        assert "missing" not in check and check.count("blob") == len(paths)
        assert run(mnt, "git", "rev-list", "--objects", "--missing=print", "HEAD").count("\n?") > 0  # still partial
    finally:
        afs.cleanup()
