"""Unit tests of small pieces of logic: git's environment, URL parsing and redaction."""
from __future__ import annotations

from pathlib import Path

import pytest

from artifactfs.gitstore import classify_git_error, git_env
from artifactfs.model import InvalidInput, RefNotFound, RemoteUnreachable
from artifactfs.remotes import parse_remote, redact, validate_name, validate_ref


def test_git_never_prompts_and_keeps_a_configured_ssh_command() -> None:
    env = git_env(base={"PATH": "/usr/bin"})
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_SSH_COMMAND"] == "ssh -o BatchMode=yes"
    mine = git_env(base={"GIT_SSH_COMMAND": "ssh -i /keys/deploy"})
    assert mine["GIT_SSH_COMMAND"] == "ssh -i /keys/deploy"


def test_credentials_come_from_a_store_helper_file_not_the_environment(tmp_path: Path) -> None:
    env = git_env(tmp_path / "cred", base={})
    assert env["GIT_CONFIG_VALUE_0"] == ""  # resets the helper list
    assert env["GIT_CONFIG_VALUE_1"] == f"store --file={tmp_path / 'cred'}"


@pytest.mark.parametrize(
    "raw, url, user, password",
    [
        ("https://alice:t0k@host.example/org/r.git", "https://host.example/org/r.git", "alice", "t0k"),
        ("https://t0k@host.example/r.git", "https://host.example/r.git", "t0k", ""),
        ("ssh://git@host.example/r.git", "ssh://git@host.example/r.git", None, None),
        ("git@host.example:org/r.git", "git@host.example:org/r.git", None, None),
        ("git://127.0.0.1:9418/r.git", "git://127.0.0.1:9418/r.git", None, None),
    ],
)
def test_parse_remote_splits_credentials_off(raw: str, url: str, user: str | None, password: str | None) -> None:
    remote = parse_remote(raw)
    assert (remote.url, remote.username, remote.password) == (url, user, password)


@pytest.mark.parametrize("raw", ["https://h/r?x=1", "https://h/r#frag", "ftp://h/r", "relative/path", "https:///r", ""])
def test_parse_remote_refuses(raw: str) -> None:
    with pytest.raises(InvalidInput):
        parse_remote(raw)


def test_redact_hides_userinfo_of_http_urls_only() -> None:
    text = "fatal: unable to access 'https://alice:t0k@h/r/': 403 and https://t0k@h/x and ssh://git@h/r"
    assert redact(text) == "fatal: unable to access 'https://***@h/r/': 403 and https://***@h/x and ssh://git@h/r"


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "", "-x", ".hidden", "x" * 101])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidInput):
        validate_name(name)


def test_refs() -> None:
    assert validate_ref("main") == "refs/heads/main"
    assert validate_ref("refs/tags/v1") == "refs/tags/v1"
    for bad in ("a..b", "-x", "a b", "refs/heads/"):
        with pytest.raises(InvalidInput):
            validate_ref(bad)


def test_classify_git_errors() -> None:
    missing = classify_git_error(["clone"], b"warning: x\nfatal: Remote branch nope not found in upstream origin\n")
    assert isinstance(missing, RefNotFound)
    reset = classify_git_error(["fetch"], b"fatal: read error: Connection reset by peer\nfatal: early EOF\n")
    assert reset.transient
    gone = classify_git_error(["clone"], b"fatal: '/x' does not appear to be a git repository\nfatal: Could not read from remote repository.\n")
    assert isinstance(gone, RemoteUnreachable) and not gone.transient
    assert str(gone) == "'/x' does not appear to be a git repository"
