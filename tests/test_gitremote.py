"""The test remotes of tests/gitremote.py against the real git CLI."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from . import gitremote
except ImportError:  # tests/ is not imported as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gitremote  # type: ignore[no-redef]

GitDaemon = gitremote.GitDaemon
GitHttpServer = gitremote.GitHttpServer
SampleRepo = gitremote.SampleRepo
add_commit = gitremote.add_commit
file_url = gitremote.file_url
git = gitremote.git
git_env = gitremote.git_env
make_many_files_repo = gitremote.make_many_files_repo
make_sample_repo = gitremote.make_sample_repo

USER = "alice"
PASSWORD = "p@ss:w/rd 1"  # needs percent-encoding in URLs

# The command git itself runs to fetch missing objects of a partial clone.
LAZY_FETCH = ["-c", "fetch.negotiationAlgorithm=noop", "fetch", "origin", "--no-tags",
              "--no-write-fetch-head", "--recurse-submodules=no", "--filter=blob:none", "--stdin"]


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------


def run_git(*args, cwd=None, input=None, check=True, timeout=60):
    return git(*args, cwd=cwd, input=input, check=check, timeout=timeout)


def missing_objects(clone: Path) -> set[str]:
    """Objects reachable from any ref but absent locally (no lazy fetch)."""
    out = run_git("rev-list", "--objects", "--missing=print", "--all", cwd=clone).stdout.decode()
    return {line[1:].strip() for line in out.splitlines() if line.startswith("?")}


def _proc_stats() -> Iterator[tuple[int, str, str, int, int]]:
    """(pid, command, state, ppid, process group) of every process in /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        comm_end = data.rfind(")")
        fields = data[comm_end + 2:].split()
        yield int(entry), data[data.find("(") + 1:comm_end], fields[0], int(fields[1]), int(fields[2])


def _proc_children() -> dict[int, str]:
    """Live (non-zombie) child processes of this process: pid -> command."""
    me = os.getpid()
    return {pid: comm for pid, comm, state, ppid, _ in _proc_stats() if ppid == me and state != "Z"}


def _process_group_members(pgid: int) -> list[int]:
    return [pid for pid, _, state, _, pgrp in _proc_stats() if state != "Z" and pgrp == pgid]


@pytest.fixture(autouse=True)
def no_leaked_servers():
    """Fail a test that leaves server processes or server threads behind."""
    if not os.path.isdir("/proc"):
        yield
        return
    before = set(_proc_children())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = {pid: name for pid, name in _proc_children().items() if pid not in before}
        threads = [t.name for t in threading.enumerate() if t.name.startswith("git-http-")]
        if not leaked and not threads:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"leaked processes {leaked} / threads {threads}")
        time.sleep(0.05)


@pytest.fixture
def remotes(tmp_path: Path) -> Path:
    d = tmp_path / "remotes"
    d.mkdir()
    return d


@pytest.fixture
def sample(remotes: Path) -> SampleRepo:
    return make_sample_repo(remotes)


@pytest.fixture
def daemon(sample: SampleRepo):
    with GitDaemon(sample.bare.parent) as d:
        yield d
    assert not d.running


@pytest.fixture
def http(sample: SampleRepo):
    with GitHttpServer(sample.bare.parent, USER, PASSWORD) as server:
        yield server
    assert not server.running


def check_worktree(clone: Path, sample: SampleRepo) -> None:
    for path, content in sample.files.items():
        assert (clone / path).read_bytes() == content, path
        assert not (clone / path).is_symlink(), path
        is_exec = bool((clone / path).stat().st_mode & stat.S_IXUSR)
        assert is_exec == (path in sample.executables), path
    for path, target in sample.symlinks.items():
        assert os.readlink(clone / path) == target
    for path in sample.gitlinks:
        assert (clone / path).is_dir() and not any((clone / path).iterdir())


# --------------------------------------------------------------------------
# repository builders
# --------------------------------------------------------------------------


def test_file_url(sample: SampleRepo) -> None:
    url = file_url(sample.bare)
    assert url == "file://" + str(sample.bare.resolve())
    assert sample.url == url


