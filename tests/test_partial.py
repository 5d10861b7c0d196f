"""The partial-clone toolkit: `fsck` classifies what a blobless clone has, may fetch and lost, as git
does; `prefetch` plans what an operation reads and fetches it in one transaction, after which git's
own operation fetches nothing. Real git daemon remotes count the transactions."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from artifactfs.partial.helper import asked_walk, moves_the_tree

from .conftest import Artifactfs
from .gitremote import GitDaemon, SampleRepo, git, make_history_repo

HOT = "src/hot.py"


@pytest.fixture
def history(git_daemon: GitDaemon) -> SampleRepo:
    return make_history_repo(git_daemon.base, "history", commits=60)


@pytest.fixture
def added(afs: Artifactfs, git_daemon: GitDaemon, history: SampleRepo) -> Path:
    """The history repository, added; its git directory. The fetch counter starts after the add."""
    afs.add("hist", git_daemon.url("history.git"))
    git_daemon.reset_count()
    return afs.root / "git" / "hist.git"


def git_out(git_dir: Path, *args: str) -> str:
    return git("--git-dir", git_dir, *args).stdout.decode()


def fsck(afs: Artifactfs, *extra: str) -> tuple[int, dict[str, object]]:
    proc = afs.run("fsck", "--name", "hist", "--json", *extra, check=False)
    return proc.returncode, json.loads(proc.stdout)


def gits_own_view(git_dir: Path) -> tuple[set[str], set[str]]:
    """(present, missing) object ids reachable from every ref, HEAD and the index, by git."""
    out = git_out(git_dir, "rev-list", "--objects", "--missing=print", "--all", "--indexed-objects")
    ids = [line.split()[0] for line in out.splitlines()]
    return {i for i in ids if not i.startswith("?")}, {i[1:] for i in ids if i.startswith("?")}


def test_fsck_classifies_promised_objects_and_holes_as_git_does(afs: Artifactfs, git_daemon: GitDaemon, added: Path) -> None:
    code, report = fsck(afs)
    present, missing = gits_own_view(added)
    assert code == 0, report
    assert report["present"] == len(present) and report["missing_promised"] == len(missing) > 0
    assert report["missing_unpromised"] == 0 and report["holes"] == []
    by_type = report["present_by_type"]
    assert by_type["commit"]["count"] == 60 and by_type["blob"]["count"] == 1  # .gitignore: status reads it
    # A tree made here that names a blob nobody has: a hole, as git fsck says.
    ghost = "1234567890abcdef1234567890abcdef12345678"
    tree = git("--git-dir", added, "mktree", "--missing", input=f"100644 blob {ghost}\tghost.txt\n".encode()).stdout.decode().strip()
    commit = git("--git-dir", added, "commit-tree", "-m", "a hole", tree).stdout.decode().strip()
    git("--git-dir", added, "update-ref", "refs/heads/holey", commit)
    code, report = fsck(afs)
    gits_holes = set(re.findall(r"^missing blob ([0-9a-f]{40})$", git("--git-dir", added, "fsck", "--connectivity-only",
                                                                       check=False).stdout.decode(), re.M))  # fmt: skip
    assert code == 1 and gits_holes == {ghost}
    assert report["holes"] == [{"id": ghost, "type": "blob", "path": "ghost.txt", "referenced_by": tree}]
    assert report["missing_promised"] == len(missing)  # the hole changed nothing else
    text = afs.run("fsck", "--name", "hist", check=False)
    assert text.returncode == 1 and f"hole: blob {ghost} ghost.txt" in text.stdout
    assert "missing and not promised" in text.stderr.strip().splitlines()[-1]
    assert git_daemon.fetch_count() == 0  # looking fetches nothing


def test_fsck_finds_a_corrupt_object(afs: Artifactfs, added: Path) -> None:
    blob = git("--git-dir", added, "hash-object", "-w", "--stdin", input=b"soon to be damaged\n").stdout.decode().strip()
    git("--git-dir", added, "update-ref", "refs/heads/kept", git("--git-dir", added, "commit-tree", "-m", "keep",
        git("--git-dir", added, "mktree", input=f"100644 blob {blob}\tkept.txt\n".encode()).stdout.decode().strip()
        ).stdout.decode().strip())  # fmt: skip
    loose = added / "objects" / blob[:2] / blob[2:]
    loose.chmod(0o644)
    loose.write_bytes(b"not zlib at all")
    code, report = fsck(afs)
    assert code == 1 and report["corrupt"] == 1 and report["corrupt_objects"][0]["id"] == blob


def test_fsck_fetch_missing_brings_the_shown_commit_in_one_transaction(afs: Artifactfs, git_daemon: GitDaemon,
                                                                       history: SampleRepo, added: Path) -> None:  # fmt: skip
    code, report = fsck(afs, "--fetch-missing")
    files = len(git_out(added, "ls-tree", "-r", "HEAD").splitlines())
    assert code == 0 and report["fetched"] == files - 1  # all but .gitignore, which preparation brought
    assert git_daemon.fetch_count() == 1
    at_head = git_out(added, "rev-list", "--objects", "--missing=print", "HEAD^{tree}")
    assert "?" not in at_head
    code, again = fsck(afs, "--fetch-missing")
    assert again["fetched"] == 0 and git_daemon.fetch_count() == 1  # nothing left to fetch: no transaction


def without_fetches(git_daemon: GitDaemon, git_dir: Path, *args: str) -> str:
    """Run git on the clone; it must not fetch (the prefetch brought what it reads)."""
    before = git_daemon.fetch_count()
    out = git_out(git_dir, *args)
    assert git_daemon.fetch_count() == before, f"git {' '.join(args)} fetched"
    return out


def test_prefetch_history_makes_blame_and_log_p_local(afs: Artifactfs, git_daemon: GitDaemon,
                                                      history: SampleRepo, added: Path) -> None:  # fmt: skip
    plan = json.loads(afs.run("prefetch", "--name", "hist", "--history", HOT, "--max-count", "20", "--dry-run",
                              "--json").stdout)  # fmt: skip
    assert plan["dry_run"] and plan["fetched"] == 0 and plan["transactions"] == 1
    assert plan["needed"] == 21 and plan["missing"] == 21  # 20 changes and the version before the oldest
    assert git_daemon.fetch_count() == 0
    out = afs.run("prefetch", "--name", "hist", "--history", HOT, "--max-count", "20").stdout
    assert "fetched 21 objects in 1 transaction(s)" in out and git_daemon.fetch_count() == 1
    full = git("log", "-p", "-20", "--format=%H", "--", HOT, cwd=history.bare).stdout
    assert without_fetches(git_daemon, added, "log", "-p", "-20", "--format=%H", "HEAD", "--", HOT) == full.decode()
    afs.run("prefetch", "--name", "hist", "--history", HOT)
    assert git_daemon.fetch_count() == 2
    blame = git("blame", "--porcelain", "HEAD", "--", HOT, cwd=history.bare).stdout.decode()
    assert without_fetches(git_daemon, added, "blame", "--porcelain", "HEAD", "--", HOT) == blame


def test_prefetch_diff_paths_and_rev_plan_locally_and_fetch_once(afs: Artifactfs, git_daemon: GitDaemon,
                                                                 history: SampleRepo, added: Path) -> None:  # fmt: skip
    old = history.history[-50]
    out = afs.run("prefetch", "--name", "hist", "--diff", old, "HEAD").stdout
    assert "in 1 transaction(s)" in out and git_daemon.fetch_count() == 1
    expected = git("diff", old, "HEAD", cwd=history.bare).stdout.decode()
    assert without_fetches(git_daemon, added, "diff", old, "HEAD") == expected

    plan = json.loads(afs.run("prefetch", "--name", "hist", "--paths", "docs", "README.*", "--json").stdout)
    notes = [p for p in history.files if p.startswith("docs/")]
    assert plan["needed"] == len(notes) + 1 and git_daemon.fetch_count() == 2
    without_fetches(git_daemon, added, "cat-file", "-p", "HEAD:README.md")

    plan = json.loads(afs.run("prefetch", "--name", "hist", "--rev", history.history[-10], "--json").stdout)
    assert plan["needed"] == len(git_out(added, "ls-tree", "-r", history.history[-10]).splitlines())
    assert git_daemon.fetch_count() == 3
    without_fetches(git_daemon, added, "archive", "--format=tar", "-o", "/dev/null", history.history[-10])


def test_prefetch_and_fsck_refuse_bad_input_in_one_line(afs: Artifactfs, added: Path) -> None:
    assert "exactly one planner" in afs.fail("prefetch", "--name", "hist")
    assert "exactly one planner" in afs.fail("prefetch", "--name", "hist", "--rev", "HEAD", "--paths", "x")
    assert "--max-count goes with --history" in afs.fail("prefetch", "--name", "hist", "--rev", "HEAD", "--max-count", "3")
    assert "names no commit" in afs.fail("prefetch", "--name", "hist", "--rev", "no-such-branch")
    assert "no commit from" in afs.fail("prefetch", "--name", "hist", "--history", "never/was.txt")
    assert "no repository" in afs.fail("fsck", "--name", "absent").lower()
    afs.run("add-repo", "--async", "--name", "waiting", "--remote", "file:///nowhere.git")
    assert "has no git directory yet" in afs.fail("prefetch", "--name", "waiting", "--rev", "HEAD")


def lazy_fetches(git_daemon: GitDaemon, cwd: Path, *args: str) -> tuple[str, int]:
    """git's output in `cwd`, and how many fetch transactions it cost."""
    before = git_daemon.fetch_count()
    out = git(*args, cwd=cwd).stdout.decode()
    return out, git_daemon.fetch_count() - before


