"""Benchmark of the fleet's registry: `add-repo --async` and readiness with the registry on
PostgreSQL next to SQLite, and 50 repositories registered at once across two hosts.

    make bench-fleet                 # or: .venv/bin/python bench/fleet.py [--runs 7] [--repos 50]

Each host is a real stack (`artifactfs up`: worker, mountd, metrics) under a state root of its own;
the remote is a git daemon on 127.0.0.1 serving a deep tree (thousands of small directories).
What is timed:
- add-repo --async: the command's wall time, from start to exit (the placeholder is mounted when
  it returns);
- ready: from the start of add-repo --async until a listing of the mount returns (clone, index,
  READY in the log, gate open: what a sandbox waits for), against a plain `git clone --filter=blob:none --no-checkout` of the same
  remote in the same run;
- 50 at once: two hosts on one PostgreSQL and one redis-server, half of the repositories
  registered for each, all `add-repo --async` commands started together; the time until a
  listing of every mount has returned, against the same number of plain blobless clones run four
  at a time (two hosts with two worker processes each).
Medians are reported; the machine's facts are printed with them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import Artifactfs, new_installation  # noqa: E402
from tests.gitremote import GitDaemon, git_env, make_deep_tree_repo  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402

READY_TIMEOUT = 300.0  # seconds for the 50 add-repo commands started together
PLAIN_PARALLEL = 4


def wait_ready(mount: Path) -> float:
    """Block on a listing of the mount, as a sandbox would: it returns when the gate opens (and
    fails with EIO if the preparation failed). The time it returned."""
    os.listdir(mount)
    return time.monotonic()


def plain_clone(url: str, dest: Path) -> float:
    started = time.monotonic()
    subprocess.run(["git", "clone", "-q", "--filter=blob:none", "--no-checkout", "--single-branch", "--", url, str(dest)],
                   check=True, env=git_env(isolate=False), stdin=subprocess.DEVNULL)  # fmt: skip
    return time.monotonic() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def registry_runs(base: Path, label: str, remote: str, runs: int, configure: Callable[[Artifactfs], None]) -> dict[str, float]:
    host = new_installation(base / label)
    configure(host)
    try:
        host.up()
        adds, readies, plains = [], [], []
        for index in range(runs):
            name = f"r{index}"
            started = time.monotonic()
            host.run("add-repo", "--async", "--name", name, "--remote", remote)
            adds.append(time.monotonic() - started)
            readies.append(wait_ready(host.mount_path(name)) - started)
            plains.append(plain_clone(remote, base / label / f"plain-{index}"))
        return {"add_async": median(adds), "ready": median(readies), "plain_clone": median(plains)}
    finally:
        host.cleanup()


def fleet_run(base: Path, database_url: str, remote: str, repos: int) -> dict[str, float]:
    shared = RedisServer().start()
    hosts = []
    try:
        for name in ("bench-a", "bench-b"):
            inst = new_installation(base / name)
            inst.env.update(ARTIFACTFS_HOST=name, ARTIFACTFS_DATABASE_URL=database_url, ARTIFACTFS_REDIS_URL=shared.url)
            hosts.append(inst)
        for inst in hosts:
            inst.up()
        wanted = [(inst, f"{inst.env['ARTIFACTFS_HOST']}-{i}") for inst in hosts for i in range(repos // len(hosts))]
        started = time.monotonic()
        procs = [
            subprocess.Popen([sys.executable, "-m", "artifactfs.cli", "add-repo", "--async", "--name", name, "--remote", remote],
                             env=inst.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for inst, name in wanted
        ]  # fmt: skip
        for proc in procs:
            _, err = proc.communicate(timeout=READY_TIMEOUT)
            if proc.returncode != 0:
                raise RuntimeError(f"add-repo --async failed: {err.decode(errors='replace').strip()}")
        registered = time.monotonic() - started
        with ThreadPoolExecutor(len(wanted)) as pool:
            done = list(pool.map(lambda entry: wait_ready(entry[0].mount_path(entry[1])), wanted))
        all_ready = max(done) - started
        plain_started = time.monotonic()
        with ThreadPoolExecutor(PLAIN_PARALLEL) as pool:
            list(pool.map(lambda i: plain_clone(remote, base / "plain-fleet" / str(i)), range(repos)))
        return {"registered": registered, "all_ready": all_ready, "plain_clones": time.monotonic() - plain_started}
    finally:
        for inst in hosts:
            inst.cleanup()
        shared.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="add-repo --async runs per registry (default 7)")
    parser.add_argument("--repos", type=int, default=50, help="repositories registered at once across two hosts")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="artifactfs-bench-fleet-"))
    postgres = PostgresServer().start()
    try:
        served = base / "served"
        served.mkdir()
        sample = make_deep_tree_repo(served, "deep")
        with GitDaemon(served) as daemon:
            remote = daemon.url("deep.git")
            print(f"remote: git daemon on 127.0.0.1, {len(sample.files)} files (deep tree); "
                  f"{os.cpu_count()} cores; git {subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.split()[-1]}")
            rows = {}
            for label, configure in (
                ("sqlite", lambda inst: None),
                ("postgresql", lambda inst: inst.env.update(ARTIFACTFS_DATABASE_URL=postgres.new_database())),
            ):
                rows[label] = registry_runs(base, label, remote, args.runs, configure)
            print(f"\nmedians of {args.runs} runs    add-repo --async   ready (add to mounted)   plain blobless clone")
            for label, row in rows.items():
                print(f"  registry on {label:<11} {row['add_async'] * 1000:>10.0f} ms {row['ready']:>15.2f} s {row['plain_clone']:>18.2f} s")
            fleet = fleet_run(base, postgres.new_database(), remote, args.repos)
            print(f"\n{args.repos} repositories at once, two hosts on one PostgreSQL registry:")
            print(f"  every add-repo --async returned after   {fleet['registered']:.2f} s")
            print(f"  every repository mounted and ready after {fleet['all_ready']:.2f} s")
            print(f"  {args.repos} plain blobless clones, {PLAIN_PARALLEL} at a time: {fleet['plain_clones']:.2f} s")
    finally:
        postgres.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
