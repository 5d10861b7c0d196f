"""Ready in one commit's time: `add-repo --async` until the first read and until the history is
whole, on a repository with a long history and on a short one, against plain git's clones.

Both repositories are the monorepo of bench/git_in_mount.py (about 5,000 files in 1,300
directories); the long one has 20,000 commits behind its head, each changing a file deep in the
tree (six trees a commit), the short one 20. Each run, on each repository, times in one fresh
installation (`artifactfs up`):

- plain git: a blobless clone (`--filter=blob:none --no-checkout`) of the whole history; the same
  one commit deep (`--depth 1`); and, in the latter, the lazy fetch of one blob (`git cat-file`);
- artifactfs: `add-repo --async` until a `cat` of a file in the mount is done (it waits at the
  gate) and until the history's `done` event; then, in a second repository added alike, the
  first `git log` run right after that `cat` (it waits for or makes the history fetch), checked
  against the full clone's output.

Goals: the first read within 1.5x of the depth-1 clone plus one blob fetch; the first `git log`
within 1.2x of the full blobless clone. Medians over the runs, with fetch transactions.

    make bench-ready                    # or: .venv/bin/python bench/ready.py --runs 3
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench as harness  # noqa: E402  (bench/bench.py: installations, clean-up)
from git_in_mount import monorepo_files  # noqa: E402
from tests.gitremote import GitDaemon, _changes, _FastImport, _init_bare, git_env  # noqa: E402

HISTORIES = {"long": 20_000, "short": 20}  # commits behind the head
READ = "README.md"
Outcome = tuple[float, int]  # seconds, fetch transactions
RunResult = dict[str, dict[str, Outcome]]  # repository -> measurement -> outcome


def make_remote(base: Path) -> tuple[GitDaemon, dict[str, bytes]]:
    files = monorepo_files()
    deep = sorted(p for p in files if p.endswith(".py"))
    served = base / "served"
    for name, commits in HISTORIES.items():
        bare = served / f"{name}.git"
        _init_bare(bare)
        fi = _FastImport()
        parent = fi.commit("refs/heads/main", "monorepo\n", 1_700_000_000, None, _changes(files))
        for n in range(commits):
            path = deep[(n * 37) % len(deep)]
            parent = fi.commit("refs/heads/main", f"change {n}\n", 1_700_000_060 + 60 * n, parent,
                               _changes({path: files[path] + f"# change {n}\n".encode()}))  # fmt: skip
        fi.run(bare)
    daemon = GitDaemon(served, state_dir=base / "gitdaemon")
    daemon.start()
    return daemon, files


def timed(daemon: GitDaemon, cmd: list[str], cwd: Path | None = None) -> tuple[Outcome, bytes]:
    before = daemon.fetch_count()
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=git_env(), check=True, capture_output=True).stdout
    return (time.perf_counter() - start, daemon.fetch_count() - before), out


def plain_git(base: Path, daemon: GitDaemon, name: str) -> dict[str, Outcome]:
    url = daemon.url(f"{name}.git")
    clone = ["git", "clone", "-q", "--filter=blob:none", "--no-checkout", "--single-branch"]
    full, _ = timed(daemon, [*clone, url, str(base / f"{name}-full")])
    depth1, _ = timed(daemon, [*clone, "--depth", "1", url, str(base / f"{name}-depth1")])
    blob, _ = timed(daemon, ["git", "cat-file", "-p", f"HEAD:{READ}"], cwd=base / f"{name}-depth1")
    shutil.rmtree(base / f"{name}-depth1")
    return {"full": full, "depth1": depth1, "depth1+blob": (depth1[0] + blob[0], depth1[1] + blob[1])}


def first_read(inst: harness.Installation, daemon: GitDaemon, name: str, remote: harness.Remote) -> tuple[float, float, float, int]:
    """`add-repo --async`, then a `cat` in the mount: (wall-clock start, seconds until add-repo
    returned, until the read was done, transactions)."""
    before = daemon.fetch_count()
    wall = time.time()
    start, returned, _ = inst.add_async(name, remote)
    mount = inst.mount_root / name
    harness.wait_mounted(mount)
    (mount / READ).read_bytes()  # waits at the gate until ready
    return wall, returned - start, time.perf_counter() - start, daemon.fetch_count() - before


def history_done(inst: harness.Installation, name: str, timeout: float = 300) -> float:
    """The time (time.time()) of the history's `done` event, once it is recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in inst.events(name):
            payload = event["payload"]
            if event["type"] == "history" and isinstance(payload, dict) and payload.get("state") in ("done", "failed"):
                if payload["state"] == "failed":
                    raise RuntimeError(f"{name}: the history fetch failed: {payload}")
                return harness.event_time(str(event["time"]))
        time.sleep(0.05)
    raise RuntimeError(f"{name}: no history event after {timeout}s:\n{inst.stack_logs()}")