def test_git_in_the_mount_fetches_a_history_walk_in_a_few_transactions(afs: Artifactfs, git_daemon: GitDaemon,
                                                                       history: SampleRepo) -> None:  # fmt: skip
    """blame, log -p and a diff across history, each in a fresh mount: git's lazy fetch goes
    through the helper, which widens it; a plain blobless clone pays one transaction per version."""
    operations = {
        "blame": ("blame", "--porcelain", "HEAD", "--", HOT),
        "logp": ("log", "-p", "-20"),
        "diff": ("diff", history.history[-50], "HEAD"),
    }
    for name in operations:
        afs.add(name, git_daemon.url("history.git"))
    afs.start_daemon()
    for name, args in operations.items():
        mnt = afs.wait_mounted(name)
        git_daemon.reset_count()
        out, transactions = lazy_fetches(git_daemon, mnt, *args)
        assert out == git(*args, cwd=history.bare).stdout.decode(), name
        assert transactions <= 3, (name, transactions)
    plain = afs.root.parent / "plain"
    git("clone", "-q", "--bare", "--filter=blob:none", git_daemon.url("history.git"), str(plain))
    _, transactions = lazy_fetches(git_daemon, plain, *operations["blame"])
    assert transactions == 60  # one per version: what the helper spares


@pytest.mark.parametrize(("argv", "limit"), [
    ("git -c core.abbrev=12 log -p -20", 20), ("git log -n 5", 5), ("git log -n7 -p", 7),
    ("git -C /src show -2", 2), ("git log --max-count=3 --max-count 9", 9),  # the last one, as in git
    ("git log -p", None), ("git blame -20 f", None), ("git log -p -- -20", None), ("git log -0", None),
])  # fmt: skip
def test_the_asking_commands_limit_is_read_as_git_reads_it(argv: str, limit: int | None) -> None:
    walk = asked_walk(argv.split())
    assert (walk.limit if walk is not None else None) == limit


