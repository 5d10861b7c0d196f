"""Bad input: one clear line on stderr, a non-zero exit, and nothing changed."""
from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from artifactfs.mounts import fuse_mounts

from .conftest import PYTHON, Artifactfs, new_installation, wait_until
from .gitremote import SampleRepo

SECRET = "tok-SECRET-5ca1ab1e"


def listing(base: Path) -> dict[str, tuple[int, int | None]]:
    """Every path under `base` with its mode and (for files) size; FUSE mounts are not entered."""
    found: dict[str, tuple[int, int | None]] = {}
    mounts = set(fuse_mounts())
    if not base.exists():
        return found
    for dirpath, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in mounts]
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.path.relpath(path, base)] = (st.st_mode, st.st_size if stat.S_ISREG(st.st_mode) else None)
    return found


def registry_rows(db: Path) -> object:
    if not db.is_file():
        return None
    try:
        # immutable: reading must not create a -shm next to the registry (that would be a change)
        with sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True) as conn:
            return (conn.execute("SELECT * FROM repos ORDER BY name").fetchall(),
                    conn.execute("SELECT * FROM events ORDER BY id").fetchall())  # fmt: skip
    except sqlite3.DatabaseError as exc:
        return f"unreadable: {exc}"


def footprint(afs: Artifactfs, *extra: Path) -> dict[str, object]:
    """Everything a failed command must leave as it was: every path under the state root, the
    mount root and `extra` (mode and size), and every row and event of the registry."""
    return {
        "root": listing(afs.root),
        "mounts": listing(afs.mount_root),
        **{str(p): listing(p) for p in extra},
        "registry": registry_rows(afs.root / "registry.db"),
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
        (["add-repo", "--name", "new", "--remote", "file:///nonexistent/repo.git"], "does not appear to be a git repository"),
        (["add-repo", "--name", "new", "--remote", "git://127.0.0.1:PORT/repo.git"], "unable to connect"),
        (["add-repo", "--name", "new", "--remote", "SAMPLE", "--ref", "refs/heads/nope"], "refs/heads/nope does not exist"),
    ],
)
def test_a_remote_that_fails_leaves_only_the_record_of_the_attempt(
    with_one_repo: Artifactfs, sample: SampleRepo, args: list[str], expected: str
) -> None:
    afs = with_one_repo
    args = [a.replace("SAMPLE", sample.url).replace("PORT", str(closed_port())) for a in args]
    before = footprint(afs)
    line = afs.fail(*args)
    assert expected in line, line
    after = footprint(afs)
    assert after["root"] == before["root"] and after["mounts"] == before["mounts"]
    new_events = after["registry"][1][len(before["registry"][1]):]  # type: ignore[index]
    assert {e[1] for e in new_events} == {"new"}  # (id, stream, version, type, ...)
    assert new_events[0][3] == "registered" and new_events[-1][3] == "add_abandoned"
    assert after["registry"][0] == before["registry"][0]  # type: ignore[index]


# --- one table of bad input: refused before anything is written ---------------------------------


@dataclass
class Installation:
    """One installation with a registered repository, shared by every case of the table (each
    case must leave it exactly as it found it), and the odd paths the cases point at."""

    afs: Artifactfs
    sample: SampleRepo
    base: Path

    @property
    def allowed(self) -> Path:
        return self.base / "allowed"

    def expand(self, arg: str) -> str:
        return (arg.replace("SAMPLE", self.sample.url).replace("BASE", str(self.base))
                .replace("MNT", str(self.afs.mount_root)))  # fmt: skip

    def run(self, args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "artifactfs.cli", *args], env=self.afs.env, input=stdin, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory, sample: SampleRepo) -> Iterator[Installation]:
    base = tmp_path_factory.mktemp("table")
    afs = new_installation(base)
    inst = Installation(afs, sample, base)
    inst.allowed.mkdir()
    (base / "elsewhere").mkdir()
    (inst.allowed / "file").write_text("not a directory\n")
    (inst.allowed / "ro").mkdir()
    (inst.allowed / "into-existing").symlink_to(afs.mount_root / "existing")
    afs.env["ARTIFACTFS_ALLOWED_MOUNT_ROOTS"] = str(inst.allowed)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "artifactfs-test-ro", str(inst.allowed / "ro")], check=True)
    try:
        afs.add("existing", sample.url)
        yield inst
    finally:
        subprocess.run(["umount", str(inst.allowed / "ro")], check=False)
        afs.cleanup()


def add(*extra: str, name: str = "new", remote: str = "SAMPLE") -> list[str]:
    return ["add-repo", "--name", name, "--remote", remote, *extra]


@dataclass
class Bad:
    args: list[str]
    expected: str
    stdin: str = ""
    secrets: tuple[str, ...] = field(default=(SECRET,))

    def __str__(self) -> str:
        return " ".join(self.args)[:60]