def one_run(base: Path, daemon: GitDaemon, files: dict[str, bytes], janitor: harness.Janitor) -> RunResult:
    results: RunResult = {}
    remotes = {name: harness.Remote(daemon.url(f"{name}.git"), "refs/heads/main", "refs/heads/main", name, git_env(), daemon)
               for name in HISTORIES}  # fmt: skip
    inst = harness.Installation.create(base / "inst", remotes["long"], janitor)
    inst.up()
    try:
        for name, remote in remotes.items():
            outcome = plain_git(base, daemon, name)
            wall, returned, read, read_tx = first_read(inst, daemon, f"{name}-read", remote)
            outcome["add-repo returned"] = (returned, 0)
            outcome["first read"] = (read, read_tx)
            ready = next(harness.event_time(str(e["time"])) for e in inst.events(f"{name}-read") if e["type"] == "ready")
            outcome["ready"] = (ready - wall, 0)
            outcome["history complete"] = (history_done(inst, f"{name}-read") - wall, 0)
            # Another repository alike: the first git log right after the first read.
            first_read(inst, daemon, f"{name}-log", remote)  # the cat done: the repository is ready
            (log_seconds, log_tx), out = timed(daemon, ["git", "log", "--oneline"], cwd=inst.mount_root / f"{name}-log")
            expected = subprocess.run(["git", "log", "--oneline"], cwd=base / f"{name}-full", env=git_env(),
                                      check=True, capture_output=True).stdout  # fmt: skip
            if out != expected:
                raise RuntimeError(f"{name}: git log in the mount differs from the full clone's")
            outcome["first git log"] = (log_seconds, log_tx)
            history_done(inst, f"{name}-log")  # the worker's job ends before the next repository
            results[name] = outcome
    finally:
        inst.down()
    return results


def main() -> int:
    runs_wanted = harness.runs_option(__doc__, default=3)

    def describe(files: dict[str, bytes]) -> str:
        return f"{len(files)} files; histories of " + ", ".join(f"{n + 1} commits ({k})" for k, n in HISTORIES.items())

    runs = harness.served_runs("ready", runs_wanted, make_remote, one_run, describe)

    def median(name: str, what: str) -> Outcome:
        return (statistics.median(r[name][what][0] for r in runs), statistics.median(r[name][what][1] for r in runs))

    print(f"| repository (median of {runs_wanted}) | blobless clone | depth-1 clone + one blob | async add returns "
          f"| → first read | first read / (depth 1 + blob) | → ready | → history complete | first git log "
          f"| git log / blobless clone |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, commits in HISTORIES.items():
        m = {what: median(name, what) for what in runs[0][name]}
        print(f"| {name} ({commits + 1} commits) | {m['full'][0]:.3f} s | {m['depth1+blob'][0]:.3f} s, {m['depth1+blob'][1]:g} tx "
              f"| {m['add-repo returned'][0]:.3f} s | {m['first read'][0]:.3f} s, {m['first read'][1]:g} tx | {m['first read'][0] / m['depth1+blob'][0]:.2f} "
              f"| {m['ready'][0]:.3f} s | {m['history complete'][0]:.3f} s "
              f"| {m['first git log'][0]:.3f} s, {m['first git log'][1]:g} tx | {m['first git log'][0] / m['full'][0]:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