@pytest.mark.parametrize(("argv", "options_only"), [
    ("git log -p -20", True), ("git -c core.abbrev=12 log -n 5 --stat", True),
    ("git log -p -5 -- src/hot.py", False), ("git log -3 main", False), ("git log -p -5 src", False),
])  # fmt: skip
def test_a_log_that_names_no_path_or_revision_is_told_apart(argv: str, options_only: bool) -> None:
    """Such a log walks from HEAD through every path: older versions of the paths it asks for
    first are beyond its limit, and not fetched."""
    walk = asked_walk(argv.split())
    assert walk is not None and walk.options_only is options_only
    assert asked_walk("git blame -L 1,5 f".split()) is None


@pytest.mark.parametrize(("argv", "moves"), [
    ("git checkout other", True), ("git -c a=b checkout -q -", True), ("git checkout -b topic origin/main", True),
    ("git switch -c topic", True), ("git switch other", True), ("git reset --hard HEAD~1", True),
    ("git reset -q --hard", True), ("git merge --ff-only origin/main", True), ("git rebase main", True),
    ("git cherry-pick abc123", True), ("git pull --ff-only", True),
    ("git checkout src/app.py", False), ("git checkout other src/app.py", False), ("git checkout -- other", False),
    ("git checkout other -- src", False), ("git checkout --pathspec-from-file=list other", False),
    ("git reset HEAD~1", False), ("git reset --hard HEAD -- src", False), ("git restore src", False),
    ("git commit -m x", False), ("git log -p", False), ("git", False),
])  # fmt: skip
def test_a_command_that_moves_the_index_to_another_tree_is_told_from_one_that_writes_paths(argv: str, moves: bool) -> None:
    """Such a command asks for every missing blob of the index after the files it writes: the
    helper fetches both at once. A checkout of paths must not fetch the rest of the tree."""
    commits = {"other", "@{-1}", "origin/main", "main"}
    assert moves_the_tree(argv.split(), commits.__contains__) is moves


