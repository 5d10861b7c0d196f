"""The mounted tree through a real FUSE mount run by mountd: contents, modes, git inside it,
laziness and batching (writes: test_writes.py)."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.control import MountUnresponsive

from .conftest import Artifactfs, new_installation, sample_mounted, wait_until
from .gitremote import GitDaemon, SampleRepo, add_commit, make_many_files_repo, make_sample_repo


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory, sample: SampleRepo) -> Iterator[tuple[Artifactfs, Path]]:
    """The sample repository added over file:// and mounted by a running mountd."""
    with sample_mounted(tmp_path_factory.mktemp("mounted"), sample) as mounted:
        yield mounted


def git_out(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def present_blobs(git_dir: Path) -> set[str]:
    out = git_out(f"--git-dir={git_dir}", "cat-file", "--batch-all-objects", "--batch-check=%(objecttype) %(objectname)")
    return {line.split()[1] for line in out.splitlines() if line.startswith("blob ")}


def walk(root: Path) -> dict[str, os.stat_result]:
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = path.lstat()
    return found


def test_tree_lists_every_path_with_its_kind(mounted: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    _, mnt = mounted
    entries = walk(mnt)
    expected = set(sample.files) | set(sample.symlinks) | set(sample.gitlinks)
    parents = {str(d) for p in expected for d in Path(p).parents if str(d) != "."}
    assert set(entries) == expected | parents | {".git"}
    for path in sample.files:
        assert stat.S_ISREG(entries[path].st_mode), path
    for path in sample.symlinks:
        assert stat.S_ISLNK(entries[path].st_mode), path
    for path in sample.gitlinks:
        assert stat.S_ISDIR(entries[path].st_mode), path
        assert os.listdir(mnt / path) == []  # a submodule shows as an empty directory


def test_every_file_reads_back_byte_for_byte(mounted: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    _, mnt = mounted
    for path, content in sample.files.items():
        data = (mnt / path).read_bytes()
        assert data == content, path
        # ...and equals what git itself says the blob is.
        blob = subprocess.run(["git", f"--git-dir={sample.bare}", "cat-file", "blob", sample.blob_id(path)],
                              capture_output=True, check=True).stdout  # fmt: skip
        assert data == blob, path
        assert (mnt / path).stat().st_size == len(content), path


def test_symlinks_and_executable_bits(mounted: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    _, mnt = mounted
    for path, target in sample.symlinks.items():
        assert os.readlink(mnt / path) == target
    assert (mnt / "docs/link-to-readme").read_bytes() == sample.files["README.md"]
    assert sorted(os.listdir(mnt / "srclink")) == sorted(os.listdir(mnt / "src"))
    for path in sample.files:
        mode = (mnt / path).stat().st_mode
        assert bool(mode & stat.S_IXUSR) == (path in sample.executables), path
    assert sample.executables, "the sample must have an executable"
    out = subprocess.run([str(mnt / sorted(sample.executables)[0])], capture_output=True)
    assert out.returncode == 0


def test_git_commands_work_inside_the_mount(mounted: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    afs, mnt = mounted
    assert (mnt / ".git").read_text() == f"gitdir: {afs.root / 'git' / 'sample.git'}\n"
    assert git_out("rev-parse", "HEAD", cwd=mnt).strip() == sample.head
    assert git_out("rev-parse", "--show-toplevel", cwd=mnt).strip() == str(mnt)
    log = git_out("log", "--format=%H", cwd=mnt).split()
    assert log == list(reversed(sample.history))
    shown = subprocess.run(["git", "show", "HEAD:README.md"], cwd=mnt, capture_output=True, check=True).stdout
    assert shown == sample.files["README.md"]
    assert git_out("ls-files", cwd=mnt).splitlines()  # the index was populated


def test_status_reports_mounted_and_hydration(mounted: tuple[Artifactfs, Path], sample: SampleRepo) -> None:
    afs, mnt = mounted
    (mnt / "README.md").read_bytes()
    row = afs.status("sample")
    assert row["state"] == "mounted" and row["head"] == sample.head
    assert row["hydrated_blobs"] >= 1 and row["hydrated_bytes"] >= len(sample.files["README.md"])


@pytest.fixture
def served_many(git_daemon: GitDaemon) -> SampleRepo:
    return make_many_files_repo(git_daemon.base, "many", files=5000, dirs=50)


def test_reading_one_file_fetches_that_blob_only(afs: Artifactfs, git_daemon: GitDaemon, served_many: SampleRepo) -> None:
    afs.add("many", git_daemon.url("many.git"))
    git_dir = afs.root / "git" / "many.git"
    assert present_blobs(git_dir) == set()  # a blobless clone
    afs.start_daemon()
    mnt = afs.wait_mounted("many")
    git_daemon.reset_count()
    path = "d017/f1017.txt"
    assert (mnt / path).read_bytes() == served_many.files[path]
    assert present_blobs(git_dir) == {served_many.blob_id(path)}
    assert git_daemon.fetch_count() == 1
    # Hydrated blobs never touch the network again, even with the remote broken.
    git_daemon.set_broken(True)
    assert (mnt / path).read_bytes() == served_many.files[path]
    assert git_daemon.fetch_count() == 1
    # A blob that is not hydrated cannot be read while the remote is broken: EIO, not garbage.
    with pytest.raises(OSError) as info:
        (mnt / "d018/f1018.txt").read_bytes()
    assert info.value.errno == errno.EIO
    git_daemon.set_broken(False)
    assert (mnt / "d018/f1018.txt").read_bytes() == served_many.files["d018/f1018.txt"]


def test_reading_many_files_costs_few_fetch_transactions(afs: Artifactfs, git_daemon: GitDaemon, served_many: SampleRepo) -> None:
    afs.add("many", git_daemon.url("many.git"))
    afs.start_daemon()
    mnt = afs.wait_mounted("many")
    git_daemon.reset_count()
    files = 0
    for dirpath, _dirs, names in os.walk(mnt):
        for name in names:
            path = Path(dirpath) / name
            rel = str(path.relative_to(mnt))
            if rel == ".git":
                continue
            assert path.read_bytes() == served_many.files[rel], rel
            files += 1
    assert files == len(served_many.files)
    transactions = git_daemon.fetch_count()
    # Never one per file (5,001), nor one per directory (51): a walk takes a few directories,
    # then everything at once.
    assert transactions <= 10, transactions
    assert present_blobs(afs.root / "git" / "many.git") == {served_many.blob_id(p) for p in served_many.files}


def test_concurrent_readers_share_one_fetch(afs: Artifactfs, git_daemon: GitDaemon) -> None:
    sample = make_sample_repo(git_daemon.base, "shared")
    afs.add("shared", git_daemon.url("shared.git"))
    afs.start_daemon()
    mnt = afs.wait_mounted("shared")
    git_daemon.reset_count()
    git_daemon.set_delay(0.5)  # keep the fetch in flight while every reader arrives
    results: list[bytes] = []
    readers = [threading.Thread(target=lambda: results.append((mnt / "assets/big.txt").read_bytes())) for _ in range(8)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
    assert results == [sample.files["assets/big.txt"]] * 8
    assert git_daemon.fetch_count() == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["upgrade", "crash"])
def test_mounts_outlive_mountd_and_the_next_one_adopts_them(afs: Artifactfs, git_daemon: GitDaemon, sig: int) -> None:
    sample = make_sample_repo(git_daemon.base, "restart")
    afs.add("restart", git_daemon.url("restart.git"))
    daemon = afs.start_daemon()
    mnt = afs.wait_mounted("restart")
    assert (mnt / "src/app.py").read_bytes() == sample.files["src/app.py"]
    server = afs.wait_mount_process("restart")
    hydrated = afs.status("restart")["hydrated_blobs"]
    afs.stop_daemon(daemon, sig=sig)
    # No mountd now: the mount keeps serving, hydrated and unhydrated files alike.
    assert afs.status("restart")["state"] == "mounted"
    assert (mnt / "src/app.py").read_bytes() == sample.files["src/app.py"]
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    git_daemon.set_broken(True)  # what was hydrated must come from local objects alone
    git_daemon.reset_count()
    afs.start_daemon("mountd2.log")
    adopted = lambda: "adopted mount process" in (afs.root / "mountd2.log").read_text()  # noqa: E731
    wait_until(adopted, what="the new mountd to adopt the mount")
    assert afs.mount_process("restart") == server  # the same process: adopted, not replaced
    assert (mnt / "src/app.py").read_bytes() == sample.files["src/app.py"]
    assert afs.status("restart")["hydrated_blobs"] == hydrated + 1
    assert git_daemon.fetch_count() == 0
    # Adopted means supervised again: removal takes the mount down through it.
    afs.run("remove-repo", "--name", "restart")
    afs.wait_unmounted("restart")
    wait_until(lambda: afs.mount_process("restart") is None, what="the mount process to exit")


def test_daemon_follows_adds_and_removes(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.start_daemon()
    afs.add("late", sample.url)
    mnt = afs.wait_mounted("late")
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]
    afs.run("remove-repo", "--name", "late")
    afs.wait_unmounted("late")
    assert not (afs.root / "git" / "late.git").exists()
    wait_until(lambda: not mnt.exists(), what="the mount directory to go")


def readable(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENOTCONN while the mount is stale
        return False


def test_a_crashed_mount_process_is_replaced(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("crash", sample.url)
    afs.start_daemon()
    mnt = afs.wait_mounted("crash")
    pid = afs.wait_mount_process("crash")
    os.kill(pid, 9)  # the FUSE server dies: the mount is left stale (ENOTCONN)
    wait_until(lambda: afs.mount_process("crash") not in (None, pid), what="a new mount process")
    wait_until(lambda: readable(mnt / "README.md"), what="the mount to come back")
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]


def test_a_new_daemon_takes_down_a_stale_mount(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("stale", sample.url)
    daemon = afs.start_daemon()
    mnt = afs.wait_mounted("stale")
    pid = afs.wait_mount_process("stale")
    os.kill(pid, 9)
    afs.stop_daemon(daemon, sig=9)  # nobody is left to clean up
    with pytest.raises(OSError) as info:
        os.stat(mnt / "README.md")
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    afs.start_daemon("mountd2.log")
    wait_until(lambda: readable(mnt / "README.md"), what="the mount to come back")
    assert (mnt / "README.md").read_bytes() == sample.files["README.md"]


def test_statting_files_one_by_one_brings_their_directory_along(afs: Artifactfs, git_daemon: GitDaemon, served_many: SampleRepo) -> None:
    afs.add("many", git_daemon.url("many.git"))
    afs.start_daemon()
    mnt = afs.wait_mounted("many")
    git_daemon.reset_count()
    # git status and builds stat tracked files by path, without listing their directories.
    in_d003 = sorted(p for p in served_many.files if p.startswith("d003/"))
    for path in in_d003:
        assert (mnt / path).stat().st_size == len(served_many.files[path])
    assert git_daemon.fetch_count() == 2  # the first file alone, then the rest of the directory
    fetched = present_blobs(afs.root / "git" / "many.git")
    assert fetched == {served_many.blob_id(p) for p in in_d003}


def test_other_users_can_read_the_mount(reachable_afs: Artifactfs, sample: SampleRepo) -> None:
    """Sandboxes rarely run as the user that runs mountd."""
    afs = reachable_afs
    afs.add("shared", sample.url)
    afs.start_daemon()
    mnt = afs.wait_mounted("shared")
    as_nobody = ["runuser", "-u", "nobody", "--"]
    out = subprocess.run([*as_nobody, "cat", str(mnt / "src/app.py")], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == sample.files["src/app.py"]
    listing = subprocess.run([*as_nobody, "ls", str(mnt / "src")], capture_output=True, text=True)
    assert "app.py" in listing.stdout.split()
    denied = subprocess.run([*as_nobody, "touch", str(mnt / "src/app.py")], capture_output=True)
    assert denied.returncode != 0


def test_git_status_inside_the_mount_fetches_nothing(afs: Artifactfs, git_daemon: GitDaemon, served_many: SampleRepo) -> None:
    afs.add("many", git_daemon.url("many.git"))
    afs.start_daemon()
    mnt = afs.wait_mounted("many")
    git_daemon.reset_count()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=mnt, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert status.stdout == ""  # clean: the mount is the commit
    assert git_daemon.fetch_count() == 0  # and no blob was downloaded to find that out
    assert present_blobs(afs.root / "git" / "many.git") == set()
    # Not `git diff HEAD`: git 2.39 leaves the stat of a monitor-valid entry unset there (fixed in
    # git 2.43, "diff-lib: fix check_removed when fsmonitor is on"); see the README's limits.
    assert git_out("diff", "--stat", cwd=mnt) == "" and git_out("diff", "--stat", "--cached", cwd=mnt) == ""
    assert present_blobs(afs.root / "git" / "many.git") == set()


def test_preparation_brings_what_git_status_reads_in_one_transaction(afs: Artifactfs, git_daemon: GitDaemon) -> None:
    sample = make_sample_repo(git_daemon.base, "rules")
    rules = {".gitignore": b"*.o\n", "src/.gitignore": b"build/\n", "src/lib/.gitignore": b"*.tmp\n",
             ".gitattributes": b"*.bin binary\n", "docs/.gitattributes": b"*.md text\n"}  # fmt: skip
    add_commit(sample, rules, "ignore rules")
    git_daemon.reset_count()
    afs.add("rules", git_daemon.url("rules.git"))
    assert git_daemon.fetch_count() == 2  # the blobless clone, then every rule file at once
    wanted = {sample.blob_id(path) for path in [*rules, ".gitmodules"]}
    assert present_blobs(afs.root / "git" / "rules.git") == wanted
    afs.start_daemon()
    mnt = afs.wait_mounted("rules")
    git_daemon.reset_count()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=mnt, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout == "", status.stderr
    assert git_daemon.fetch_count() == 0  # git read its ignore rules and attributes from local blobs


def resident_pages(path: Path) -> list[bool]:
    """Which pages of `path` the kernel's page cache holds, without reading any (mincore(2) of a
    mapping that is never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
            assert libc.mincore(address, size, pages) == 0, os.strerror(ctypes.get_errno())
            return [bool(page & 1) for page in pages]
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def warmed(afs: Artifactfs, name: str) -> bool:
    """Whether the mount process says its warm-up is done. The mount shows in the mount table a
    moment before its control socket listens: no answer yet is a no."""
    try:
        return bool((afs.describe_mount(name).get("warmed") or {}).get("done"))  # type: ignore[union-attr]
    except MountUnresponsive:
        return False


def test_the_mount_warms_the_kernels_caches_with_what_a_status_reads_and_fetches_nothing(
        afs: Artifactfs, git_daemon: GitDaemon) -> None:  # fmt: skip
    """Once a commit is shown, the mount looks up the names a status reads, so the kernel holds
    those entries before the first git command: that status sends the mount almost no LOOKUP,
    and nothing is fetched."""
    sample = make_sample_repo(git_daemon.base, "warm")
    rules = {f"pkg{p}/mod{m}/.gitignore": b"*.pyc\n" for p in range(3) for m in range(2)}
    sources = {f"pkg{p}/mod{m}/src/main.py": b"pass\n" for p in range(3) for m in range(2)}
    add_commit(sample, {**rules, **sources, "pkg0/.gitattributes": b"*.bin binary\n"}, "rules in a deep tree")
    afs.add("warm", git_daemon.url("warm.git"))
    git_daemon.reset_count()
    afs.start_daemon()
    mnt = afs.wait_mounted("warm")
    wait_until(lambda: warmed(afs, "warm"), 20, what="the warm-up")
    described = afs.describe_mount("warm")
    # The six .gitignores, a .gitattributes (there or not) at the top, in the three packages and
    # the six modules, the .gitmodules, and the sample's submodule: its path and the .git in it.
    assert ".gitignore" not in sample.files and sample.gitlinks.keys() == {"vendor/sub"}
    assert described["warmed"]["looked_up"] == len(rules) + 10 + 1 + 2  # type: ignore[index]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=mnt, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout == "", status.stderr
    # What the status still looked up: .git, and the fsmonitor answer (a name of its own for each
    # query, see fsmonitor.py). A cold mount sends one LOOKUP per name above and per directory.
    assert afs.describe_mount("warm")["lookups"] - described["lookups"] <= 2  # type: ignore[operator]
    assert git_daemon.fetch_count() == 0


def test_an_opened_gitignore_is_in_the_page_cache_before_it_is_read(afs: Artifactfs, git_daemon: GitDaemon) -> None:
    """git status reads every .gitignore at every run: its content is stored in the kernel's page
    cache as it opens, so neither the read nor the stale atime a read leaves reach the mount."""
    sample = make_sample_repo(git_daemon.base, "stored")
    add_commit(sample, {"src/.gitignore": b"build/\n" * 1000}, "a rule file of more than one page")
    afs.add("stored", git_daemon.url("stored.git"))
    afs.start_daemon()
    mnt = afs.wait_mounted("stored")
    assert resident_pages(mnt / "src/.gitignore") == [True, True]  # the open stored both pages
    assert resident_pages(mnt / "README.md") == [False]  # any other file is read as it is asked for
    assert (mnt / "src/.gitignore").read_bytes() == b"build/\n" * 1000
    status = subprocess.run(["git", "status", "--porcelain"], cwd=mnt, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout == "", status.stderr
