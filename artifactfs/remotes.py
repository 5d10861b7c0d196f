"""Names, remote URLs and refs as users type them: validation, credential splitting, redaction.

Credentials typed inline (`https://user:token@host/repo`) are split off here and travel only in
memory and through git's credential-helper protocol (see gitstore.credential_env); what is stored,
logged or shown is the URL without them, and error text is passed through `redact` first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .model import InvalidInput

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # used with fullmatch: "$" would allow a final newline
SCHEMES = ("file", "git", "http", "https", "ssh")
SCP_LIKE_RE = re.compile(r"^(?P<user>[A-Za-z0-9._-]+@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/].*|/.*)$")
CREDENTIALS_IN_URL_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
SECRET_USERINFO_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class Remote:
    url: str  # what is stored and shown: never holds a password or token
    username: str | None = None
    password: str | None = None

    @property
    def has_credentials(self) -> bool:
        return self.password is not None


def validate_name(name: str) -> str:
    if not isinstance(name, str) or ".." in name or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid repository name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/' and no '..')"
        )
    return name


def validate_ref(ref: str) -> str:
    """Accept `refs/heads/main`, `refs/tags/v1` or a short branch name; return the full ref."""
    if not ref or ref.startswith("-") or any(c in ref for c in " ~^:?*[\\") or ".." in ref or ref.endswith("/"):
        raise InvalidInput(f"invalid ref {ref!r}: give a branch or tag such as refs/heads/main")
    if ref.startswith("refs/"):
        return ref
    return f"refs/heads/{ref}"


def parse_remote(raw: str) -> Remote:
    """Check a remote as typed and split off inline credentials."""
    if not raw or raw != raw.strip():
        raise InvalidInput(f"invalid remote {raw!r}: give a URL such as https://host/org/repo.git")
    if raw.startswith("/"):
        if not Path(raw).exists():
            raise InvalidInput(f"remote path {raw} does not exist")
        return Remote(url="file://" + raw)
    if "://" not in raw:
        if SCP_LIKE_RE.match(raw):
            return Remote(url=raw)  # user@host:path, git's scp-like ssh syntax
        raise InvalidInput(
            f"invalid remote {raw!r}: use file://, git://, http(s):// or ssh:// URL, or user@host:path"
        )
    parts = urlsplit(raw)
    if parts.scheme not in SCHEMES:
        raise InvalidInput(f"unsupported remote scheme {parts.scheme!r} in {redact(raw)}: use one of {', '.join(SCHEMES)}")
    if parts.query or parts.fragment or raw.endswith(("?", "#")):
        raise InvalidInput(f"remote URL {redact(raw)} has a query or fragment: remove everything from '?' or '#'")
    if parts.scheme != "file" and not parts.hostname:
        raise InvalidInput(f"remote URL {redact(raw)} names no host")
    if parts.scheme == "file" and not parts.path:
        raise InvalidInput(f"remote URL {raw} names no path")
    username, password = parts.username, parts.password
    is_http = parts.scheme in ("http", "https")
    if password is not None and not is_http:
        raise InvalidInput(f"inline credentials are only supported for http(s) remotes, not in {redact(raw)}")
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if username and not is_http:
        netloc = f"{username}@{netloc}"  # ssh://git@host: an ssh user name is not a secret
    clean = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if is_http and username is not None:
        # https://TOKEN@host is as secret as https://user:TOKEN@host.
        return Remote(url=clean, username=username, password=password or "")
    return Remote(url=clean)


def redact(text: str) -> str:
    """Hide anything that looks like user:secret@ in a URL inside free text (e.g. git's stderr)."""

    def hide(m: re.Match[str]) -> str:
        secret = ":" in m.group("userinfo") or m.group("scheme").lower() in SECRET_USERINFO_SCHEMES
        return f"{m.group('scheme')}***@" if secret else m.group(0)

    return CREDENTIALS_IN_URL_RE.sub(hide, text)
