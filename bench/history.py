"""History walks inside a mount against a plain blobless clone (git's own lazy fetch) and a full
clone, on the monorepo of bench/git_in_mount.py given a history: 150 commits, each changing one
hot file and two others.

For each operation (`git blame` of the hot file, `git log -p -20`, `git diff HEAD~50 HEAD`) each
run times it, and counts its fetch transactions at the git daemon, in a fresh mount (a repository
added for it alone), in a fresh plain blobless clone and in a full clone. Medians over the runs.

    make bench-history                  # or: .venv/bin/python bench/history.py --runs 3
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
from git_in_mount import monorepo_files, serve  # noqa: E402
from tests.gitremote import GitDaemon, _changes, _FastImport, git_env  # noqa: E402

NAME = "history"
COMMITS = 150
HOT = "packages/pkg00/mod00/src/file0.py"
OPERATIONS = {
    "git blame of a file changed in 150 commits": ("blame", "HEAD", "--", HOT),
    "git log -p -20": ("log", "-p", "-20"),
    "git diff HEAD~50 HEAD": ("diff", "HEAD~50", "HEAD"),
}
Outcome = tuple[float, int]  # seconds, fetch transactions
RunResult = dict[str, dict[str, Outcome]]  # operation -> way -> outcome


def make_remote(base: Path) -> tuple[GitDaemon, dict[str, bytes]]:
    files = monorepo_files()
    others = sorted(p for p in files if p.endswith(".py") and p != HOT)

    def history(fi: _FastImport) -> None:
        parent = fi.commit("refs/heads/main", "monorepo\n", 1_700_000_000, None, _changes(files))
        hot = files[HOT]
        for n in range(COMMITS):
            hot += f"# change {n}\n".encode()
            changes = {HOT: hot}
            for other in (others[(n * 37) % len(others)], others[(n * 91 + 5) % len(others)]):
                changes[other] = files[other] + f"# touched by change {n}\n".encode()
            parent = fi.commit("refs/heads/main", f"change {n}\n", 1_700_000_060 + 60 * n, parent, _changes(changes))

    return serve(base, NAME, history), files


def timed_git(daemon: GitDaemon, cwd: Path, args: tuple[str, ...]) -> tuple[Outcome, bytes]:
    before = daemon.fetch_count()
    start = time.perf_counter()
    # A fixed abbreviation: git's default grows with the objects a repository holds, which differ
    # between a full and a partial clone (see README, Known limits).
    out = subprocess.run(["git", "-c", "core.abbrev=12", *args], cwd=cwd, env=git_env(), check=True, capture_output=True).stdout
    return (time.perf_counter() - start, daemon.fetch_count() - before), out


def one_run(base: Path, daemon: GitDaemon, files: dict[str, bytes], janitor: harness.Janitor) -> RunResult:
    url = daemon.url(f"{NAME}.git")
    full = base / "full"
    subprocess.run(["git", "clone", "-q", url, str(full)], check=True, env=git_env())
    remote = harness.Remote(url, "refs/heads/main", "refs/heads/main", "history", git_env(), daemon)
    inst = harness.Installation.create(base / "inst", remote, janitor)
    # start_daemon waits for the mount named harness.REPO_NAME: the first operation's
    names = {label: harness.REPO_NAME if i == 0 else f"{harness.REPO_NAME}{i}" for i, label in enumerate(OPERATIONS)}
    for name in names.values():
        inst.cli("add-repo", "--name", name, "--remote", url)
    inst.start_daemon()
    results: RunResult = {}
    for label, args in OPERATIONS.items():
        plain = base / f"plain-{names[label]}"
        subprocess.run(["git", "clone", "-q", "--filter=blob:none", url, str(plain)], check=True, env=git_env())
        mnt = inst.mount_root / names[label]
        harness.wait_mounted(mnt)
        (full_outcome, expected) = timed_git(daemon, full, args)
        (plain_outcome, plain_out) = timed_git(daemon, plain, args)
        (mount_outcome, mount_out) = timed_git(daemon, mnt, args)
        for way, out in (("blobless clone", plain_out), ("mount", mount_out)):
            if out != expected:
                first = next(i for i, (a, b) in enumerate(zip(out.splitlines() + [b""], expected.splitlines() + [b""])) if a != b)
                raise RuntimeError(f"{label}: the {way}'s output differs from the full clone's at line {first + 1}")
        results[label] = {"full": full_outcome, "blobless": plain_outcome, "mount": mount_outcome}
    inst.stop_daemon()
    return results


def main() -> int:
    runs_wanted = harness.runs_option(__doc__, default=3)

    def describe(files: dict[str, bytes]) -> str:
        return f"{len(files)} files, {COMMITS + 1} commits, {HOT} changed in {COMMITS}"

    runs = harness.served_runs("history", runs_wanted, make_remote, one_run, describe)
    print(f"| operation (median of {runs_wanted}) | full clone | blobless clone: time, transactions "
          f"| mount: time, transactions | mount / (full + one transaction) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: |")
    for label in OPERATIONS:
        median = {way: (statistics.median(r[label][way][0] for r in runs), statistics.median(r[label][way][1] for r in runs))
                  for way in ("full", "blobless", "mount")}  # fmt: skip
        one_transaction = median["blobless"][0] / max(median["blobless"][1], 1)
        goal = median["mount"][0] / (median["full"][0] + one_transaction)
        print(f"| {label} | {median['full'][0]:.3f} s | {median['blobless'][0]:.3f} s, {median['blobless'][1]:g} "
              f"| {median['mount'][0]:.3f} s, {median['mount'][1]:g} | {goal:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
