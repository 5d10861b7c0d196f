"""Names, remote URLs and refs as users type them: validation, credential splitting, redaction.

Credentials typed inline (`https://user:token@host/repo`) are split off here and travel only in
memory and through git's credential-helper protocol (see credentials.py); what is stored, logged
or shown is the URL without them, and error text is passed through `redact` first.

Every remote git will receive is one of the forms git documents for ordinary transports. Git also
accepts `<helper>::<address>` (`ext::sh -c ...` runs a shell command) and reads anything that
begins with '-' as an option: neither ever reaches git from here.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from .model import InvalidInput

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # used with fullmatch: "$" would allow a final newline
SCHEMES = ("file", "git", "http", "https", "ssh")
USAGE = "use a file://, git://, http(s):// or ssh:// URL, user@host:path, or an absolute path"
# git's scp-like ssh syntax. User and host start with a letter or digit: ssh reads '-...' as an option.
SCP_LIKE_RE = re.compile(r"(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<path>[^:].*)")
# user:secret@host:path: git would take "user" for the host and send the rest as a path, and the
# secret would be stored and shown with the remote.
SCP_CREDENTIALS_RE = re.compile(r"(?P<user>[^@/:]*):[^@]*@(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<path>.*)")
HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
CREDENTIALS_IN_URL_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
SECRET_USERINFO_SCHEMES = ("http://", "https://")
# Unicode categories never accepted in anything typed: control characters (C0, DEL, C1), format
# characters (bidirectional overrides, zero-width), line and paragraph separators, and the lone
# surrogates Python makes of bytes that are not UTF-8.
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class Remote:
    url: str  # what is stored and shown: never holds a password or token
    username: str | None = None
    password: str | None = None

    @property
    def has_credentials(self) -> bool:
        return self.password is not None


def unprintable(text: str) -> str | None:
    """The first character of `text` that must never be accepted or echoed raw, if any."""
    return next((c for c in text if unicodedata.category(c) in UNPRINTABLE_CATEGORIES), None)


def escaped(char: str) -> str:
    r"""A character as an escape sequence (`\n`, `\x1b`, `\u202e`), safe to print."""
    return char.encode("unicode_escape").decode("ascii")


def printable(text: str) -> str:
    """`text` with every unprintable character escaped: one line, no terminal control sequences."""
    return "".join(escaped(c) if unicodedata.category(c) in UNPRINTABLE_CATEGORIES else c for c in text)


def _refuse_unprintable(what: str, text: str) -> None:
    char = unprintable(text)
    if char is not None:
        raise InvalidInput(f"{what} contains the control character {escaped(char)}: remove it")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or ".." in name or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid repository name {printable(repr(name))}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/' and no '..')"
        )
    return name


HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def validate_host(host: str, origin: str = "--host") -> str:
    """A host of the fleet: it names a queue, a worker and task ids, so it is checked like a name."""
    if not isinstance(host, str) or ".." in host or not HOST_RE.fullmatch(host):
        raise InvalidInput(
            f"{origin} {printable(repr(host))} is not a host name: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return host


DEFAULT_FILTER = "blob:none"
_BLOB_LIMIT = re.compile(r"blob:limit=([0-9]{1,12})([kmg]?)")


def validate_filter(raw: str) -> str:
    """Accept the partial-clone filters a mount can work with: `blob:none` (no blob arrives with
    the clone) or `blob:limit=SIZE` (blobs smaller than SIZE bytes do, with k, m or g for KiB,
    MiB, GiB); return it as git spells it."""
    text = raw.strip().lower()
    if text == DEFAULT_FILTER:
        return text
    match = _BLOB_LIMIT.fullmatch(text)
    if match is None:
        raise InvalidInput(f"invalid --filter {printable(repr(raw))}: give blob:none or blob:limit=SIZE (e.g. blob:limit=64k)")
    return f"blob:limit={int(match.group(1))}{match.group(2)}"


_COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
MAX_DEPTH = 1_000_000
_INTERVAL = re.compile(r"([0-9]{1,9})(s|m|h|d)?")
_INTERVAL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def validate_commit_id(raw: str) -> str:
    """A full commit id (SHA-1 or SHA-256), as --require-commit takes it: an abbreviation could
    name another commit tomorrow, and a verified source must name exactly one."""
    text = raw.strip().lower()
    if _COMMIT_ID.fullmatch(text) is None:
        raise InvalidInput(f"invalid --require-commit {printable(repr(raw))}: give a full commit id "
                           "(40 hex digits, or 64 for SHA-256; see: git rev-parse COMMIT)")  # fmt: skip
    return text


def validate_depth(raw: str | int) -> int:
    """--depth N: a shallow clone of the N newest commits (1 to MAX_DEPTH)."""
    text = str(raw).strip()
    if re.fullmatch(r"[0-9]{1,7}", text) is None or not 1 <= int(text) <= MAX_DEPTH:
        raise InvalidInput(f"invalid --depth {printable(repr(raw))}: give a number of commits from 1 to {MAX_DEPTH}")
    return int(text)


def validate_refresh(raw: str) -> float | None:
    """--refresh INTERVAL|never: seconds between refreshes (30, 90s, 5m, 1h, 1d), or None."""
    text = raw.strip().lower()
    if text == "never":
        return None
    match = _INTERVAL.fullmatch(text)
    seconds = int(match.group(1)) * _INTERVAL_UNITS[match.group(2) or "s"] if match is not None else 0
    if seconds < 1:
        raise InvalidInput(f"invalid --refresh {printable(repr(raw))}: give an interval (30, 90s, 5m, 1h, 1d; at least "
                           "1s) or never")  # fmt: skip
    return float(seconds)


def validate_ref(ref: str) -> str:
    """Accept `refs/heads/main`, `refs/tags/v1` or a short branch name; return the full ref.

    The rules are git's (git check-ref-format), so a ref refused here is one git would refuse.
    """
    components = ref.split("/")
    if (
        not ref
        or ref.startswith("-")
        or unprintable(ref) is not None
        or any(c in ref for c in " ~^:?*[\\")
        or ".." in ref
        or "@{" in ref
        or ref == "@"
        or ref.endswith(("/", "."))
        or any(not part or part.startswith(".") or part.endswith(".lock") for part in components)
    ):
        raise InvalidInput(f"invalid ref {printable(repr(ref))}: give a branch or tag such as refs/heads/main")
    if ref.startswith("refs/"):
        return ref
    return f"refs/heads/{ref}"


def parse_remote(raw: str) -> Remote:
    """Check a remote as typed and split off inline credentials (percent-decoded, as in a URL)."""
    _refuse_unprintable("the remote", raw)
    if not raw or raw != raw.strip():
        raise InvalidInput(f"invalid remote {raw!r}: {USAGE}")
    if raw.startswith("-"):
        raise InvalidInput(f"invalid remote: it begins with '-', which git would read as an option: {USAGE}")
    helper, sep, _ = raw.partition("::")
    if sep and "/" not in helper:
        raise InvalidInput(
            f"remote helper syntax {helper}::<address> is refused (it makes git run a program): {USAGE}"
        )
    if raw.startswith("/"):
        if not Path(raw).exists():
            raise InvalidInput(f"remote path {raw} does not exist")
        return Remote(url="file://" + raw)
    if "://" not in raw:
        return _parse_scp_like(raw)
    return _parse_url(raw)


def _parse_scp_like(raw: str) -> Remote:
    secret = SCP_CREDENTIALS_RE.fullmatch(raw)
    if secret:
        shown = f"{secret.group('user')}:***@{secret.group('host')}:{secret.group('path')}"
        raise InvalidInput(
            f"remote {shown} holds a password or token: ssh remotes (user@host:path) authenticate with "
            "ssh keys; for a token give an https:// URL, on standard input with --remote -"
        )
    if SCP_LIKE_RE.fullmatch(raw):
        return Remote(url=raw)
    raise InvalidInput(f"invalid remote {raw!r}: {USAGE}")


def _parse_url(raw: str) -> Remote:
    shown = redact(re.split(r"[?#]", raw, maxsplit=1)[0])  # a query may hold a token too: never shown
    try:
        parts = urlsplit(raw)
    except ValueError:
        raise InvalidInput(
            f"invalid remote URL {shown}: an unbalanced '[' or ']', or no IPv6 address between them "
            "(write an IPv6 host as [::1])"
        ) from None
    if parts.scheme not in SCHEMES:
        raise InvalidInput(f"unsupported remote scheme {parts.scheme!r} in {shown}: use one of {', '.join(SCHEMES)}")
    if parts.query or parts.fragment or raw.endswith(("?", "#")):
        raise InvalidInput(f"remote URL {shown} is followed by a query or fragment: remove everything from '?' or '#' on")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 and _has_port(parts.netloc):
        raise InvalidInput(f"invalid port in remote URL {shown}: give a number from 1 to 65535")
    if parts.scheme == "file":
        if parts.netloc:
            raise InvalidInput(f"remote URL {shown} names a host: a file:// URL is a local path, file:///path/to/repo.git")
        if not parts.path:
            raise InvalidInput(f"remote URL {shown} names no path")
        return Remote(url=urlunsplit(("file", "", parts.path, "", "")))
    host = _host(parts.hostname, shown)
    if parts.path in ("", "/"):
        raise InvalidInput(f"remote URL {shown} names no repository (add its path, e.g. /org/repo.git)")
    is_http = parts.scheme in ("http", "https")
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    if password is not None and not is_http:
        raise InvalidInput(f"inline credentials are only supported for http(s) remotes, not in {shown}")
    if username is not None and parts.scheme == "git":
        raise InvalidInput(f"remote URL {shown} names a user, which git:// does not take: remove it")
    for value in (username, password):
        if value is not None:
            _refuse_unprintable(f"the user or password in remote URL {shown} (after percent-decoding)", value)
    netloc = host if port is None else f"{host}:{port}"
    if username and not is_http:
        netloc = f"{parts.username}@{netloc}"  # ssh://git@host: an ssh user name is not a secret
    clean = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if is_http and username is not None:
        # https://TOKEN@host is as secret as https://user:TOKEN@host.
        return Remote(url=clean, username=username, password=password or "")
    return Remote(url=clean)


def _has_port(netloc: str) -> bool:
    """Whether the host part of `netloc` is followed by ':' (a port, perhaps a bad one)."""
    hostport = netloc.rpartition("@")[2]
    return ":" in hostport.rpartition("]")[2]


def _host(hostname: str | None, shown: str) -> str:
    """The host as it goes back into a URL; refuse what no transport would take as one."""
    if not hostname:
        raise InvalidInput(f"remote URL {shown} names no host")
    if ":" in hostname:
        try:
            ipaddress.IPv6Address(hostname)
        except ValueError:
            raise InvalidInput(f"invalid IPv6 host in remote URL {shown}") from None
        return f"[{hostname}]"
    if not HOST_RE.fullmatch(hostname):
        raise InvalidInput(f"invalid host in remote URL {shown}: use a host name or an IP address")
    return hostname


def redact(text: str) -> str:
    """Hide anything that looks like user:secret@ in a URL inside free text (e.g. git's stderr)."""

    def hide(m: re.Match[str]) -> str:
        secret = ":" in m.group("userinfo") or m.group("scheme").lower() in SECRET_USERINFO_SCHEMES
        return f"{m.group('scheme')}***@" if secret else m.group(0)

    return CREDENTIALS_IN_URL_RE.sub(hide, text)