BAD_INPUT = [
    # names
    Bad(add(name="x\n"), "argument 3 (the value of --name) contains the control character \\n"),
    Bad(["add-repo", "--name=a\x1b[2Jb", "--remote", "SAMPLE"], "argument 2 (the value of --name) contains the control character \\x1b"),
    Bad(add(name="a\u202eb"), "control character \\u202e"),
    Bad(add(name=".."), "invalid repository name"),
    Bad(add(name="a/b"), "invalid repository name"),
    Bad(add(name="x..y"), "invalid repository name"),
    Bad(add(name="x" * 101), "invalid repository name"),
    Bad(add(name=""), "invalid repository name"),
    Bad(["add-repo", "--name=-x", "--remote", "SAMPLE"], "invalid repository name"),
    Bad(add(name=".hidden"), "invalid repository name"),
    Bad(add(name="existing"), "already registered"),
    # remotes
    Bad(add(remote="ext::sh -c touch% BASE/pwned"), "remote helper syntax ext::"),
    Bad(add(remote="fd::17"), "remote helper syntax fd::"),
    Bad(["add-repo", "--name", "new", "--remote=-uhttps://h.example/r.git"], "begins with '-'"),
    Bad(["add-repo", "--name", "new", "--remote", "--upload-pack=touch BASE/pwned"], "begins with '-'"),
    Bad(["add-repo", "--name", "new", "--remote", "-uhttps://h.example/r.git"], "expected one argument"),
    Bad(add(remote=f"alice:{SECRET}@host.example:org/r.git"), "holds a password or token"),
    Bad(add(remote=f"ssh://git:{SECRET}@host.example/r.git"), "only supported for http(s)"),
    Bad(add(remote="https://h.example:99999/r.git"), "invalid port"),
    Bad(add(remote="https://h.example:abc/r.git"), "invalid port"),
    Bad(add(remote="https://[::1/r.git"), "unbalanced '['"),
    Bad(add(remote="ftp://h.example/r.git"), "unsupported remote scheme"),
    Bad(add(remote=f"https://h.example/r.git?access_token={SECRET}"), "query or fragment"),
    Bad(add(remote="https://h.example/r.git#main"), "query or fragment"),
    Bad(add(remote="relative/path"), "invalid remote"),
    Bad(add(remote="BASE/nonexistent.git"), "does not exist"),
    Bad(add(remote=f"https://u:{SECRET}%0A@h.example/r.git"), "control character \\n"),
    Bad(add(remote=f"https://u:{SECRET}@h.example/r\x07.git"), "control character \\x07"),
    Bad(add(remote="-"), "standard input holds no remote"),
    Bad(add(remote="-"), "control character \\x1b", stdin=f"https://u:{SECRET}@h.example/r\x1b[2J.git\n"),
    # refs
    Bad(add("--ref", "a..b"), "invalid ref"),
    Bad(add("--ref=-x"), "invalid ref"),
    Bad(add("--ref", "main.lock"), "invalid ref"),
    Bad(add("--ref", "ma@{1}"), "invalid ref"),
    Bad(add("--ref", "a b"), "invalid ref"),
    Bad(add("--ref", "a\x7fb"), "control character \\x7f"),
    # owners
    Bad(add("--owner", "no-such-user-here"), "--owner no-such-user-here: no such user on this host"),
    Bad(add("--owner", "4000000000"), "no such user on this host"),
    Bad(add("--owner", "nobody", "--prepared-gitdir", "--git-dir", "BASE", "--fetch-ref", "main"),
        "--owner does not go with --prepared-gitdir"),
    # partial-clone filters
    Bad(add("--filter", "tree:0"), "invalid --filter 'tree:0': give blob:none or blob:limit=SIZE"),
    Bad(add("--filter", "blob:limit=lots"), "invalid --filter 'blob:limit=lots'"),
    Bad(add("--filter", "blob:limit=1k", "--prepared-gitdir", "--git-dir", "BASE", "--fetch-ref", "main"),
        "--filter does not go with --prepared-gitdir"),
    Bad(add("--owner", "root"), "--owner root: that is root"),
    Bad(add("--owner", "nobody", remote=f"https://user:{SECRET}@example.com/r.git"),
        "--owner does not go with credentials in the remote URL"),
    # mount roots
    Bad(add("--mount-root", "BASE/allowed/file"), "is not a directory"),
    Bad(add("--mount-root", "BASE/allowed/missing"), "does not exist"),
    Bad(add("--mount-root", "BASE/allowed/ro"), "is read-only"),
    Bad(add("--mount-root", "BASE/elsewhere"), "outside the allowed mount roots"),
    Bad(add("--mount-root", "MNT/existing/sub"), "inside the mount of repository 'existing'"),
    Bad(add("--mount-root", "MNT/existing"), "inside the mount of repository 'existing'"),
    Bad(add("--mount-root", "BASE/allowed/into-existing"), "inside the mount of repository 'existing'"),
    Bad(add("--mount-root", "BASE/allowed/a\tb"), "control character \\t"),
    # names nobody registered
    Bad(["status", "--name", "ghost"], "no repository named 'ghost'"),
    Bad(["events", "--name", "ghost"], "no repository named 'ghost'"),
    Bad(["prepare", "--name", "ghost"], "no repository named 'ghost'"),
    Bad(["remove-repo", "--name", "ghost"], "no repository named 'ghost'"),
    Bad(["remove-repo", "--name", "../existing"], "invalid repository name"),
    # usage
    Bad(["status", "--bogus"], "unrecognized arguments"),
    Bad(["frobnicate"], "invalid choice"),
    Bad(["add-repo", "--name", "x"], "required"),
    Bad(["--log-level", "LOUD", "list-repos"], "invalid choice"),
    Bad(["add-repo", "--name", "new", "--remote", f"https://u:{SECRET}@h.example/r.git", "--bogus"], "unrecognized"),
]


