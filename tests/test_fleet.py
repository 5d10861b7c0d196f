"""A fleet of two hosts on one machine: two state roots and two ARTIFACTFS_HOST values, one
PostgreSQL registry and one redis-server shared, each host with its own worker and mountd (`up`).
A repository is cloned, mounted and readable on its own host alone; a host whose worker is down
holds back only its own repositories."""
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from artifactfs.mounts import fuse_mounts
from artifactfs.progress import channel as progress_channel

from .conftest import PYTHON, Artifactfs, new_installation, wait_until
from .gitremote import SampleRepo
from .postgres import PostgresServer
from .redisserver import RedisServer


@dataclass
class Fleet:
    a: Artifactfs
    b: Artifactfs
    redis: RedisServer

    def subscribers(self, channel: str) -> int:
        """Clients subscribed to `channel` on the shared broker."""
        import redis

        client = redis.Redis.from_url(self.redis.url)
        try:
            return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
        finally:
            client.close()

    def queued(self, host: Artifactfs) -> int:
        """Jobs waiting in `host`'s queue on the shared broker."""
        import redis

        client = redis.Redis.from_url(self.redis.url)
        try:
            return int(client.llen(f"artifactfs.{host.env['ARTIFACTFS_HOST']}"))
        finally:
            client.close()


@pytest.fixture
def fleet(tmp_path: Path, postgres: PostgresServer) -> Iterator[Fleet]:
    shared = RedisServer().start()
    url = postgres.new_database()
    hosts = []
    for name in ("host-a", "host-b"):
        inst = new_installation(tmp_path / name)
        inst.env.update(ARTIFACTFS_HOST=name, ARTIFACTFS_DATABASE_URL=url, ARTIFACTFS_REDIS_URL=shared.url)
        hosts.append(inst)
    # Hosts of one machine: each may name the other's mount root (a fleet shares one path).
    hosts[0].env["ARTIFACTFS_ALLOWED_MOUNT_ROOTS"] = str(hosts[1].mount_root)
    hosts[1].env["ARTIFACTFS_ALLOWED_MOUNT_ROOTS"] = str(hosts[0].mount_root)
    try:
        for inst in hosts:
            inst.up()
        yield Fleet(hosts[0], hosts[1], shared)
    finally:
        for inst in hosts:
            inst.cleanup()
        shared.stop()


def add_async(afs: Artifactfs, name: str, remote: str, *extra: str) -> str:
    return afs.run("add-repo", "--async", "--name", name, "--remote", remote, *extra).stdout.strip()


def status_all(afs: Artifactfs) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(afs.run("status", "--all-hosts", "--json").stdout)
    return rows


def mounted_here(afs: Artifactfs) -> set[str]:
    return {Path(p).name for p in fuse_mounts() if p.startswith(f"{afs.mount_root}/")}