def test_sample_repo_layout(sample: SampleRepo) -> None:
    bare = sample.bare
    assert bare.name == "sample.git" and (bare / "HEAD").is_file()
    assert run_git("--git-dir", bare, "rev-parse", "refs/heads/main").stdout.decode().strip() == sample.head
    assert run_git("--git-dir", bare, "symbolic-ref", "HEAD").stdout.decode().strip() == "refs/heads/main"
    for key in ("uploadpack.allowFilter", "uploadpack.allowAnySHA1InWant"):
        assert run_git("--git-dir", bare, "config", "--bool", key).stdout.decode().strip() == "true"

    expected_paths = {"README.md", ".gitmodules", "src/app.py", "src/lib/util.py", "src/lib/data.json",
                      "bin/run.sh", "empty.txt", "docs/h\u00e9llo w\u00f6rld.txt", "assets/blob.bin",
                      "assets/big.txt"}
    assert set(sample.files) == expected_paths
    assert sample.executables == {"bin/run.sh"}
    assert sample.symlinks == {"docs/link-to-readme": "../README.md", "srclink": "src"}
    assert set(sample.gitlinks) == {"vendor/sub"}
    assert len(sample.files["assets/blob.bin"]) == 300 * 1024
    assert len(sample.files["assets/big.txt"]) == 2 * 1024 * 1024
    assert sample.files["empty.txt"] == b""

    entries = sample.tree_entries()
    assert set(entries) == expected_paths | set(sample.symlinks) | set(sample.gitlinks)
    for path in sample.files:
        assert entries[path][:2] == ("100755" if path in sample.executables else "100644", "blob")
    for path in sample.symlinks:
        assert entries[path][:2] == ("120000", "blob")
    assert entries["vendor/sub"] == ("160000", "commit", sample.gitlinks["vendor/sub"])

    # Contents, read back in one cat-file process.
    order = list(sample.files) + list(sample.symlinks)
    out = run_git("--git-dir", bare, "cat-file", "--batch",
                  input="".join(entries[p][2] + "\n" for p in order).encode()).stdout
    pos = 0
    for path in order:
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        data = out[header_end + 1:header_end + 1 + size]
        pos = header_end + 1 + size + 1
        expected = sample.files[path] if path in sample.files else sample.symlinks[path].encode()
        assert data == expected, path
    assert b"vendor/sub" in sample.files[".gitmodules"]

    # History: two commits on main, v1 is an annotated tag on the first one.
    assert run_git("--git-dir", bare, "rev-list", "main").stdout.decode().split() == sample.history[::-1]
    assert len(sample.history) == 2
    assert run_git("--git-dir", bare, "cat-file", "-t", "v1").stdout.strip() == b"tag"
    assert run_git("--git-dir", bare, "rev-parse", "v1^{commit}").stdout.decode().strip() == sample.tags["v1"]
    assert sample.tags["v1"] == sample.history[0]
    old_readme = run_git("--git-dir", bare, "show", "v1:README.md").stdout
    assert old_readme != sample.files["README.md"]

    # feature branch: main plus feature.txt
    feature = sample.branches["feature"]
    assert run_git("--git-dir", bare, "rev-parse", "feature^").stdout.decode().strip() == sample.head
    assert run_git("--git-dir", bare, "show", "feature:feature.txt").stdout == b"feature branch only\n"
    assert "feature.txt" not in entries
    assert feature == run_git("--git-dir", bare, "rev-parse", "feature").stdout.decode().strip()


def test_sample_repo_is_deterministic(tmp_path: Path) -> None:
    a = make_sample_repo(tmp_path / "a")
    b = make_sample_repo(tmp_path / "b", name="other")
    assert b.bare == tmp_path / "b" / "other.git"
    assert (a.head, a.branches, a.tags) == (b.head, b.branches, b.tags)
    with pytest.raises(FileExistsError):
        make_sample_repo(tmp_path / "a")


