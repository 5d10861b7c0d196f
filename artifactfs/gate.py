"""The readiness gate of a mount: user-facing operations wait here until the repository is ready.

Closed while preparing (waiters block), open once ready, failed after a failed preparation (every
waiter and later caller gets EIO) until a new attempt resets it. A blocked caller that receives a
signal (Ctrl-C) is let go with EINTR: pyfuse3 does not pass the kernel's FUSE_INTERRUPT on, so the
gate watches the caller's pending signals itself.
"""
from __future__ import annotations

import enum
import errno

import pyfuse3
import trio


class GateState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    FAILED = "failed"


# How often a blocked caller's pending signals are checked: the latency of Ctrl-C.
SIGNAL_POLL_SECONDS = 0.05


def signal_pending(tid: int) -> bool:
    """Whether the thread `tid` has a signal pending (SIGINT, or the SIGKILL a fatal one becomes)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as fh:
            fields = dict(line.split(b":", 1) for line in fh if b":" in line)
    except OSError:
        return True  # the caller is gone: nobody waits for this answer
    pending = int(fields.get(b"SigPnd", b"0").strip() or b"0", 16) | int(fields.get(b"ShdPnd", b"0").strip() or b"0", 16)
    blocked = int(fields.get(b"SigBlk", b"0").strip() or b"0", 16)
    return bool(pending & ~blocked)


class Gate:
    def __init__(self, state: GateState = GateState.CLOSED) -> None:
        self.state = state
        self.error: str | None = None
        self._changed = trio.Event()

    def open(self) -> None:
        self._set(GateState.OPEN, None)

    def fail(self, error: str) -> None:
        self._set(GateState.FAILED, error)

    def close(self) -> None:
        self._set(GateState.CLOSED, None)

    def _set(self, state: GateState, error: str | None) -> None:
        self.state, self.error = state, error
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, caller_tid: int | None = None) -> None:
        """Return when open; raise FUSEError(EIO) when failed, FUSEError(EINTR) if interrupted."""
        while True:
            if self.state is GateState.OPEN:
                return
            if self.state is GateState.FAILED:
                raise pyfuse3.FUSEError(errno.EIO)
            changed = self._changed
            if caller_tid is None:
                await changed.wait()
                continue
            while not changed.is_set():
                with trio.move_on_after(SIGNAL_POLL_SECONDS):
                    await changed.wait()
                if not changed.is_set() and signal_pending(caller_tid):
                    raise pyfuse3.FUSEError(errno.EINTR)
