"""Read latency as batches pile up: after 10 fetch transactions, and after 2,000.

Every batch a mount fetches adds a promisor pack to its git directory, and finding an object
slows as packs pile up; past ARTIFACTFS_PACK_LIMIT (50) the mount consolidates them. Here files
are read through a mount one at a time, each the first miss in its directory, so that every read
is one urgent transaction and adds one pack. Reported: the median latency of the reads that
follow 10 batches and of those that follow 2,000, for

  mount             the defaults (consolidation past 50 packs)
  no consolidation  the same with a pack limit no run reaches
  git               plain git's lazy fetch of the same blobs in a blobless clone, one
                    `git cat-file -p HEAD:<path>` per file, as a tool in a partial clone reads

The repository: 2,100 leaf directories, three levels deep (21 areas, 10 groups each, 10 units
each), two small files in each, served by `git daemon` on 127.0.0.1.

    make bench-packs          # or: .venv/bin/python bench/packs.py --runs 1
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
from artifactfs.gitstore import pack_count  # noqa: E402
from tests.gitremote import GitDaemon, git_env  # noqa: E402

NAME = "packs"
AREAS, GROUPS, UNITS = 21, 10, 10
EARLY = range(10, 30)  # the reads that follow 10 batches (20 of them)
LATE = range(2000, 2020)  # the reads that follow 2,000 batches
NO_LIMIT = 1_000_000


def units() -> list[str]:
    return [f"area{a:02d}/group{g}/unit{u}" for a in range(AREAS) for g in range(GROUPS) for u in range(UNITS)]


def files() -> dict[str, bytes]:
    tree: dict[str, bytes] = {"README.md": b"# packs\n"}
    for unit in units():
        tree[f"{unit}/main.c"] = f"/* {unit} */\nint main(void) {{ return 0; }}\n".encode() * 3
        tree[f"{unit}/NOTES"] = f"notes of {unit}\n".encode()
    return tree


def make_remote(base: Path) -> tuple[GitDaemon, dict[str, bytes]]:
    tree = files()
    return monorepo.serve_tree(base, NAME, tree), tree


def read_latency(path: Path) -> float:
    start = time.perf_counter()
    path.read_bytes()
    return time.perf_counter() - start


def cat_latency(clone: Path, path: str) -> float:
    start = time.perf_counter()
    subprocess.run(["git", "-C", str(clone), "cat-file", "-p", f"HEAD:{path}"], check=True, stdout=subprocess.DEVNULL,
                   env=git_env())  # fmt: skip
    return time.perf_counter() - start


def through_mount(base: Path, daemon: GitDaemon, janitor: harness.Janitor, pack_limit: int | None) -> dict[str, float]:
    url = daemon.url(f"{NAME}.git")
    remote = harness.Remote(url, "refs/heads/main", "refs/heads/main", NAME, git_env(), daemon)
    inst = harness.Installation.create(base, remote, janitor)
    if pack_limit is not None:
        inst.env["ARTIFACTFS_PACK_LIMIT"] = str(pack_limit)
    inst.cli("add-repo", "--name", harness.REPO_NAME, "--remote", url)
    inst.start_daemon()
    before = daemon.fetch_count(f"{NAME}.git")
    latencies = [read_latency(inst.mount_path / unit / "main.c") for unit in units()[: LATE.stop]]
    transactions = daemon.fetch_count(f"{NAME}.git") - before
    if transactions != len(latencies):  # the premise: one transaction (one pack) per read
        raise RuntimeError(f"{len(latencies)} reads took {transactions} transactions")
    git_dir = next((inst.root / "git").glob("*.git"))
    result = window_medians(latencies)
    result["packs"] = pack_count(git_dir)
    inst.stop_daemon()
    return result


def plain_git(base: Path, daemon: GitDaemon) -> dict[str, float]:
    clone = base / "blobless"
    subprocess.run(["git", "clone", "-q", "--filter=blob:none", "--no-checkout", daemon.url(f"{NAME}.git"), str(clone)],
                   check=True, env=git_env())  # fmt: skip
    latencies = [cat_latency(clone, f"{unit}/main.c") for unit in units()[: LATE.stop]]
    result = window_medians(latencies)
    result["packs"] = pack_count(clone / ".git")
    return result


def window_medians(latencies: list[float]) -> dict[str, float]:
    return {"early": statistics.median(latencies[i] for i in EARLY), "late": statistics.median(latencies[i] for i in LATE)}


def one_run(base: Path, daemon: GitDaemon, _tree: dict[str, bytes], janitor: harness.Janitor) -> dict[str, dict[str, float]]:
    return {
        "mount": through_mount(base / "mount", daemon, janitor, None),
        "no consolidation": through_mount(base / "unlimited", daemon, janitor, NO_LIMIT),
        "git": plain_git(base, daemon),
    }


def main() -> int:
    runs_wanted = harness.runs_option(__doc__, default=1)

    def describe(tree: dict[str, bytes]) -> str:
        return f"{len(tree)} files in {len({str(Path(p).parent) for p in tree})} directories"

    runs = harness.served_runs(NAME, runs_wanted, make_remote, one_run, describe)
    print(f"read latency, medians of reads {EARLY.start + 1}-{EARLY.stop} and {LATE.start + 1}-{LATE.stop} "
          f"(each read one transaction), over {runs_wanted} run(s)")  # fmt: skip
    print()
    print("| | after 10 batches | after 2,000 batches | late / early | packs at the end |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for way in ("mount", "no consolidation", "git"):
        early = statistics.median(r[way]["early"] for r in runs)
        late = statistics.median(r[way]["late"] for r in runs)
        packs = statistics.median(r[way]["packs"] for r in runs)
        print(f"| {way} | {early * 1000:.1f} ms | {late * 1000:.1f} ms | {late / early:.2f}x | {packs:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
