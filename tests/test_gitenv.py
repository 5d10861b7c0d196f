"""Unit tests of small pieces of logic: git's environment, URL parsing and redaction."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import pytest

from artifactfs.cli import unprintable_argument
from artifactfs.credentials import helper_command
from artifactfs.gitstore import classify_git_error, configure_credential_helper, git_env, store_credentials
from artifactfs.locks import repo_lock
from artifactfs.model import InvalidInput, RefNotFound, RemoteUnreachable
from artifactfs.remotes import parse_remote, redact, validate_name, validate_ref


def test_git_never_prompts_and_keeps_a_configured_ssh_command() -> None:
    env = git_env(base={"PATH": "/usr/bin"})
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_SSH_COMMAND"] == "ssh -o BatchMode=yes"
    mine = git_env(base={"GIT_SSH_COMMAND": "ssh -i /keys/deploy"})
    assert mine["GIT_SSH_COMMAND"] == "ssh -i /keys/deploy"


def test_credentials_come_from_our_helper_not_the_environment(tmp_path: Path) -> None:
    env = git_env(tmp_path / "cred", base={})
    assert env["GIT_CONFIG_VALUE_0"] == ""  # resets the helper list
    assert env["GIT_CONFIG_VALUE_1"] == helper_command(tmp_path / "cred")
    assert "GIT_CONFIG_COUNT" not in git_env(base={})  # no credentials: root's own helpers answer


def credential_fill(git_dir: Path | None, protocol: str, host: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """What git itself gets from the configured helpers for protocol://host."""
    args = ["git"] + ([f"--git-dir={git_dir}"] if git_dir else []) + ["credential", "fill"]
    proc = subprocess.run(args, input=f"protocol={protocol}\nhost={host}\n\n", capture_output=True, text=True,
                          env=env or git_env(), check=True)  # fmt: skip
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_helper_answers_git_through_a_path_with_spaces_and_quotes(tmp_path: Path) -> None:
    root = tmp_path / "state root's $HOME; `x`"
    credential_file = root / "credentials" / "private"
    store_credentials(parse_remote("http://al%20ice:p%40ss=w%3Ard@127.0.0.1:8080/private.git"), credential_file)
    assert credential_file.stat().st_mode & 0o777 == 0o600
    git_dir = root / "private.git"
    subprocess.run(["git", "init", "-q", "--bare", str(git_dir)], check=True)
    configure_credential_helper(git_dir, credential_file)

    # The clone's config (lazy fetches) and the environment (the clone itself) both reach it.
    for answer in (credential_fill(git_dir, "http", "127.0.0.1:8080"),
                   credential_fill(None, "http", "127.0.0.1:8080", git_env(credential_file))):  # fmt: skip
        assert (answer["username"], answer["password"]) == ("al ice", "p@ss=w:rd")
    # Another host, port or protocol (a redirect, say) gets nothing.
    for protocol, host in (("http", "127.0.0.1:9999"), ("https", "127.0.0.1:8080"), ("http", "evil.example")):
        assert credential_fill(git_dir, protocol, host).get("password", "") == ""
    # What git does after a 401: erase. The helper ignores it, and the next get still answers.
    subprocess.run(["git", f"--git-dir={git_dir}", "credential", "reject"], env=git_env(), check=True,
                   input="protocol=http\nhost=127.0.0.1:8080\nusername=al ice\npassword=p@ss=w:rd\n\n", text=True)  # fmt: skip
    assert credential_fill(git_dir, "http", "127.0.0.1:8080")["password"] == "p@ss=w:rd"