def test_add_commit(sample: SampleRepo) -> None:
    old_head = sample.head
    sha = add_commit(sample, {"new/file.txt": b"new\n", "README.md": b"changed\n",
                              "empty.txt": None}, "Third commit")
    assert sha == sample.head != old_head
    assert sample.history[-1] == sha and len(sample.history) == 3
    bare = sample.bare
    assert run_git("--git-dir", bare, "rev-parse", "main").stdout.decode().strip() == sha
    assert run_git("--git-dir", bare, "rev-parse", f"{sha}^").stdout.decode().strip() == old_head
    assert run_git("--git-dir", bare, "log", "-1", "--format=%s", sha).stdout.decode().strip() == "Third commit"
    entries = sample.tree_entries()
    assert "empty.txt" not in entries and "empty.txt" not in sample.files
    assert sample.files["new/file.txt"] == b"new\n"
    assert run_git("--git-dir", bare, "show", "main:README.md").stdout == b"changed\n"
    # everything else unchanged, including symlinks and the gitlink
    assert set(entries) == set(sample.files) | set(sample.symlinks) | set(sample.gitlinks)

    # Another branch leaves head alone.
    feature_old = sample.branches["feature"]
    fsha = add_commit(sample, {"feature.txt": b"more\n"}, "feature work", branch="feature")
    assert sample.head == sha and sample.branches["feature"] == fsha
    assert run_git("--git-dir", bare, "rev-parse", f"{fsha}^").stdout.decode().strip() == feature_old

    # A new branch starts from main.
    nsha = add_commit(sample, {"x": b"x"}, "topic", branch="topic")
    assert run_git("--git-dir", bare, "rev-parse", f"{nsha}^").stdout.decode().strip() == sample.head

    # Executable mode.
    add_commit(sample, {"tool.sh": b"#!/bin/sh\n"}, "tool", executables={"tool.sh"})
    assert sample.tree_entries()["tool.sh"][0] == "100755" and "tool.sh" in sample.executables


def test_many_files_repo_is_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    many = make_many_files_repo(tmp_path, files=5000, dirs=50, file_size=400)
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"building 5000 files took {elapsed:.1f}s"
    out = run_git("--git-dir", many.bare, "ls-tree", "-r", "-z", "--long", many.head).stdout
    records = [r for r in out.split(b"\0") if r]
    paths = {r.split(b"\t", 1)[1].decode() for r in records}
    assert len(paths) == 5001 and paths == set(many.files)
    assert "README.md" in paths and "d000/f0000.txt" in paths and "d049/f4999.txt" in paths
    assert len({p.split("/")[0] for p in paths if p != "README.md"}) == 50
    sizes = {int(r.split(b"\t")[0].split()[3]) for r in records if not r.endswith(b"README.md")}
    assert sizes == {400}
    assert len({c for p, c in many.files.items()}) == 5001  # all different
    assert run_git("--git-dir", many.bare, "show", f"{many.head}:d007/f0007.txt").stdout == many.files["d007/f0007.txt"]


# --------------------------------------------------------------------------
# file://
# --------------------------------------------------------------------------


