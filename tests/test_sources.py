"""Filters and verified sources: the promisor state of a clone says exactly which filter it was
made with (none, when the remote refused filters: a full clone, recorded and shown); a required
commit, a depth and periodic refreshes, against real remotes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from artifactfs.config import load_settings
from artifactfs.gitstore import git_env
from artifactfs.model import InvalidInput, RefreshOutcome
from artifactfs.prepare import fetch_head
from artifactfs.refresh import refresh_repo
from artifactfs.registry import open_registry
from artifactfs.remotes import validate_commit_id, validate_depth, validate_refresh

from .conftest import Artifactfs, wait_until
from .gitremote import GitDaemon, SampleRepo, add_commit, git, make_sample_repo


def config(git_dir: Path, key: str) -> str | None:
    proc = git("--git-dir", git_dir, "config", "--local", "--get", key, check=False)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def packs(git_dir: Path) -> list[Path]:
    found = sorted((git_dir / "objects" / "pack").glob("pack-*.pack"))
    assert found, f"no pack in {git_dir}"
    return found


def events(afs: Artifactfs, name: str) -> list[dict[str, object]]:
    found: list[dict[str, object]] = json.loads(afs.run("events", "--name", name, "--json").stdout)
    return found


def test_validators_name_what_is_wrong() -> None:
    assert validate_commit_id(" " + "A" * 40 + " ") == "a" * 40 and validate_commit_id("b" * 64) == "b" * 64
    for bad in ("abc123", "g" * 40, "a" * 41, ""):
        with pytest.raises(InvalidInput, match="full commit id"):
            validate_commit_id(bad)
    assert validate_depth("3") == 3
    for bad in ("0", "-1", "x", "1e3", "1000001"):
        with pytest.raises(InvalidInput, match="--depth"):
            validate_depth(bad)
    assert [validate_refresh(t) for t in ("never", "30", "90s", "5m", "1h", "1d")] == [None, 30, 90, 300, 3600, 86400]
    for bad in ("0", "5x", "-1m", "", "1.5m"):
        with pytest.raises(InvalidInput, match="--refresh"):
            validate_refresh(bad)


@pytest.mark.parametrize(("blob_filter", "recorded"), [("blob:none", "blob:none"), ("blob:limit=1k", "blob:limit=1024")])
def test_a_filtered_clone_is_a_promisor_and_every_later_pack_a_promisor_pack(
    afs: Artifactfs, tmp_path: Path, blob_filter: str, recorded: str
) -> None:
    remote = make_sample_repo(tmp_path / "remotes")
    afs.add("filtered", remote.url, "--filter", blob_filter)
    git_dir = afs.root / "git" / "filtered.git"
    assert config(git_dir, "remote.origin.promisor") == "true"
    assert config(git_dir, "remote.origin.partialclonefilter") == recorded  # as git spells it
    assert afs.status("filtered")["clone"] == "partial"
    add_commit(remote, {"NEWS.md": b"news\n" * 400}, "news")  # 2400 bytes: over the limit too
    assert fetch_head(git_dir, remote.url, "refs/heads/main", git_env()) == remote.head  # a prepare's fetch
    afs.run("prefetch", "--name", "filtered", "--rev", remote.head)  # and the toolkit's own
    assert all(pack.with_suffix(".promisor").is_file() for pack in packs(git_dir)) and len(packs(git_dir)) >= 3


def test_a_remote_without_filters_gives_a_full_clone_recorded_and_shown(afs: Artifactfs, tmp_path: Path) -> None:
    remote = make_sample_repo(tmp_path / "remotes")
    git("--git-dir", remote.bare, "config", "uploadpack.allowFilter", "false")
    afs.add("full", remote.url)
    git_dir = afs.root / "git" / "full.git"
    row = afs.status("full")
    assert row["clone"] == "full (the remote does not support filters)" and row["head"] == remote.head
    ready = [e for e in events(afs, "full") if e["type"] == "ready"]
    assert ready[-1]["payload"] == {"head": remote.head, "filter_fallback": True}
    # No promisor remote, no filter, no promisor pack: git takes nothing missing for promised.
    assert config(git_dir, "remote.origin.promisor") is None and config(git_dir, "remote.origin.partialclonefilter") is None
    assert config(git_dir, "remote.artifactfs.url") is None  # no lazy-fetch helper for a full clone
    assert not any(pack.with_suffix(".promisor").exists() for pack in packs(git_dir))
    assert git("--git-dir", git_dir, "cat-file", "-p", "HEAD:README.md").stdout == remote.files["README.md"]
    fsck = json.loads(afs.run("fsck", "--name", "full", "--json").stdout)
    assert fsck["missing_promised"] == 0 and fsck["missing_unpromised"] == 0
    add_commit(remote, {"NEWS.md": b"news\n"}, "news")  # a prepare's fetch asks for no filter the remote refuses
    assert fetch_head(git_dir, remote.url, "refs/heads/main", git_env()) == remote.head
    assert not any(pack.with_suffix(".promisor").exists() for pack in packs(git_dir))


def test_require_commit_verifies_the_source(afs: Artifactfs, sample: SampleRepo) -> None:
    first = sample.history[0]
    afs.add("verified", sample.url, "--require-commit", first)
    assert afs.status("verified")["require_commit"] == first
    stranger = "0123456789abcdef0123456789abcdef01234567"
    line = afs.fail("add-repo", "--name", "unverified", "--remote", sample.url, "--require-commit", stranger)
    assert f"does not contain the required commit {stranger}" in line and "\n" not in line.strip()
    assert "unverified" not in afs.run("list-repos").stdout  # a blocking add that failed leaves no registration
    assert not (afs.root / "git" / "unverified.git").exists()
    assert "full commit id" in afs.fail("add-repo", "--name", "short", "--remote", sample.url, "--require-commit", first[:12])


def test_depth_makes_a_shallow_blobless_clone_and_bounds_the_required_commit(afs: Artifactfs, git_daemon: GitDaemon) -> None:
    remote = make_sample_repo(git_daemon.base, "deep")
    add_commit(remote, {"NEWS.md": b"news\n"}, "news")
    afs.add("shallow", git_daemon.url("deep.git"), "--depth", "1")
    git_dir = afs.root / "git" / "shallow.git"
    assert (git_dir / "shallow").read_text().split() == [remote.head]
    assert git("--git-dir", git_dir, "rev-list", "--count", "HEAD").stdout.strip() == b"1"
    assert config(git_dir, "remote.origin.promisor") == "true"  # blobless too
    assert afs.status("shallow")["clone"] == "partial, shallow (depth 1)"
    line = afs.fail("add-repo", "--name", "deeper", "--remote", git_daemon.url("deep.git"), "--depth", "2",
                    "--require-commit", remote.history[0])  # fmt: skip
    assert "within its 2 newest commits (--depth 2)" in line
    assert "--depth does not go with --prepared-gitdir" in afs.fail(
        "add-repo", "--name", "p", "--remote", remote.url, "--prepared-gitdir", "--git-dir", str(git_dir),
        "--fetch-ref", "refs/heads/main", "--depth", "1")  # fmt: skip


def test_refresh_moves_a_clean_mount_forward_and_keeps_one_with_changes(afs: Artifactfs, tmp_path: Path) -> None:
    remote = make_sample_repo(tmp_path / "remotes")
    afs.up()
    afs.run("add-repo", "--async", "--name", "live", "--remote", remote.url, "--refresh", "1s")
    mnt = afs.mount_path("live")
    afs.wait_state("live", "mounted")
    assert afs.status("live")["refresh"] == "1s"
    newer = add_commit(remote, {"NEWS.md": b"news\n"}, "news")
    wait_until(lambda: afs.status("live")["head"] == newer, 60, what="a refresh to show the new commit")
    assert (mnt / "NEWS.md").read_bytes() == b"news\n"
    assert git("-C", mnt, "rev-parse", "HEAD").stdout.decode().strip() == newer
    assert git("-C", mnt, "status", "--porcelain").stdout == b""
    moved = [e["payload"] for e in events(afs, "live") if e["type"] == "refreshed" and e["payload"]["outcome"] == "moved"]
    assert moved == [{"outcome": "moved", "head": newer, "previous": remote.history[-2]}]

    (mnt / "mine.txt").write_bytes(b"work in progress\n")  # a change of the working tree's own
    newest = add_commit(remote, {"NEWS.md": b"more news\n"}, "more news")
    wait_until(lambda: afs.status("live")["refresh_outcome"] == "kept", 60, what="a refresh to keep the commit")
    row = afs.status("live")
    assert row["head"] == newer and row["state"] == "mounted"
    kept = [e["payload"] for e in events(afs, "live") if e["type"] == "refreshed" and e["payload"]["outcome"] == "kept"]
    assert kept[0]["detail"] == f"{newest} not shown: 1 changed path(s) in the working tree"
    assert (mnt / "NEWS.md").read_bytes() == b"news\n" and (mnt / "mine.txt").read_bytes() == b"work in progress\n"

    (mnt / "mine.txt").unlink()  # clean again: the next refresh moves on
    wait_until(lambda: afs.status("live")["head"] == newest, 60, what="the refresh after the change is gone")
    assert (mnt / "NEWS.md").read_bytes() == b"more news\n"
    git_dir = afs.root / "git" / "live.git"
    assert all(pack.with_suffix(".promisor").is_file() for pack in packs(git_dir))  # the refreshes' packs too


def test_a_refresh_finishes_an_interrupted_one_and_never_overwrites_git_in_the_mount(
    afs: Artifactfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """refresh_repo itself, in this process, on a registered repository (no mount: its overlay is
    empty): the move of a refresh stopped before its event, a commit made in the mount, and an
    index git holds locked."""
    remote = make_sample_repo(tmp_path / "remotes")
    afs.add("r", remote.url, "--refresh", "1h")
    for key, value in afs.env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    registry = open_registry(settings.database_url, host=settings.host)
    git_dir = afs.root / "git" / "r.git"

    def head() -> str:
        return git("--git-dir", git_dir, "rev-parse", "HEAD").stdout.decode().strip()

    try:
        first = remote.head
        second = add_commit(remote, {"NEWS.md": b"news\n"}, "news")
        git("--git-dir", git_dir, "fetch", "-q", "origin", "main")
        # A refresh moved HEAD and was killed before its event: the next one finishes it.
        git("--git-dir", git_dir, "update-ref", "-m", "artifactfs: prepare", "HEAD", second, first)
        result = refresh_repo(settings, registry, "r", "refresh:test:r:1")
        assert result is not None and result.outcome is RefreshOutcome.MOVED and result.head == second
        assert registry.require("r").head == second == head()

        # A commit made in the mount: kept, never overwritten.
        tree = git("--git-dir", git_dir, "rev-parse", "HEAD^{tree}").stdout.decode().strip()
        mine = git("--git-dir", git_dir, "commit-tree", "-p", second, "-m", "mine", tree).stdout.decode().strip()
        git("--git-dir", git_dir, "update-ref", "-m", "commit: mine", "HEAD", mine, second)
        third = add_commit(remote, {"NEWS.md": b"more news\n"}, "more news")
        result = refresh_repo(settings, registry, "r", "refresh:test:r:2")
        assert result is not None and result.outcome is RefreshOutcome.KEPT and "git moved HEAD" in result.detail
        assert head() == mine and registry.require("r").head == second

        # The index held by git in the mount: HEAD goes back where it was, and the refresh failed.
        git("--git-dir", git_dir, "update-ref", "-m", "reset: moving to HEAD~", "HEAD", second, mine)
        git("--git-dir", git_dir, "update-ref", "-m", "artifactfs: prepare", "HEAD", second, second)
        (git_dir / "index.lock").write_bytes(b"")
        result = refresh_repo(settings, registry, "r", "refresh:test:r:3")
        assert result is not None and result.outcome is RefreshOutcome.FAILED and "index.lock" in result.detail
        assert head() == second and registry.require("r").head == second
        (git_dir / "index.lock").unlink()
        result = refresh_repo(settings, registry, "r", "refresh:test:r:4")
        assert result is not None and result.outcome is RefreshOutcome.MOVED and head() == third
        outcomes = [e["payload"]["outcome"] for e in events(afs, "r") if e["type"] == "refreshed"]
        assert outcomes == ["moved", "kept", "failed", "moved"]
    finally:
        registry.close()
