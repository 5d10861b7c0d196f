"""The readiness gate of a mount: user-facing operations wait here until the repository is ready.

Closed while preparing (waiters block), open once ready, failed after a failed preparation (every
waiter and later caller gets EIO) until a new attempt resets it.

Any wait on behalf of a FUSE caller (here at the gate, or for a blob fetch, hydrator.py) goes through
`wait_for`: a caller that receives a signal (Ctrl-C, SIGKILL) is let go with EINTR. pyfuse3 does
not pass the kernel's FUSE_INTERRUPT on, and once the server has read a request the kernel waits
for its answer uninterruptibly, so the server watches the caller's pending signals itself.
"""
from __future__ import annotations

import enum
import errno

import pyfuse3
import trio

from ..metrics import GateOutcome, gate_wait


class GateState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    FAILED = "failed"


# How often a blocked caller's pending signals are checked: the latency of Ctrl-C.
SIGNAL_POLL_SECONDS = 0.05


def _mask(fields: dict[bytes, bytes], name: bytes) -> int:
    return int(fields.get(name, b"0").strip() or b"0", 16)


def signal_pending(tid: int) -> bool:
    """Whether the thread `tid` has an unblocked signal pending (SIGINT, or the SIGKILL a fatal
    one becomes).

    A thread the server cannot see has none it could know of: tid 0 is what the kernel reports
    for a caller in a pid namespace the server does not see into (a container), and a thread that
    is gone has nothing to be interrupted. Such callers wait like any other.
    """
    if tid <= 0:
        return False
    try:
        with open(f"/proc/{tid}/status", "rb") as fh:
            fields = dict(line.split(b":", 1) for line in fh if b":" in line)
    except OSError:
        return False
    pending = _mask(fields, b"SigPnd") | _mask(fields, b"ShdPnd")
    return bool(pending & ~_mask(fields, b"SigBlk"))


def process_of(tid: int | None) -> int | None:
    """The process (thread group) thread `tid` belongs to; None if the server cannot see it."""
    if not tid or tid <= 0:
        return None
    try:
        with open(f"/proc/{tid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


async def wait_for(event: trio.Event, caller_tid: int | None) -> None:
    """Wait until `event` is set; raise FUSEError(EINTR) if the caller gets a signal first.

    `caller_tid` None (an operation pyfuse3 gives no context) or 0 (a caller the server cannot
    see) just waits.
    """
    if not caller_tid:
        await event.wait()
        return
    while not event.is_set():
        with trio.move_on_after(SIGNAL_POLL_SECONDS):
            await event.wait()
        if not event.is_set() and signal_pending(caller_tid):
            raise pyfuse3.FUSEError(errno.EINTR)


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
        if self.state is GateState.OPEN:
            return
        if self.state is GateState.FAILED:
            raise pyfuse3.FUSEError(errno.EIO)
        with gate_wait() as ended:  # a wait at a closed gate: counted, and timed
            while True:
                await wait_for(self._changed, caller_tid)
                if self.state is GateState.OPEN:
                    ended(GateOutcome.OPENED)
                    return
                if self.state is GateState.FAILED:
                    ended(GateOutcome.FAILED)
                    raise pyfuse3.FUSEError(errno.EIO)
