"""Ready in one commit's time: a worker's preparation clones one commit deep, publishes ready, and
fetches the rest of the history behind it; git in the mount gives a full clone's answers at every
moment. Real git daemon remotes (transactions counted), a real worker and mountd, real mounts."""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Artifactfs, wait_until
from .gitremote import GitDaemon, SampleRepo, add_commit, git, make_long_history_repo
from .test_async import add_async
from .test_drills import group_members

HOT = "src/hot.py"
# What git inside the mount must answer as a full clone does, right after ready.
QUESTIONS = (
    ("log", "--oneline"),
    ("rev-list", "--count", "HEAD"),
    ("merge-base", "HEAD", "HEAD~150"),
    ("describe", "--always", "--abbrev=12", "HEAD~3"),
    ("blame", "--abbrev=12", HOT),
    ("log", "-p", "-3", "--abbrev=12", "--", HOT),
)


@pytest.fixture(scope="module")
def long_history(tmp_path_factory: pytest.TempPathFactory) -> SampleRepo:
    return make_long_history_repo(tmp_path_factory.mktemp("long"), "long", commits=20_000, hot_changes=50)


@pytest.fixture(scope="module")
def full_clone(long_history: SampleRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain full clone of the long history: the answers to compare with."""
    clone = tmp_path_factory.mktemp("full") / "long"
    git("clone", "--quiet", "--no-tags", "--single-branch", f"file://{long_history.bare}", clone)
    return clone


@pytest.fixture
def served(git_daemon: GitDaemon, long_history: SampleRepo) -> str:
    """The long history, served by this test's git daemon (a copy of its own: tests add commits)."""
    shutil.copytree(long_history.bare, git_daemon.base / "long.git")
    return git_daemon.url("long.git")


def ask(work_tree: Path, *args: str) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    return subprocess.run(["git", "-C", str(work_tree), *args], env=env, check=True, capture_output=True,
                          timeout=120).stdout.decode()  # fmt: skip


def commits_here(git_dir: Path) -> int:
    out = git("--git-dir", git_dir, "cat-file", "--batch-all-objects", "--batch-check=%(objecttype)").stdout.decode()
    return out.split().count("commit")


def history_events(afs: Artifactfs, name: str) -> list[str]:
    events = json.loads(afs.run("events", "--name", name, "--json").stdout)
    return [f"{e['type']}:{e['payload']['state']}" if e["type"] == "history" else e["type"]
            for e in events if e["type"] in ("ready", "history")]  # fmt: skip


def kill_worker(afs: Artifactfs) -> None:
    worker = afs.service_pid("worker")
    os.killpg(worker, signal.SIGKILL)  # the worker, its pool and whatever the job ran
    wait_until(lambda: not group_members(worker), 60, interval=0.1, what="the worker to be gone")


def test_ready_holds_one_commit_and_git_answers_as_a_full_clone_while_the_history_is_missing(
    afs: Artifactfs, git_daemon: GitDaemon, served: str, full_clone: Path, long_history: SampleRepo
) -> None:
    # The history fetch stops where it begins; then its worker is killed (a drill), so nothing
    # but git in the mount can bring the history.
    afs.env["ARTIFACTFS_FAILPOINT"] = "phase:history"
    afs.up()
    add_async(afs, "long", served)
    mount = afs.wait_mounted("long", timeout=60)
    git_dir = afs.root / "git" / "long.git"
    wait_until(lambda: "long: failpoint phase:history reached" in afs.log("worker"), 60, interval=0.1, what="the failpoint")
    assert commits_here(git_dir) == 1  # the phases that gate ready fetched the shown commit alone
    assert not (git_dir / "shallow").exists()  # never marked shallow: the parents are promised
    assert git_daemon.fetch_count() == 2  # the depth-1 clone, and the status blobs
    row = afs.status("long")
    assert row["state"] == "mounted" and row["history"] == "fetching" and row["head"] == long_history.head
    kill_worker(afs)
    assert (mount / "README.md").read_bytes() == long_history.files["README.md"]

    git_daemon.reset_count()
    for question in QUESTIONS:
        assert ask(mount, *question) == ask(full_clone, *question), question
    # One transaction brought the whole history, one the blame's versions; log -p's were among them.
    assert git_daemon.fetch_count() <= 3, git_daemon.fetch_log()
    assert commits_here(git_dir) == 20_000
    assert int(afs.status("long")["lazy_fetches"]) == git_daemon.fetch_count()

    # A worker again: mountd sends the job again, which finds the history whole and says so.
    del afs.env["ARTIFACTFS_FAILPOINT"]
    afs.up()
    wait_until(lambda: afs.status("long")["history"] == "complete", 60, interval=0.1, what="the history to be complete")
    assert history_events(afs, "long") == ["ready", "history:started", "history:done"]
    git_daemon.reset_count()
    assert ask(mount, "log", "--oneline") == ask(full_clone, "log", "--oneline")
    assert git_daemon.fetch_count() == 0


def test_the_history_follows_ready_in_one_transaction_and_then_git_fetches_nothing(
    afs: Artifactfs, git_daemon: GitDaemon, served: str, full_clone: Path
) -> None:
    afs.env["ARTIFACTFS_FAILPOINT"] = "phase:history"
    afs.up()
    add_async(afs, "long", served)
    wait_until(lambda: "long: failpoint phase:history reached" in afs.log("worker"), 60, interval=0.1, what="the failpoint")
    kill_worker(afs)  # killed during the background fetch: ready stays, the history is behind
    git_dir = afs.root / "git" / "long.git"
    assert commits_here(git_dir) == 1 and afs.registry_state("long") == "ready"
    del afs.env["ARTIFACTFS_FAILPOINT"]
    git_daemon.reset_count()
    afs.up()  # the job again, from its history
    wait_until(lambda: afs.status("long")["history"] == "complete", 60, interval=0.1, what="the history to be complete")
    assert git_daemon.fetch_count() == 1  # the whole history in one transaction
    assert commits_here(git_dir) == 20_000 and not (git_dir / "artifactfs-history").exists()
    row = afs.status("long")
    assert float(row["history_seconds"]) > 0 and float(row["ready_seconds"]) > 0
    mount = afs.wait_mounted("long")
    git_daemon.reset_count()
    assert ask(mount, "log", "--oneline") == ask(full_clone, "log", "--oneline")
    assert ask(mount, "rev-list", "--count", "HEAD").strip() == "20000"
    assert git_daemon.fetch_count() == 0 and int(row["lazy_fetches"]) == 0


def test_a_refresh_shows_the_new_commit_first_and_its_history_follows(
    afs: Artifactfs, git_daemon: GitDaemon, served: str, long_history: SampleRepo
) -> None:
    afs.up()
    add_async(afs, "long", served)
    wait_until(lambda: afs.status("long")["history"] == "complete", 90, interval=0.1, what="the history to be complete")
    sample = SampleRepo(bare=git_daemon.base / "long.git", head=long_history.head, files=dict(long_history.files),
                        executables=set(), symlinks={}, gitlinks={}, history=list(long_history.history))  # fmt: skip
    for n in range(3):  # the new head's parent is not here: its history is fetched behind it
        add_commit(sample, {f"new/{n}.txt": f"new {n}\n".encode()}, f"New {n}")
    git_daemon.reset_count()
    out = afs.run("prepare", "--name", "long", "--wait").stdout
    assert f"head {sample.head}" in out
    wait_until(lambda: afs.status("long")["history"] == "complete", 60, interval=0.1, what="the new history")
    events = json.loads(afs.run("events", "--name", "long", "--json").stdout)
    last_ready = max(i for i, e in enumerate(events) if e["type"] == "ready")
    assert events[last_ready]["payload"] == {"head": sample.head, "history": "pending"}  # shown before its history
    assert [e["payload"]["state"] for e in events[last_ready:] if e["type"] == "history"] == ["started", "done"]
    assert git_daemon.fetch_count() == 2, "\n".join(c for _, c in git_daemon.fetch_log())  # the new commit and its trees; then the two commits behind it
    mount = afs.wait_mounted("long")
    assert (mount / "new" / "2.txt").read_bytes() == b"new 2\n"
    assert ask(mount, "rev-list", "--count", "HEAD").strip() == "20003"


def test_a_periodic_refresh_shows_the_new_commit_first_and_fetches_its_history_behind(
    afs: Artifactfs, git_daemon: GitDaemon, served: str, long_history: SampleRepo
) -> None:
    afs.up()
    add_async(afs, "long", served, "--refresh", "1s")
    wait_until(lambda: afs.status("long")["history"] == "complete", 90, interval=0.1, what="the history to be complete")
    mount = afs.wait_mounted("long")
    sample = SampleRepo(bare=git_daemon.base / "long.git", head=long_history.head, files=dict(long_history.files),
                        executables=set(), symlinks={}, gitlinks={}, history=list(long_history.history))  # fmt: skip
    for n in range(3):
        add_commit(sample, {f"new/{n}.txt": f"new {n}\n".encode()}, f"New {n}")
    wait_until(lambda: afs.status("long")["head"] == sample.head, 60, interval=0.1, what="a refresh to the new commit")
    wait_until(lambda: afs.status("long")["history"] == "complete", 60, interval=0.1, what="the new history")
    events = json.loads(afs.run("events", "--name", "long", "--json").stdout)
    # The last move (a refresh may have run between two of the commits, and moved to the first).
    moved = max(i for i, e in enumerate(events) if e["type"] == "refreshed" and e["payload"]["outcome"] == "moved")
    assert events[moved]["payload"]["head"] == sample.head and events[moved]["payload"]["history"] == "pending"
    assert [e["payload"]["state"] for e in events[moved:] if e["type"] == "history"] == ["started", "done"]
    wait_until(lambda: (mount / "new" / "2.txt").exists(), 30, interval=0.1, what="the new commit in the mount")
    git_daemon.reset_count()
    assert ask(mount, "rev-list", "--count", "HEAD").strip() == "20003"
    assert git_daemon.fetch_count() == 0 and not (afs.root / "git" / "long.git" / "shallow").exists()


def test_over_protocol_v0_the_history_follows_and_no_fetch_walks_into_it(
    afs: Artifactfs, git_daemon: GitDaemon, served: str, full_clone: Path
) -> None:
    # Protocol v0 (git over a plain ssh, old servers) tells the remote what is here by walking
    # the local history: a fetch that reached a missing parent would fetch it lazily, with a
    # fetch that walks again, endlessly. Every git of the stack speaks v0 here.
    afs.env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="protocol.version", GIT_CONFIG_VALUE_0="0")
    afs.env["ARTIFACTFS_FAILPOINT"] = "phase:history"  # the mount's fetches run while it is missing
    afs.up()
    add_async(afs, "long", served)
    mount = afs.wait_mounted("long", timeout=60)
    wait_until(lambda: "long: failpoint phase:history reached" in afs.log("worker"), 60, interval=0.1, what="the failpoint")
    kill_worker(afs)
    git_daemon.reset_count()
    assert (mount / HOT).read_bytes()  # a blob fetch of the mount's, bounded
    assert ask(mount, "log", "--oneline") == ask(full_clone, "log", "--oneline")  # the history, fetched by git
    assert git_daemon.fetch_count() <= 2, git_daemon.fetch_log()
    del afs.env["ARTIFACTFS_FAILPOINT"]
    afs.up()
    wait_until(lambda: afs.status("long")["history"] == "complete", 60, interval=0.1, what="the history to be complete")
    assert not any((afs.root / "git" / "long.git" / name).exists() for name in ("shallow", "artifactfs-shallow"))


