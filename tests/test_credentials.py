"""Inline credentials (https://user:token@host/...) work for a blocking add, and the secret never
reaches the registry, the event log, status, git's config, a log line or a command line (`ps`)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Artifactfs, command_lines, new_installation
from .gitremote import GitHttpServer, SampleRepo, make_sample_repo

USER, TOKEN = "alice", "tok-9f8e7d6c5b4a-secret"


@pytest.fixture
def http_remote(tmp_path: Path) -> Iterator[tuple[GitHttpServer, SampleRepo]]:
    base = tmp_path / "http"
    base.mkdir()
    sample = make_sample_repo(base, "private")
    with GitHttpServer(base, USER, TOKEN) as server:
        yield server, sample


def files_under(root: Path) -> Iterator[Path]:
    """Every regular file under `root` (sockets and fifos hold no data to leak)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def test_inline_credentials_never_leak(afs: Artifactfs, http_remote: tuple[GitHttpServer, SampleRepo]) -> None:
    server, sample = http_remote
    url = server.url("private.git", with_credentials=True)
    assert TOKEN in url
    server.set_delay(0.3)  # keep the clone in flight long enough to look at every command line
    add = subprocess.Popen(
        [sys.executable, "-m", "artifactfs.cli", "add-repo", "--name", "private", "--remote", url],
        env=afs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen_git = False
    while add.poll() is None:
        for line in command_lines().values():
            if "artifactfs.cli" in line and "add-repo" in line:
                continue  # the command we typed ourselves holds it, as in any shell history
            assert TOKEN not in line, line
            seen_git = seen_git or ("git" in line and "127.0.0.1" in line)
        time.sleep(0.02)
    out, err = add.communicate()
    assert add.returncode == 0, err
    assert out.strip() == "added private"
    assert seen_git, "no git process was seen talking to the server"
    assert any(r.authorized for r in server.requests)
    server.set_delay(0)

    credential_file = afs.root / "credentials" / "private"
    assert stat.S_IMODE(credential_file.stat().st_mode) == 0o600

    afs.start_daemon()
    mnt = afs.wait_mounted("private")
    assert (mnt / "src/app.py").read_bytes() == sample.files["src/app.py"]  # lazy fetch authenticates

    shown = afs.run("status", "--name", "private").stdout + afs.run("events", "--name", "private", "--json").stdout
    shown += afs.run("list-repos").stdout + afs.daemon_log()
    assert TOKEN not in shown
    assert f"remote=http://127.0.0.1:{server.port}/private.git" in shown
    for path in files_under(afs.root):
        if path == credential_file:
            continue
        assert TOKEN.encode() not in path.read_bytes(), path


def test_wrong_credentials_fail_cleanly(afs: Artifactfs, http_remote: tuple[GitHttpServer, SampleRepo]) -> None:
    server, _ = http_remote
    url = server.url("private.git").replace("http://", f"http://{USER}:wrong-token@")
    line = afs.fail("add-repo", "--name", "private", "--remote", url)
    assert "wrong-token" not in line
    assert "authentication failed" in line.lower() or "cannot read remote" in line
    assert not (afs.root / "credentials" / "private").exists()
    assert not (afs.root / "git" / "private.git").exists()
    assert afs.run("list-repos").stdout == ""
    assert "wrong-token" not in afs.run("events", "--name", "private").stdout


# --- the credential helper, a state root with a space, 401s, stdin, prepare ----------------------


def http_server(base: Path, password: str) -> tuple[GitHttpServer, SampleRepo]:
    base.mkdir(parents=True, exist_ok=True)
    sample = make_sample_repo(base, "private")
    server = GitHttpServer(base, USER, password)
    server.start()
    return server, sample


def test_percent_encoded_credentials_reach_the_server_decoded(afs: Artifactfs, tmp_path: Path) -> None:
    server, _ = http_server(tmp_path / "http", "p@ss/w%rd")
    try:
        url = server.url("private.git", with_credentials=True)
        assert "p%40ss%2Fw%25rd" in url
        afs.add("private", url)
        assert any(r.authorized for r in server.requests)  # the server compares with p@ss/w%rd
    finally:
        server.stop()


@pytest.fixture
def spaced(tmp_path: Path) -> Iterator[Artifactfs]:
    """An installation whose state root (and mount root) has a space in its path."""
    inst = new_installation(tmp_path / "state root's home")
    try:
        yield inst
    finally:
        inst.cleanup()


def test_a_state_root_with_a_space_works_for_add_and_lazy_reads(
    spaced: Artifactfs, http_remote: tuple[GitHttpServer, SampleRepo]
) -> None:
    server, sample = http_remote
    afs = spaced
    afs.add("private", server.url("private.git", with_credentials=True))
    helpers = subprocess.run(
        ["git", f"--git-dir={afs.root / 'git' / 'private.git'}", "config", "--get-all", "credential.helper"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert TOKEN not in helpers and "credentials.py" in helpers
    afs.start_daemon()
    mnt = afs.wait_mounted("private")
    assert (mnt / "src/app.py").read_bytes() == sample.files["src/app.py"]
    assert (mnt / "assets/blob.bin").read_bytes() == sample.files["assets/blob.bin"]


def test_one_401_during_a_lazy_fetch_does_not_lose_the_credential(
    afs: Artifactfs, http_remote: tuple[GitHttpServer, SampleRepo]
) -> None:
    server, sample = http_remote
    afs.add("private", server.url("private.git", with_credentials=True))
    credential_file = afs.root / "credentials" / "private"
    stored = credential_file.read_bytes()
    afs.start_daemon()
    mnt = afs.wait_mounted("private")

    server.reject_authorized(1)
    try:
        (mnt / "README.md").read_bytes()  # its fetch meets the 401 (the read may fail)
    except OSError:
        pass
    rejected = [r for r in server.requests if r.authorized and r.status == 401]
    assert len(rejected) == 1, "the server never answered 401 to the lazy fetch"
    served = len(server.requests)
    # git told the helpers to erase the credential; it is still there, and the next fetch works.
    assert credential_file.read_bytes() == stored
    assert (mnt / "assets/blob.bin").read_bytes() == sample.files["assets/blob.bin"]
    assert any(r.authorized and r.status == 200 for r in server.requests[served:])


def test_remote_from_stdin_keeps_the_token_off_every_command_line(
    afs: Artifactfs, http_remote: tuple[GitHttpServer, SampleRepo]
) -> None:
    server, sample = http_remote
    url = server.url("private.git", with_credentials=True)
    server.set_delay(0.3)  # keep the add in flight long enough to look at every command line
    add = subprocess.Popen(
        [sys.executable, "-m", "artifactfs.cli", "add-repo", "--name", "private", "--remote", "-"],
        env=afs.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert add.stdin is not None
    add.stdin.write(url + "\n")
    add.stdin.close()
    looked = 0
    while add.poll() is None:
        for line in command_lines().values():
            assert TOKEN not in line, line  # not even the command we typed
        looked += 1
        time.sleep(0.02)
    assert looked > 3
    out, err = add.stdout.read(), add.stderr.read()  # type: ignore[union-attr]
    assert add.wait() == 0, err
    assert out.strip() == "added private"
    assert afs.status("private")["head"] == sample.head
    assert TOKEN not in afs.run("events", "--name", "private", "--json").stdout


def test_prepare_of_a_credentialed_repository_runs_here_not_in_a_job(
    afs: Artifactfs, http_remote: tuple[GitHttpServer, SampleRepo]
) -> None:
    server, sample = http_remote
    afs.add("private", server.url("private.git", with_credentials=True))
    afs.start_daemon()  # no broker and no worker: a published job would fail and be logged
    afs.wait_mounted("private")
    served = len(server.requests)
    out = afs.run("prepare", "--name", "private").stdout
    assert out.strip() == f"prepared private (attempt 2, head {sample.head})"
    assert afs.registry_state("private") == "ready"
    assert any(r.authorized for r in server.requests[served:])  # this process fetched, with the credential
    events = json.loads(afs.run("events", "--name", "private", "--json").stdout)
    requested = [e for e in events if e["type"] == "prepare_requested"]
    assert len(requested) == 1 and requested[0]["payload"] == {"attempt": 2, "asynchronous": False}
    assert requested[0]["job_id"].startswith("prepare:private:local-")
    log = afs.daemon_log()
    assert "publish" not in log and "prepare job" not in log, log

    # A failure is recorded as FAILED (redacted), and told on one line.
    server.stop()
    line = afs.fail("prepare", "--name", "private")
    assert TOKEN not in line
    assert afs.registry_state("private") == "failed"
    assert TOKEN not in afs.run("status", "--name", "private").stdout