def test_each_host_clones_mounts_and_serves_only_its_own_repositories(fleet: Fleet, sample: SampleRepo) -> None:
    a, b = fleet.a, fleet.b
    assert add_async(a, "alpha", sample.url) == "queued alpha"
    assert add_async(b, "beta", sample.url) == "queued beta"
    # Registered from host A for host B: B's mountd mounts it and B's worker clones it.
    assert add_async(a, "gamma", sample.url, "--host", "host-b", "--mount-root", str(b.mount_root)) == "queued gamma on host-b"
    # The same name on both hosts: two repositories, prepared once on each host.
    add_async(a, "shared", sample.url)
    add_async(b, "shared", sample.url)
    for host, names in ((a, ("alpha", "shared")), (b, ("beta", "gamma", "shared"))):
        for name in names:
            host.wait_state(name, "mounted", timeout=120)
            assert (host.mount_path(name) / "README.md").read_bytes() == sample.files["README.md"]
    assert mounted_here(a) == {"alpha", "shared"} and mounted_here(b) == {"beta", "gamma", "shared"}
    assert sorted(p.name for p in (a.root / "git").iterdir()) == ["alpha.git", "shared.git"]
    assert sorted(p.name for p in (b.root / "git").iterdir()) == ["beta.git", "gamma.git", "shared.git"]

    # What each host shows: its own by default, every host's with --all-hosts, with host=.
    assert [r["repo"] for r in json.loads(a.run("status", "--json").stdout)] == ["alpha", "shared"]
    everything = {(r["host"], r["repo"]): r["state"] for r in status_all(a)}
    assert everything == {("host-a", "alpha"): "mounted", ("host-a", "shared"): "mounted",
                          ("host-b", "beta"): "ready", ("host-b", "gamma"): "ready", ("host-b", "shared"): "ready"}
    assert "host=host-b" in a.run("list-repos", "--host", "host-b").stdout.splitlines()[0]
    assert a.fail("status", "--name", "beta").endswith("no repository named 'beta' is registered (see: artifactfs list-repos)")
    # Readiness, task ids and dedupe keys are per (host, repository): two READY events, one per host.
    shared = json.loads(a.run("events", "--name", "shared", "--all-hosts", "--json").stdout)
    assert sorted((e["host"], e["type"]) for e in shared if e["type"] == "ready") == [("host-a", "ready"), ("host-b", "ready")]
    assert f"[{a.task_id('shared', 1)}] succeeded" in a.log("worker")
    assert f"[{b.task_id('shared', 1)}] succeeded" in b.log("worker")
    assert b.task_id("shared", 1) not in a.log("worker") and a.task_id("shared", 1) not in b.log("worker")

    # Removed from host A, host B's repository goes: B's mountd unmounts it and deletes its state.
    assert a.run("remove-repo", "--name", "gamma", "--host", "host-b").stdout.strip() == "removed gamma on host-b"
    b.wait_unmounted("gamma")
    wait_until(lambda: not (b.root / "git" / "gamma.git").exists(), 20, what="host B to delete gamma's clone")
    assert mounted_here(a) == {"alpha", "shared"}


def test_a_host_whose_worker_is_down_holds_back_only_its_own(fleet: Fleet, sample: SampleRepo) -> None:
    a, b = fleet.a, fleet.b
    a.stop_service("worker")
    add_async(a, "waiting", sample.url)
    add_async(b, "going", sample.url)
    b.wait_state("going", "mounted", timeout=120)
    # B's worker took B's job; A's job waits in A's queue, its repository preparing behind its gate.
    assert a.status("waiting")["state"] == "preparing"
    wait_until(lambda: fleet.queued(a) >= 1, 30, what="A's job to wait in A's queue")
    assert a.mount_path("waiting") in [Path(p) for p in fuse_mounts()]
    # A blocking add for A, made on B, follows A's worker: the phases from the log, git's
    # percentages from the job's progress channel (which it joins before A's worker is back).
    blocking = subprocess.Popen(
        [PYTHON, "-m", "artifactfs.cli", "add-repo", "--name", "delta", "--remote", sample.url, "--host", "host-a",
         "--mount-root", str(a.mount_root)], env=b.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: fleet.subscribers(progress_channel("host-a", "delta")) == 1, 30, what="the add to follow the job")
    a.up()  # A's worker again: it takes the jobs that waited
    out, err = blocking.communicate(timeout=120)
    assert blocking.returncode == 0 and out.strip() == "added delta on host-a", (out, err)
    lines = err.splitlines()
    assert "delta: clone" in lines and "delta: publish" in lines, err
    assert "delta: clone: Receiving objects 100%" in lines, err  # published by A's worker
    a.wait_state("waiting", "mounted", timeout=120)
    assert (a.mount_path("waiting") / "README.md").read_bytes() == sample.files["README.md"]
    assert (a.wait_mounted("delta") / "README.md").read_bytes() == sample.files["README.md"]
    assert b.status("going")["state"] == "mounted"
