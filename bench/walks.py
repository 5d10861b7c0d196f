"""Cold walks of a whole tree through a mount, against the physical limit and a native checkout.

The repository is the monorepo of bench/git_in_mount.py (about 5,000 files in about 1,300
directories, five levels deep, a .gitignore in every module and package, three 4 MiB binaries)
with two larger files beside them (12 and 24 MiB), served by `git daemon` on 127.0.0.1.

In each run:
  limit   one `git fetch --stdin` of every blob of the commit into a fresh blobless clone
  native  each walk in a plain full clone (page cache warm)
  mount   each walk in a fresh mount of its own (cold: no blob here), with the fetch
          transactions the daemon served for it
  warm    `grep -r` again in the last mount, hydrated now, against native

The walks: ls -lR, find -size +1k, du -s, tar -cf /dev/null, grep -r. Goal: each cold walk
within 2x of (limit + native walk); warm grep -r within 1.5x of native. Medians over the runs.

    make bench-walks          # or: .venv/bin/python bench/walks.py --runs 3
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench as harness  # noqa: E402  (bench/bench.py: installations, clean-up)
import git_in_mount as monorepo  # noqa: E402
from tests.gitremote import GitDaemon, git_env  # noqa: E402

NAME = "walks"
LARGE = {"assets/video.bin": 24 * 1024 * 1024, "assets/model.bin": 12 * 1024 * 1024}
WALKS: dict[str, list[str]] = {
    "ls -lR": ["ls", "-lR"],
    "find -size +1k": ["find", ".", "-size", "+1k"],
    "du -s": ["du", "-s", "."],
    "tar -cf /dev/null": ["tar", "-cf", "/dev/null", "--exclude=.git", "."],
    "grep -r": ["grep", "-r", "-c", "--exclude=.git", "--exclude-dir=.git", "VALUE", "."],
}


def files() -> dict[str, bytes]:
    tree = monorepo.monorepo_files()
    for path, size in LARGE.items():
        block = path.encode() * (4096 // len(path) + 1)
        tree[path] = bytes((b + i) % 256 for i, b in enumerate(block[:4096])) * (size // 4096)
    return tree


def make_remote(base: Path) -> tuple[GitDaemon, dict[str, bytes]]:
    tree = files()
    return monorepo.serve_tree(base, NAME, tree), tree


def timed(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def limit(base: Path, url: str) -> float:
    """One fetch of every blob of the commit: what no mount can beat."""
    clone = base / "limit"
    env = git_env()
    subprocess.run(["git", "clone", "-q", "--filter=blob:none", "--no-checkout", url, str(clone)], check=True, env=env)
    listing = subprocess.run(["git", "-C", str(clone), "rev-list", "--objects", "--missing=print", "HEAD"],
                             check=True, capture_output=True, text=True, env=env).stdout  # fmt: skip
    wanted = "".join(f"{line[1:]}\n" for line in listing.splitlines() if line.startswith("?"))
    start = time.perf_counter()
    subprocess.run(["git", "-C", str(clone), "-c", "fetch.negotiationAlgorithm=noop", "fetch", "-q", "origin",
                    "--no-tags", "--filter=blob:none", "--stdin"], input=wanted, text=True, check=True, env=env)  # fmt: skip
    return time.perf_counter() - start


def one_run(base: Path, daemon: GitDaemon, _tree: dict[str, bytes], janitor: harness.Janitor) -> dict[str, float | int]:
    url = daemon.url(f"{NAME}.git")
    results: dict[str, float | int] = {"limit": limit(base, url)}
    plain = base / "plain"
    subprocess.run(["git", "clone", "-q", url, str(plain)], check=True, env=git_env())
    for label, argv in WALKS.items():
        timed(argv, plain)  # the page cache warm, as in a checkout just made
        results[f"native {label}"] = timed(argv, plain)
    remote = harness.Remote(url, "refs/heads/main", "refs/heads/main", "walks", git_env(), daemon)
    inst = harness.Installation.create(base / "inst", remote, janitor)
    mount = None
    for index, (label, argv) in enumerate(WALKS.items()):
        # A registration of its own per walk: each one is cold. The first is the harness's,
        # whose mount start_daemon waits for.
        name = harness.REPO_NAME if index == 0 else f"walk{index}"
        inst.cli("add-repo", "--name", name, "--remote", url)
        if index == 0:
            inst.start_daemon()
        mount = inst.mount_root / name
        harness.wait_mounted(mount)
        before = daemon.fetch_count(f"{NAME}.git")
        results[f"mount {label}"] = timed(argv, mount)
        results[f"txns {label}"] = daemon.fetch_count(f"{NAME}.git") - before
    assert mount is not None
    results["native warm grep -r"] = timed(WALKS["grep -r"], plain)
    results["mount warm grep -r"] = timed(WALKS["grep -r"], mount)
    inst.stop_daemon()
    return results


def main() -> int:
    runs_wanted = harness.runs_option(__doc__, default=3)

    def describe(tree: dict[str, bytes]) -> str:
        dirs = {str(Path(p).parent) for p in tree}
        return f"{len(tree)} files in {len(dirs)} directories, {sum(map(len, tree.values())) / 2**20:.0f} MiB"

    runs = harness.served_runs("walks", runs_wanted, make_remote, one_run, describe)

    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in runs)

    print(f"one fetch of every blob (the limit): {med('limit'):.2f} s (median of {runs_wanted})")
    print()
    print("| cold walk | native | mount | transactions | limit + native | mount / (limit + native) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label in WALKS:
        bound = med("limit") + med(f"native {label}")
        print(f"| {label} | {med(f'native {label}'):.3f} s | {med(f'mount {label}'):.3f} s "
              f"| {med(f'txns {label}'):g} | {bound:.3f} s | {med(f'mount {label}') / bound:.2f}x |")  # fmt: skip
    native, mount = med("native warm grep -r"), med("mount warm grep -r")
    print(f"| grep -r, warm | {native:.3f} s | {mount:.3f} s | 0 | | {mount / native:.2f}x of native |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
