"""A git credential helper that only ever answers `get`, from one repository's credential file.

git runs a helper as `<helper> get|store|erase` with a request (key=value lines) on stdin. Git's
own store helper obeys `erase`, which git sends after a single 401: one transient 401 during a
lazy fetch would lose the credential for good, and every read of the mount after it would fail.
This helper ignores `store` and `erase`, and answers `get` only for the protocol and host the
credential was given for (a redirect to another host gets nothing).

The credential file is root's (0600), in git-credential-store's format: one line
`protocol://user:password@host`, user and password percent-encoded. Git runs the helper as root
(the mount processes fetch lazily as root), so it is run by path with `python -I`: nothing from
the environment (PYTHONPATH) or the current directory decides what runs, and this module imports
nothing but the standard library.
"""
from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import quote, unquote, urlsplit


@dataclass(frozen=True)
class Credential:
    protocol: str
    host: str  # as git sends it: host[:port], IPv6 in brackets
    username: str
    password: str

    def line(self) -> str:
        return f"{self.protocol}://{quote(self.username, safe='')}:{quote(self.password, safe='')}@{self.host}\n"

    def matches(self, request: dict[str, str]) -> bool:
        if request.get("protocol", "").lower() != self.protocol or request.get("host", "").lower() != self.host.lower():
            return False
        # A request for another user (a URL with a user name in it) is not ours to answer.
        return request.get("username", self.username) == self.username


def helper_command(credential_file: Path) -> str:
    """The value of credential.helper that runs this helper on `credential_file`.

    git hands every helper to the shell, so each word is quoted: a state root may contain
    spaces, quotes or '$'. git appends the operation (get, store, erase) itself.
    """
    words = [sys.executable, "-I", str(Path(__file__).resolve()), str(credential_file)]
    return "!" + " ".join(shlex.quote(word) for word in words)


def write_credential_file(path: Path, credential: Credential) -> None:
    """Write the credential to `path`, 0600, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, credential.line().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_credentials(lines: Iterable[str]) -> list[Credential]:
    found = []
    for line in lines:
        parts = urlsplit(line.strip())
        if parts.scheme and parts.username is not None and parts.hostname:
            host = parts.netloc.rpartition("@")[2]
            found.append(Credential(parts.scheme.lower(), host, unquote(parts.username), unquote(parts.password or "")))
    return found


def read_request(stream: TextIO) -> dict[str, str]:
    request: dict[str, str] = {}
    for line in stream:
        line = line.rstrip("\n")
        if not line:
            break
        key, sep, value = line.partition("=")
        if sep:
            request[key] = value
    return request


def answer(request: dict[str, str], credentials: Iterable[Credential]) -> str:
    for credential in credentials:
        if credential.matches(request):
            return f"username={credential.username}\npassword={credential.password}\n"
    return ""


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: credentials.py CREDENTIAL-FILE get|store|erase", file=sys.stderr)
        return 2
    credential_file, operation = argv
    request = read_request(sys.stdin)  # read it whatever the operation: git writes it in full
    if operation != "get":
        return 0  # store and erase: the file is written by artifactfs alone
    try:
        with open(credential_file, encoding="utf-8") as fh:
            credentials = read_credentials(fh)
    except OSError:
        return 0  # not ours to read (another user's git in the mount): answer nothing
    sys.stdout.write(answer(request, credentials))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
