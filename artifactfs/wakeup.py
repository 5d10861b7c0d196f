"""Wake-ups over Redis pub/sub: "stream N changed, read the log".

Pub/sub is at most once: a subscriber that is away misses messages for good. So a message is only
a hint to read the event log now; nothing waits on a message alone (mountd also re-reads the log on
every (re)subscribe and on a timer). Publishing speaks just enough of the Redis protocol (RESP) to
send one PUBLISH, so the CLI does not pay for importing a client library; a Redis that is not
running is not an error here: the log already holds the truth.
"""
from __future__ import annotations

import socket
from urllib.parse import unquote, urlsplit

CHANNEL = "artifactfs:events"
TIMEOUT_SECONDS = 0.5


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT_SECONDS)
        sock.connect(parts.path)
    elif parts.scheme in ("redis", "rediss"):
        if parts.scheme == "rediss":
            raise ValueError("rediss:// wake-ups need the redis client library")
        sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), TIMEOUT_SECONDS)
    else:
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _call(url: str, *command: str) -> bytes | None:
    """Send one command (after AUTH/SELECT as the URL says); its reply line, or None on failure."""
    parts = urlsplit(url)
    try:
        with _connect(url) as sock:
            commands = []
            if parts.password:
                auth = [unquote(parts.username), unquote(parts.password)] if parts.username else [unquote(parts.password)]
                commands.append(_command("AUTH", *auth))
            db = parts.path.strip("/") if parts.scheme != "unix" else ""
            if db:
                commands.append(_command("SELECT", db))
            commands.append(_command(*command))
            sock.sendall(b"".join(commands))
            replies = b""
            while replies.count(b"\r\n") < len(commands):
                chunk = _read_reply(sock)
                if not chunk:
                    return None
                replies += chunk
    except (OSError, ValueError):
        return None
    lines = replies.split(b"\r\n")[: len(commands)]
    return None if any(line.startswith(b"-") for line in lines) else lines[-1]


def publish(url: str, message: str, channel: str = CHANNEL) -> bool:
    """Send one wake-up; False (never an exception) if Redis cannot be reached."""
    return _call(url, "PUBLISH", channel, message) is not None


def ping(url: str) -> bool:
    return _call(url, "PING") == b"+PONG"