def test_a_clone_of_an_older_version_is_moved_off_the_store_helper(tmp_path: Path) -> None:
    git_dir = tmp_path / "old.git"
    subprocess.run(["git", "init", "-q", "--bare", str(git_dir)], check=True)
    subprocess.run(["git", f"--git-dir={git_dir}", "config", "--add", "credential.helper", "store --file=/x"], check=True)
    configure_credential_helper(git_dir, tmp_path / "cred")
    helpers = subprocess.run(["git", f"--git-dir={git_dir}", "config", "--get-all", "credential.helper"],
                             capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    assert helpers == ["", helper_command(tmp_path / "cred")]


@pytest.mark.parametrize(
    "raw, url, user, password",
    [
        ("https://alice:t0k@host.example/org/r.git", "https://host.example/org/r.git", "alice", "t0k"),
        ("https://t0k@host.example/r.git", "https://host.example/r.git", "t0k", ""),
        ("ssh://git@host.example/r.git", "ssh://git@host.example/r.git", None, None),
        ("git@host.example:org/r.git", "git@host.example:org/r.git", None, None),
        ("git://127.0.0.1:9418/r.git", "git://127.0.0.1:9418/r.git", None, None),
        # user and password are percent-decoded, as in any URL
        ("https://al%40corp:p%40ss%2Fw%25@h.example/r.git", "https://h.example/r.git", "al@corp", "p@ss/w%"),
        ("https://u:p@[::1]:8443/r.git", "https://[::1]:8443/r.git", "u", "p"),
        ("HTTPS://Host.Example/r.git", "https://host.example/r.git", None, None),
    ],
)
def test_parse_remote_splits_credentials_off(raw: str, url: str, user: str | None, password: str | None) -> None:
    remote = parse_remote(raw)
    assert (remote.url, remote.username, remote.password) == (url, user, password)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("https://h/r?x=1", "query or fragment"),
        ("https://h/r#frag", "query or fragment"),
        ("ftp://h/r", "unsupported remote scheme"),
        ("relative/path", "invalid remote"),
        ("https:///r", "names no host"),
        ("", "invalid remote"),
        # git's transport helpers run programs; '-' makes an option of it
        ("ext::sh -c touch% /tmp/pwned", "remote helper syntax ext::"),
        ("fd::17", "remote helper syntax fd::"),
        ("transport+x.y::whatever", "remote helper syntax"),
        ("-uhttps://h/r.git", "begins with '-'"),
        ("--upload-pack=touch /tmp/pwned", "begins with '-'"),
        ("-oProxyCommand=x:path", "begins with '-'"),
        ("git@-oProxyCommand=x:path", "invalid remote"),
        # ports and hosts that are not
        ("https://h:99999/r.git", "invalid port"),
        ("https://h:abc/r.git", "invalid port"),
        ("https://h:0/r.git", "invalid port"),
        ("https://[::1/r.git", "unbalanced '['"),
        ("https://[zz::1]/r.git", "no IPv6 address"),
        ("https://h_o st/r.git", "invalid host"),
        ("file://host/srv/r.git", "names a host"),
        ("git://me@h/r.git", "git:// does not take"),
        ("https://h.example", "names no repository"),
        # control characters, even percent-encoded ones in the credentials
        ("https://h/r.git\n", "control character \\n"),
        ("https://u:a%0Ab@h/r.git", "control character \\n"),
    ],
)
def test_parse_remote_refuses(raw: str, expected: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_remote(raw)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "raw",
    ["alice:SECRET-TOK@host.example:org/r.git", ":SECRET-TOK@host.example:r.git", "ssh://git:SECRET-TOK@h/r.git",
     "https://u:SECRET-TOK@h:99999/r.git", "https://u:SECRET-TOK@[::1/r.git", "ftp://u:SECRET-TOK@h/r",
     "https://h/r.git?access_token=SECRET-TOK"],
)  # fmt: skip
def test_refusals_never_show_the_secret(raw: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_remote(raw)
    assert "SECRET-TOK" not in str(caught.value)


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
    for bad in ("a..b", "-x", "a b", "refs/heads/", "main.lock", "ma@{1}", "@", "refs/heads//x", "a/.b",
                "x.", "a\x7fb", "a\nb", "ref:x"):
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


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["status", "--name", "x\n"], "argument 3 (the value of --name) contains the control character \\n (U+000A)"),
        (["add-repo", "--remote=https://u:tok\x1b@h/r"], "argument 2 (the value of --remote) contains the control character \\x1b"),
        (["status\u202e"], "argument 1 (it) contains the control character \\u202e"),
        (["status", "--name", "\udcff"], "\\udcff"),
    ],
)
def test_control_characters_in_arguments_are_named_escaped(argv: list[str], expected: str) -> None:
    problem = unprintable_argument(argv)
    assert problem is not None and expected in problem, problem
    assert "tok" not in problem and not any(c in problem for c in "\n\x1b\u202e")
    assert unprintable_argument(["add-repo", "--name", "ok", "--remote", "https://h/r.git"]) is None


def _count_under_lock(lock_file: Path, counter: Path, rounds: int) -> None:
    for _ in range(rounds):
        with repo_lock(lock_file) as held:
            assert held
            value = int(counter.read_text())  # read, pause, write: lost updates if two hold it
            time.sleep(0.001)
            counter.write_text(str(value + 1))


def test_lock_files_are_removed_and_never_let_two_holders_in(tmp_path: Path) -> None:
    lock_file, counter = tmp_path / "locks" / "r.lock", tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_count_under_lock, args=(lock_file, counter, 60)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    assert int(counter.read_text()) == 4 * 60  # every increment happened under the lock alone
    assert not lock_file.exists()  # nothing piles up in <root>/locks


def test_a_lock_taken_elsewhere_is_reported_and_left_alone(tmp_path: Path) -> None:
    lock_file = tmp_path / "r.lock"
    with repo_lock(lock_file) as held:
        assert held
        with repo_lock(lock_file, blocking=False) as second:
            assert not second
        assert lock_file.exists()  # the loser does not remove the holder's file
    assert not lock_file.exists()
