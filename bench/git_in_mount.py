"""git inside a mount against a plain checkout of the same commit, on a repository shaped like a
monorepo: 24 packages of 11 modules (src/, src/a, src/b, test/), about 5,000 small files in about
1,300 directories, a .gitignore in every module and package, three 4 MiB binaries.

Each run makes a fresh installation and a fresh full clone, then times in both: `git status`
first after mount and second, clean and with 10 edits; `git checkout` of a branch that changes
200 files; `git add -A && git commit` of 100 new files. Then, in another fresh installation, a
`git status` started the moment the mount appears. It counts the blobs each step brought
into the mount's git directory and the fetch transactions the remote served for it. Medians
over the runs.

    make bench-git                      # or: .venv/bin/python bench/git_in_mount.py --runs 3
    .venv/bin/python bench/git_in_mount.py --backfill used   # the mounts' default policy: the
                                        # backfill runs beside the steps after the first edit
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench as harness  # noqa: E402  (bench/bench.py: installations, clean-up)
from tests.gitremote import GitDaemon, _changes, _FastImport, _init_bare, git_env  # noqa: E402

NAME = harness.REPO_NAME
AT_ONCE = "git status the moment another fresh mount appears"
PACKAGES, MODULES = 24, 11
BIG = 4 * 1024 * 1024
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}  # fmt: skip


def monorepo_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {"README.md": b"# monorepo\n", ".gitignore": b"*.o\n/build/\n"}
    for p in range(PACKAGES):
        pkg = f"packages/pkg{p:02d}"
        files[f"{pkg}/BUILD"] = f"package(name = 'pkg{p:02d}')\n".encode()
        files[f"{pkg}/.gitignore"] = b"dist/\n"
        for m in range(MODULES):
            mod = f"{pkg}/mod{m:02d}"
            files[f"{mod}/README.md"] = f"module {m} of package {p}\n".encode() * 4
            files[f"{mod}/.gitignore"] = b"*.pyc\n__pycache__/\n"
            layout = {"src": 3, "src/a": 6, "src/b": 5, "test": 3}
            for sub, count in layout.items():
                for f in range(count):
                    body = f"# {mod}/{sub}/file{f}.py\n".encode() + b"VALUE = %d\n" % (p * 1000 + m * 10 + f)
                    files[f"{mod}/{sub}/file{f}.py"] = body * (1 + (f * 7 + m) % 20)
    for i in range(3):
        files[f"assets/blob{i}.bin"] = bytes((i * 31 + j) % 251 for j in range(256)) * (BIG // 256)
    return files


def serve(base: Path, name: str, history: Callable[[_FastImport], None]) -> GitDaemon:
    """A bare repository `name`, its commits made by `history` in one fast-import, served by a
    git daemon (started) over <base>/served."""
    served = base / "served"
    bare = served / f"{name}.git"
    _init_bare(bare)
    fi = _FastImport()
    history(fi)
    fi.run(bare)
    daemon = GitDaemon(served, state_dir=base / "gitdaemon")
    daemon.start()
    return daemon


def serve_tree(base: Path, name: str, tree: dict[str, bytes]) -> GitDaemon:
    """`serve` a repository of one commit on main: `tree`."""
    return serve(base, name, lambda fi: fi.commit("refs/heads/main", f"{name}\n", 1_700_000_000, None, _changes(tree)))


def make_remote(base: Path) -> tuple[GitDaemon, dict[str, bytes]]:
    files = monorepo_files()

    def history(fi: _FastImport) -> None:
        first = fi.commit("refs/heads/main", "monorepo\n", 1_700_000_000, None, _changes(files))
        changed = sorted(p for p in files if p.endswith("file0.py"))[:200]
        fi.commit("refs/heads/other", "change 200 files\n", 1_700_000_100, first,
                  _changes({p: files[p] + b"# other branch\n" for p in changed}))  # fmt: skip

    return serve(base, NAME, history), files


def git(cwd: Path, *args: str) -> None:
    env = {**git_env(), **GIT_ENV}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def blobs(git_dir: Path) -> int:
    out = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "--batch-all-objects", "--batch-check=%(objecttype)"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return out.split().count("blob")


def steps(files: dict[str, bytes]) -> list[tuple[str, Callable[[Path], None]]]:
    edited = [p for p in files if p.endswith("file1.py")][:: max(1, len(files) // 400)][:10]

    def edit(root: Path) -> None:
        for path in edited:
            with open(root / path, "ab") as fh:
                fh.write(b"# edited\n")

    def commit_new(root: Path) -> None:
        new = root / "packages/pkg00/generated"
        new.mkdir()
        for i in range(100):
            (new / f"gen{i:03d}.py").write_bytes(b"GENERATED = %d\n" % i)
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "100 new files")

    return [
        ("git status, first after mount", lambda root: git(root, "status", "--porcelain")),
        ("git status, second", lambda root: git(root, "status", "--porcelain")),
        ("10 edits (appends)", edit),
        ("git status with 10 edits, first", lambda root: git(root, "status", "--porcelain")),
        ("git status with 10 edits, second", lambda root: git(root, "status", "--porcelain")),
        ("git checkout of a branch changing 200 files", lambda root: git(root, "checkout", "-q", "other")),
        ("git add -A && git commit, 100 new files", commit_new),
    ]


def one_run(base: Path, daemon: GitDaemon, files: dict[str, bytes], janitor: harness.Janitor,
            backfill: str = "never") -> dict[str, tuple[float, float, int, int]]:  # fmt: skip
    url = daemon.url(f"{NAME}.git")
    plain = base / "plain"
    subprocess.run(["git", "clone", "-q", "--single-branch", "--branch", "main", url, str(plain)], check=True,
                   env=git_env())  # fmt: skip
    remote = harness.Remote(url, "refs/heads/main", "refs/heads/main", "monorepo", git_env(), daemon)
    inst = harness.Installation.create(base / "inst", remote, janitor)
    inst.env["ARTIFACTFS_BACKFILL"] = backfill
    inst.add_repo(remote)
    inst.start_daemon()
    mnt = inst.mount_path
    git_dir = inst.root / "git" / f"{NAME}.git"
    for root in (plain, mnt):  # the branch to check out, fetched outside the timings
        git(root, "fetch", "-q", "origin", "other:other")
    results = {}
    for label, action in steps(files):
        start = time.perf_counter()
        action(plain)
        plain_s = time.perf_counter() - start
        before, served = blobs(git_dir), daemon.fetch_count(f"{NAME}.git")
        start = time.perf_counter()
        action(mnt)
        mount_s = time.perf_counter() - start
        results[label] = (plain_s, mount_s, blobs(git_dir) - before, daemon.fetch_count(f"{NAME}.git") - served)
    inst.stop_daemon()
    results[AT_ONCE] = (math.nan, status_at_once(base, remote, janitor), 0, 0)
    return results


def status_at_once(base: Path, remote: harness.Remote, janitor: harness.Janitor) -> float:
    """`git status` in another fresh mount, started the moment the mount appears: beside the
    warm-up rather than after it (the gate holds it until ready)."""
    inst = harness.Installation.create(base / "inst-at-once", remote, janitor)
    inst.add_repo(remote)
    inst.start_daemon()
    start = time.perf_counter()
    git(inst.mount_path, "status", "--porcelain")
    elapsed = time.perf_counter() - start
    inst.stop_daemon()
    return elapsed


def seconds(value: float) -> str:
    """A time as the table shows it: milliseconds below 10 ms (ten appends to a native file take
    a fraction of one), seconds above."""
    return f"{value * 1000:.2f} ms" if value < 0.01 else f"{value:.3f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs, each in a fresh installation (default 3)")
    parser.add_argument("--backfill", choices=["never", "used", "ready"], default="never",
                        help="the mounts' ARTIFACTFS_BACKFILL (default never: the blobs each step fetches are "
                             "counted, not the backfill's)")  # fmt: skip
    args = parser.parse_args()
    runs_wanted = args.runs

    def describe(files: dict[str, bytes]) -> str:
        dirs = {str(Path(p).parent) for p in files}
        return (f"{len(files)} files in {len(dirs)} directories, "
                f"{sum(p.endswith('.gitignore') for p in files)} .gitignore files")  # fmt: skip

    runs = harness.served_runs("git", runs_wanted, make_remote, functools.partial(one_run, backfill=args.backfill), describe)
    print(f"| step (median of {runs_wanted}) | plain checkout | mount | ratio | blobs fetched by the mount | transactions |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label in runs[0]:
        plain_s = statistics.median(r[label][0] for r in runs)
        mount_s = statistics.median(r[label][1] for r in runs)
        fetched = statistics.median(r[label][2] for r in runs)
        transactions = statistics.median(r[label][3] for r in runs)
        if math.isnan(plain_s):  # a step of the mount alone
            print(f"| {label} | | {seconds(mount_s)} | | | |")
            continue
        ratio = f"{mount_s / plain_s:.1f}x" if plain_s > 0 else ""
        print(f"| {label} | {seconds(plain_s)} | {seconds(mount_s)} | {ratio} | {fetched:g} | {transactions:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
