"""Inline credentials (https://user:token@host/...) work for a blocking add, and the secret never
reaches the registry, the event log, status, git's config, a log line or a command line (`ps`)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Artifactfs
from .gitremote import GitHttpServer, SampleRepo, make_sample_repo

USER, TOKEN = "alice", "tok-9f8e7d6c5b4a-secret"


@pytest.fixture
def http_remote(tmp_path: Path) -> Iterator[tuple[GitHttpServer, SampleRepo]]:
    base = tmp_path / "http"
    base.mkdir()
    sample = make_sample_repo(base, "private")
    with GitHttpServer(base, USER, TOKEN) as server:
        yield server, sample


def command_lines() -> list[str]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return lines


def files_under(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            yield Path(dirpath) / name


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
        for line in command_lines():
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
