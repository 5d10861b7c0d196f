"""The control channel between mountd and the mount processes: JSON lines over a Unix socket.

A mount process outlives mountd (a restart for an upgrade, or a crash, must not take a user's tree
away), so mountd cannot hold it by a pipe: each mount process listens on a socket of its own under
<root>/run/mounts (a root-only directory), and any mountd, the one that started it or the next one,
connects and gives orders. Each order gets exactly one reply line.

Orders: {"op": "hello"} -> the process describes itself; {"op": "ready", "git_dir", "head"} opens
the gate on a commit; {"op": "failed", "error"} makes every operation fail with EIO;
{"op": "reset"} closes the gate again; {"op": "unmount"} ends the session.

The socket is root's alone by its directory's mode, and both sides check the peer's credentials
(SO_PEERCRED): only our own user may give orders, and mountd only obeys a process it can identify.
"""
from __future__ import annotations

import json
import os
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from artifactfs.model import ArtifactError

# sun_path holds 108 bytes; a deep state root would not fit, so long paths go through the
# directory's descriptor (/proc/self/fd/N/<file>), which any length of root fits into.
SUN_PATH_MAX = 107
MAX_LINE = 1 << 20


class MountUnresponsive(ArtifactError):
    """A mount process did not answer on its control socket in time (or at all)."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCredentials(*struct.unpack("3i", raw))


@contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A path to `path` that fits in sun_path."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def listen(path: Path) -> socket.socket:
    """Bind the control socket of a mount process (replacing a dead one's file)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with short_path(path) as address:
        sock.bind(address)
    os.chmod(path, 0o600)
    sock.listen(8)
    return sock


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a control message must be a JSON object")
    return message


class ControlClient:
    """mountd's end of one mount process's control socket: one order, one reply, with a timeout."""

    def __init__(self, path: Path, *, timeout: float, expected_pid: int | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.expected_pid = expected_pid
        self._sock: socket.socket | None = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            with short_path(self.path) as address:
                sock.connect(address)
            peer = peer_credentials(sock)
            # Only a process of our own user, and the one its pid file names, is obeyed.
            if peer.uid != os.getuid() or (self.expected_pid is not None and peer.pid != self.expected_pid):
                raise MountUnresponsive(f"{self.path} is served by pid {peer.pid} (uid {peer.uid}), not our mount process")
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, order: dict[str, Any]) -> dict[str, Any]:
        """Send one order and return its reply; MountUnresponsive on a timeout or a lost peer."""
        try:
            if self._sock is None:
                self._sock = self._connect()
                self._buffer = b""
            self._sock.sendall(encode(order))
            while b"\n" not in self._buffer:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise MountUnresponsive(f"the mount process behind {self.path} closed the connection")
                self._buffer += chunk
                if len(self._buffer) > MAX_LINE:
                    raise MountUnresponsive(f"the mount process behind {self.path} sent an oversized reply")
            line, self._buffer = self._buffer.split(b"\n", 1)
            reply = decode(line)
        except MountUnresponsive:
            self.close()
            raise
        except (OSError, ValueError) as exc:  # socket.timeout is an OSError
            self.close()
            raise MountUnresponsive(f"no answer from the mount process behind {self.path}: {exc}") from None
        if not reply.get("ok"):
            raise MountUnresponsive(f"the mount process behind {self.path} refused {order.get('op')!r}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