def test_blobless_clone_over_file_url(sample: SampleRepo, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    run_git("clone", "--filter=blob:none", file_url(sample.bare), clone)
    check_worktree(clone, sample)
    assert run_git("config", "remote.origin.promisor", cwd=clone).stdout.strip() == b"true"
    # Only the checked-out blobs came over: README.md of v1 did not.
    old_readme = sample.blob_id("README.md", sample.tags["v1"])
    assert old_readme in missing_objects(clone)
    assert run_git("show", "v1:README.md", cwd=clone).stdout.startswith(b"# sample")
    assert old_readme not in missing_objects(clone)


def test_protocol_v2_fetches_any_oid_without_allow_any_sha1(sample: SampleRepo, tmp_path: Path) -> None:
    """Documents git's behaviour: with protocol v2 the server serves any
    object id asked for, uploadpack.allowAnySHA1InWant only matters for v0."""
    run_git("--git-dir", sample.bare, "config", "--unset", "uploadpack.allowAnySHA1InWant")
    unreachable = run_git("--git-dir", sample.bare, "hash-object", "-w", "--stdin",
                          input=b"not reachable from any ref\n").stdout.decode().strip()
    wanted = f"{sample.blob_id('README.md', sample.tags['v1'])}\n{unreachable}\n".encode()
    for version, ok in (("2", True), ("0", False)):
        clone = tmp_path / f"v{version}"
        run_git("-c", f"protocol.version={version}", "clone", "--filter=blob:none", "--no-checkout",
                file_url(sample.bare), clone)
        res = run_git("-c", f"protocol.version={version}", *LAZY_FETCH, cwd=clone, input=wanted,
                      check=False)
        assert (res.returncode == 0) == ok, res.stderr
        if not ok:
            assert b"not allow request for unadvertised object" in res.stderr


# --------------------------------------------------------------------------
# git://
# --------------------------------------------------------------------------


def test_daemon_blobless_clone_and_transaction_count(sample: SampleRepo, daemon: GitDaemon,
                                                     tmp_path: Path) -> None:
    assert daemon.url("sample.git") == f"git://127.0.0.1:{daemon.port}/sample.git"
    daemon.reset_count()
    assert daemon.fetch_count() == 0
    clone = tmp_path / "clone"
    run_git("clone", "--filter=blob:none", "--no-checkout", daemon.url("sample.git"), clone)
    assert daemon.fetch_count() == 1
    assert daemon.fetch_count("sample.git") == 1 and daemon.fetch_count("other.git") == 0
    assert "--filter=blob:none" in daemon.fetch_log()[0][1]

    missing = missing_objects(clone)
    wanted = [sample.blob_id(p) for p in ("README.md", "src/app.py", "assets/blob.bin", "bin/run.sh")]
    assert set(wanted) <= missing

    # Several blobs on stdin: one transaction.
    run_git(*LAZY_FETCH, cwd=clone, input="".join(w + "\n" for w in wanted).encode())
    assert daemon.fetch_count() == 2
    assert not set(wanted) & missing_objects(clone)

    # Nothing new on the remote: no pack is made ...
    run_git("fetch", "--recurse-submodules=no", "origin", cwd=clone)
    assert daemon.fetch_count() == 2
    # ... but a plain fetch looks for submodules and so reads .gitmodules
    # of HEAD, which is fetched lazily (once).
    gitmodules = sample.blob_id(".gitmodules")
    assert gitmodules in missing_objects(clone)
    run_git("fetch", "origin", cwd=clone)
    assert daemon.fetch_count() == 3
    assert gitmodules not in missing_objects(clone)
    run_git("fetch", "origin", cwd=clone)
    assert daemon.fetch_count() == 3

    # One lazily read blob: one transaction.
    assert run_git("cat-file", "-p", sample.blob_id("src/lib/util.py"), cwd=clone).stdout == \
        sample.files["src/lib/util.py"]
    assert daemon.fetch_count() == 4

    # Checkout fetches all remaining missing blobs of the tree in one batch.
    run_git("checkout", "main", cwd=clone)
    assert daemon.fetch_count() == 5
    check_worktree(clone, sample)

    # A new commit on the remote: the fetch, then one lazy fetch for checkout.
    add_commit(sample, {"later.txt": b"later\n"}, "later")
    run_git("pull", "--ff-only", "origin", "main", cwd=clone)
    assert (clone / "later.txt").read_bytes() == b"later\n"
    assert daemon.fetch_count() == 7

    daemon.reset_count()
    assert daemon.fetch_count() == 0


def test_daemon_delay_slows_clone(sample: SampleRepo, daemon: GitDaemon, tmp_path: Path) -> None:
    daemon.set_delay(1.0)
    start = time.monotonic()
    run_git("clone", "--filter=blob:none", "--no-checkout", daemon.url("sample.git"), tmp_path / "slow")
    slow = time.monotonic() - start
    assert slow >= 1.0
    daemon.set_delay(0)
    start = time.monotonic()
    run_git("clone", "--filter=blob:none", "--no-checkout", daemon.url("sample.git"), tmp_path / "fast")
    fast = time.monotonic() - start
    assert fast < slow


def test_daemon_broken_remote(sample: SampleRepo, daemon: GitDaemon, tmp_path: Path) -> None:
    daemon.set_broken(True)
    res = run_git("clone", "--filter=blob:none", daemon.url("sample.git"), tmp_path / "bad", check=False)
    assert res.returncode != 0
    assert b"broken" in res.stderr or b"pack-objects" in res.stderr, res.stderr
    assert daemon.fetch_count() == 1  # the attempt is logged
    daemon.set_broken(False)
    run_git("clone", "--filter=blob:none", daemon.url("sample.git"), tmp_path / "good")
    check_worktree(tmp_path / "good", sample)


def test_daemon_restart_on_same_port(sample: SampleRepo, daemon: GitDaemon, tmp_path: Path) -> None:
    port = daemon.port
    url = daemon.url("sample.git")
    daemon.stop()
    assert not daemon.running
    res = run_git("ls-remote", url, check=False)
    assert res.returncode != 0
    daemon.start()
    assert daemon.port == port and daemon.running
    out = run_git("ls-remote", url).stdout.decode()
    assert f"{sample.head}\trefs/heads/main" in out
    assert "refs/tags/v1" in out


def test_daemon_stop_ends_in_flight_fetch(sample: SampleRepo, daemon: GitDaemon, tmp_path: Path) -> None:
    daemon.set_delay(30)
    clone = subprocess.Popen(
        ["git", "clone", "--filter=blob:none", daemon.url("sample.git"), str(tmp_path / "c")],
        env=git_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while daemon.fetch_count() == 0:  # the hook is now sleeping
            assert time.monotonic() < deadline, "clone never reached pack-objects"
            time.sleep(0.05)
        pgid = daemon.pid
        assert pgid is not None and len(_process_group_members(pgid)) > 1
        start = time.monotonic()
        daemon.stop()
        # SIGKILLed processes take a moment to be gone from /proc.
        while _process_group_members(pgid) and time.monotonic() - start < 5:
            time.sleep(0.02)
        assert time.monotonic() - start < 5
        assert _process_group_members(pgid) == []
        assert clone.wait(timeout=10) != 0
    finally:
        if clone.poll() is None:
            clone.kill()
        clone.wait()
        clone.stderr.close()


# --------------------------------------------------------------------------
# http://
# --------------------------------------------------------------------------


def test_http_clone_with_credentials(sample: SampleRepo, http: GitHttpServer, tmp_path: Path) -> None:
    assert http.url("sample.git") == f"http://127.0.0.1:{http.port}/sample.git"
    assert http.url("sample.git", with_credentials=True) == \
        f"http://alice:p%40ss%3Aw%2Frd%201@127.0.0.1:{http.port}/sample.git"
    clone = tmp_path / "clone"
    run_git("clone", "--filter=blob:none", http.url("sample.git", with_credentials=True), clone)
    check_worktree(clone, sample)
    assert http.fetch_count() == 2  # the clone's pack, then checkout's blobs

    reqs = list(http.requests)
    assert reqs, "no request recorded"
    # curl first asks without credentials to learn the auth scheme.
    assert all(r.status == 401 for r in reqs if not r.authorized)
    assert all(r.status == 200 for r in reqs if r.authorized)
    assert any(r.method == "GET" and r.path == "/sample.git/info/refs"
               and r.query == "service=git-upload-pack" and r.authorized for r in reqs)
    assert any(r.method == "POST" and r.path == "/sample.git/git-upload-pack" and r.authorized
               for r in reqs)

    # A lazy fetch of several blobs is one pack and one authorized POST.
    http.clear_requests()
    wanted = [sample.blob_id("README.md", sample.tags["v1"]), sample.blob_id("src/app.py", sample.tags["v1"])]
    run_git(*LAZY_FETCH, cwd=clone, input="".join(w + "\n" for w in wanted).encode())
    assert http.fetch_count() == 3
    assert [r.method for r in http.requests if r.authorized] == ["GET", "POST"]
    assert not set(wanted) & missing_objects(clone)


def test_http_clone_without_credentials_fails(sample: SampleRepo, http: GitHttpServer,
                                              tmp_path: Path) -> None:
    env = git_env({"GIT_TERMINAL_PROMPT": "0"})
    res = git("clone", "--filter=blob:none", http.url("sample.git"), tmp_path / "anon", env=env,
              check=False, timeout=60)
    assert res.returncode != 0
    assert http.requests and all(not r.credentials_sent and r.status == 401 for r in http.requests)
    assert not (tmp_path / "anon").exists()

    http.clear_requests()
    bad = http.url("sample.git").replace("http://", "http://alice:wrong@")
    res = git("clone", "--filter=blob:none", bad, tmp_path / "wrong", env=env, check=False, timeout=60)
    assert res.returncode != 0
    assert any(r.credentials_sent and not r.authorized for r in http.requests)
    assert all(r.status == 401 for r in http.requests)
    assert http.fetch_count() == 0


def test_http_gzip_and_chunked_requests(remotes: Path, tmp_path: Path) -> None:
    many = make_many_files_repo(remotes, files=4000, dirs=40, file_size=64)
    with GitHttpServer(remotes, USER, PASSWORD) as http:
        clone = tmp_path / "clone"
        run_git("clone", "--filter=blob:none", "--no-checkout", http.url("many.git", True), clone)
        blobs = sorted(missing_objects(clone))
        assert len(blobs) == len(many.files) == 4001
        half = len(blobs) // 2
        http.clear_requests()
        # ~100 KB of "want" lines: gzip-compressed below http.postBuffer ...
        run_git(*LAZY_FETCH, cwd=clone, input="".join(b + "\n" for b in blobs[:half]).encode())
        posts = [r for r in http.requests if r.method == "POST" and r.authorized]
        assert any(r.content_encoding == "gzip" for r in posts)
        http.clear_requests()
        # ... and streamed with chunked transfer encoding above it.  (git
        # 2.39 hits a BUG() when http.postBuffer is exactly 65520.)
        run_git("-c", "http.postBuffer=70000", *LAZY_FETCH, cwd=clone,
                input="".join(b + "\n" for b in blobs[half:]).encode())
        posts = [r for r in http.requests if r.method == "POST" and r.authorized]
        assert any(r.chunked and r.body_length > 70000 for r in posts)
        assert missing_objects(clone) == set()
        assert http.fetch_count() == 3


def test_http_delay_and_broken(sample: SampleRepo, http: GitHttpServer, tmp_path: Path) -> None:
    url = http.url("sample.git", with_credentials=True)
    http.set_delay(0.4)
    start = time.monotonic()
    run_git("ls-remote", url)
    slow = time.monotonic() - start
    assert slow >= 0.8  # at least the 401 round and the authorized one
    http.set_delay(0)
    start = time.monotonic()
    run_git("ls-remote", url)
    assert time.monotonic() - start < slow

    http.set_broken(True)
    res = run_git("clone", "--filter=blob:none", url, tmp_path / "bad", check=False)
    assert res.returncode != 0
    http.set_broken(False)
    run_git("clone", "--filter=blob:none", url, tmp_path / "good")
    check_worktree(tmp_path / "good", sample)


def test_http_restart_and_stop_in_flight(sample: SampleRepo, http: GitHttpServer, tmp_path: Path) -> None:
    port = http.port
    http.stop()
    assert run_git("ls-remote", http.url("sample.git", True), check=False).returncode != 0
    http.start()
    assert http.port == port
    assert sample.head in run_git("ls-remote", http.url("sample.git", True)).stdout.decode()

    http.clear_requests()
    http.set_delay(30)
    clone = subprocess.Popen(
        ["git", "clone", "--filter=blob:none", http.url("sample.git", True), str(tmp_path / "c")],
        env=git_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not http.requests:
            assert time.monotonic() < deadline, "no request arrived"
            time.sleep(0.05)
        start = time.monotonic()
        http.stop()
        assert time.monotonic() - start < 5
        assert clone.wait(timeout=10) != 0
    finally:
        if clone.poll() is None:
            clone.kill()
        clone.wait()
