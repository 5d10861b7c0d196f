"""Bad input: one clear line on stderr, exit status 1, and nothing changed."""
from __future__ import annotations

import socket
import sqlite3

import pytest

from .conftest import Artifactfs
from .gitremote import SampleRepo


def footprint(afs: Artifactfs) -> dict[str, object]:
    """Everything a failed command must leave as it was: registrations, git dirs, mounts, temp."""
    db = afs.root / "registry.db"
    repos: list[tuple] = []
    if db.exists():
        with sqlite3.connect(db) as conn:
            repos = conn.execute("SELECT name, prepare_state, head FROM repos ORDER BY name").fetchall()
    listing = lambda p: sorted(x.name for x in p.iterdir()) if p.exists() else []  # noqa: E731
    return {
        "repos": repos,
        "git": listing(afs.root / "git"),
        "tmp": listing(afs.root / "tmp"),
        "credentials": listing(afs.root / "credentials"),
        "mounts": listing(afs.mount_root),
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def with_one_repo(afs: Artifactfs, sample: SampleRepo) -> Artifactfs:
    afs.add("existing", sample.url)
    return afs


@pytest.mark.parametrize(
    "args, expected",
    [
        (["status", "--name", "ghost"], "no repository named 'ghost'"),
        (["remove-repo", "--name", "ghost"], "no repository named 'ghost'"),
        (["events", "--name", "ghost"], "no repository named 'ghost'"),
        (["add-repo", "--name", "existing", "--remote", "SAMPLE"], "already registered"),
        (["add-repo", "--name", "a/b", "--remote", "SAMPLE"], "invalid repository name"),
        (["add-repo", "--name", "..", "--remote", "SAMPLE"], "invalid repository name"),
        (["add-repo", "--name", "x..y", "--remote", "SAMPLE"], "invalid repository name"),
        (["add-repo", "--name", "new", "--remote", "file:///nonexistent/repo.git"], "does not appear to be a git repository"),
        (["add-repo", "--name", "new", "--remote", "git://127.0.0.1:PORT/repo.git"], "unable to connect"),
        (["add-repo", "--name", "new", "--remote", "SAMPLE", "--ref", "refs/heads/nope"], "refs/heads/nope does not exist"),
        (["add-repo", "--name", "new", "--remote", "https://example.invalid/repo.git?token=x"], "query or fragment"),
        (["add-repo", "--name", "new", "--remote", "https://example.invalid/repo.git#main"], "query or fragment"),
        (["add-repo", "--name", "new", "--remote", "ftp://example.invalid/repo.git"], "unsupported remote scheme"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    with_one_repo: Artifactfs, sample: SampleRepo, args: list[str], expected: str
) -> None:
    afs = with_one_repo
    args = [a.replace("SAMPLE", sample.url).replace("PORT", str(closed_port())) for a in args]
    before = footprint(afs)
    events_before = afs.run("events", "--name", "existing").stdout
    line = afs.fail(*args)
    assert expected in line, line
    assert footprint(afs) == before
    assert afs.run("events", "--name", "existing").stdout == events_before
    assert afs.status("existing")["state"] in ("unmounted", "mounted")


def test_failed_add_frees_the_name_and_records_the_attempt(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.fail("add-repo", "--name", "retry", "--remote", sample.url, "--ref", "refs/heads/missing")
    assert footprint(afs)["git"] == [] and footprint(afs)["repos"] == []
    history = afs.run("events", "--name", "retry").stdout
    assert "add_abandoned" in history and "refs/heads/missing" in history
    afs.add("retry", sample.url)  # the name is free again
    assert afs.status("retry")["head"] == sample.head
    assert afs.run("events", "--name", "retry").stdout.count("registered") == 2


def test_remove_repo_deletes_its_state(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("gone", sample.url)
    git_dir = afs.root / "git" / "gone.git"
    assert git_dir.is_dir()
    assert afs.run("remove-repo", "--name", "gone").stdout.strip() == "removed gone"
    assert not git_dir.exists()
    assert afs.run("list-repos").stdout == ""
    assert "removed" in afs.run("events", "--name", "gone").stdout


def test_list_and_status_output(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.add("one", sample.url)
    afs.add("two", sample.url, "--ref", "refs/heads/feature")
    names = [line.split("\t")[0] for line in afs.run("list-repos").stdout.splitlines()]
    assert names == ["one", "two"]
    lines = afs.run("status").stdout.splitlines()
    assert len(lines) == 2
    fields = dict(kv.split("=", 1) for kv in lines[1].split(" "))
    assert fields["repo"] == "two" and fields["ref"] == "refs/heads/feature"
    assert fields["head"] == sample.branches["feature"] and fields["state"] == "unmounted"
    assert fields["hydrated_blobs"] == "0" and fields["prepare_error"] == ""


def test_usage_errors_are_one_line_too(afs: Artifactfs) -> None:
    for args in (["add-repo", "--name", "x"], ["frobnicate"], ["status", "--bogus"]):
        proc = afs.run(*args, check=False)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--help" in lines[0], proc.stderr
    assert not (afs.root / "git").exists() or list((afs.root / "git").iterdir()) == []