def check_refused(proc: subprocess.CompletedProcess[str], expected: str, secrets: tuple[str, ...]) -> str:
    assert proc.returncode != 0, proc
    assert proc.stdout == ""
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, repr(proc.stderr)
    line = proc.stderr[:-1]
    assert line.startswith("artifactfs: error: "), line
    assert expected in line, line
    assert line.isprintable(), repr(line)  # no control character raw, not even a tab
    for secret in secrets:
        assert secret not in line, line
    return line


@pytest.mark.parametrize("bad", BAD_INPUT, ids=str)
def test_bad_input_is_one_line_and_changes_nothing(installation: Installation, bad: Bad) -> None:
    inst = installation
    extra = (inst.allowed, inst.base / "elsewhere")
    before = footprint(inst.afs, *extra)
    proc = inst.run([inst.expand(a) for a in bad.args], stdin=inst.expand(bad.stdin))
    check_refused(proc, inst.expand(bad.expected), bad.secrets)
    assert footprint(inst.afs, *extra) == before
    assert not (inst.base / "pwned").exists()


def test_the_table_is_large_enough() -> None:
    assert len(BAD_INPUT) >= 25


# --- the registry itself unusable --------------------------------------------------------------


def corrupt(afs: Artifactfs) -> None:
    (afs.root / "registry.db").write_bytes(os.urandom(3) + b"this is not a database" * 300)


def truncate(afs: Artifactfs) -> None:
    db = afs.root / "registry.db"
    os.truncate(db, db.stat().st_size // 2)


@pytest.mark.parametrize("damage", [corrupt, truncate], ids=["corrupt", "truncated"])
@pytest.mark.parametrize("args", [["list-repos"], ["status"], ["add-repo", "--name", "new", "--remote", "SAMPLE"]], ids=str)
def test_a_damaged_registry_is_one_line_naming_it(
    with_one_repo: Artifactfs, sample: SampleRepo, damage: Callable[[Artifactfs], None], args: list[str]
) -> None:
    afs = with_one_repo
    damage(afs)
    before = footprint(afs)
    proc = afs.run(*[a.replace("SAMPLE", sample.url) for a in args], check=False)
    line = check_refused(proc, str(afs.root / "registry.db"), ())
    assert "damaged" in line and "restore it from a backup" in line
    assert footprint(afs) == before


def test_a_registry_that_cannot_be_opened_is_one_line_naming_it(with_one_repo: Artifactfs) -> None:
    afs = with_one_repo
    (afs.root / "not-a-file").mkdir()
    afs.env["ARTIFACTFS_DATABASE_URL"] = f"sqlite:///{afs.root / 'not-a-file'}"
    before = footprint(afs)
    line = check_refused(afs.run("list-repos", check=False), "cannot open the registry", ())
    assert str(afs.root / "not-a-file") in line
    assert footprint(afs) == before


def test_failed_add_frees_the_name_and_records_the_attempt(afs: Artifactfs, sample: SampleRepo) -> None:
    afs.fail("add-repo", "--name", "retry", "--remote", sample.url, "--ref", "refs/heads/missing")
    assert os.listdir(afs.root / "git") == [] and os.listdir(afs.root / "locks") == []
    assert footprint(afs)["registry"][0] == []  # type: ignore[index]
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
    # Preparation brought the one blob git status reads in the sample: its .gitmodules.
    assert fields["hydrated_blobs"] == "1" and fields["prepare_error"] == ""


def test_usage_errors_are_one_line_too(afs: Artifactfs) -> None:
    for args in (["add-repo", "--name", "x"], ["frobnicate"], ["status", "--bogus"]):
        proc = afs.run(*args, check=False)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--help" in lines[0], proc.stderr
    assert not (afs.root / "git").exists() or list((afs.root / "git").iterdir()) == []


@pytest.mark.parametrize("value", ["1", "two", "-3"])
def test_a_bad_setting_is_one_line_naming_it_and_how_to_fix_it(afs: Artifactfs, value: str) -> None:
    afs.env["ARTIFACTFS_FETCH_CONCURRENCY"] = value
    line = check_refused(afs.run("list-repos", check=False), "ARTIFACTFS_FETCH_CONCURRENCY", ())
    assert "a count of 2 or more" in line and "fix or unset it" in line