def test_a_limited_log_fetches_the_changes_of_its_commits_alone(git_daemon: GitDaemon, history: SampleRepo,
                                                                added: Path) -> None:  # fmt: skip
    """`log -p -5` reads five commits' changes: the helper, told so by the asking git's command
    line, widens to those and not to the 64 commits a walk of unknown length gets."""
    args = ("log", "-p", "-5", "--format=%H")
    out, transactions = lazy_fetches(git_daemon, added, *args)
    assert out == git(*args, cwd=history.bare).stdout.decode()
    assert transactions == 1
    raw = git_out(history.bare, "log", "-5", "--raw", "--no-abbrev", "--format=")
    both_sides = {oid for line in raw.splitlines() for oid in line.split()[2:4] if oid.strip("0")}
    asked, fetched, history_first = (added / "artifactfs-lazy-fetches").read_text().split()
    assert (int(fetched), history_first) == (len(both_sides), "0"), (asked, fetched)


def test_a_broken_helper_costs_speed_not_results(afs: Artifactfs, git_daemon: GitDaemon, history: SampleRepo,
                                                 added: Path) -> None:  # fmt: skip
    config = git_out(added, "config", "--local", "--name-only", "--get-regexp", r"^remote\..*\.promisor$").split()
    assert config == ["remote.artifactfs.promisor", "remote.origin.promisor"]  # the helper is asked first
    assert git_out(added, "config", "remote.origin.partialclonefilter").strip() == "blob:none"
    assert list((added / "objects" / "pack").glob("*.pack")) and all(
        p.with_suffix(".promisor").exists() for p in (added / "objects" / "pack").glob("*.pack"))  # fmt: skip
    git("--git-dir", added, "config", "alias.remote-artifactfs", "!false")
    out, transactions = lazy_fetches(git_daemon, added, "log", "-p", "-3", "--format=%H")
    assert out == git("log", "-p", "-3", "--format=%H", cwd=history.bare).stdout.decode()
    assert transactions == 3  # git went on to origin, one commit at a time
    assert all(p.with_suffix(".promisor").exists() for p in (added / "objects" / "pack").glob("*.pack"))