class DumbHttp:
    """A repository served over git's dumb HTTP protocol: no filters, no shallow fetches."""

    def __init__(self, base: Path) -> None:
        handler = functools.partial(QuietFiles, directory=str(base))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def dumb_http(tmp_path: Path, sample: SampleRepo) -> Iterator[str]:
    base = tmp_path / "dumb"
    base.mkdir()
    git("clone", "--quiet", "--bare", f"file://{sample.bare}", base / "sample.git")
    git("--git-dir", base / "sample.git", "update-server-info")
    server = DumbHttp(base)
    yield server.url("sample.git")
    server.close()


def test_a_remote_that_cannot_serve_a_shallow_clone_gets_the_whole_history_at_once(
    afs: Artifactfs, dumb_http: str, sample: SampleRepo
) -> None:
    afs.up()
    add_async(afs, "dumb", dumb_http)
    mount = afs.wait_mounted("dumb", timeout=60)
    assert (mount / "README.md").read_bytes() == sample.files["README.md"]
    ready = [e for e in json.loads(afs.run("events", "--name", "dumb", "--json").stdout) if e["type"] == "ready"]
    assert ready[-1]["payload"].get("shallow_refused") is True
    row = afs.status("dumb")
    assert row["history"] == "complete" and "whole history" in afs.log("worker")
    assert ask(mount, "rev-list", "--count", "HEAD").strip() == str(len(sample.history))
