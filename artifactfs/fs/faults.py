"""No fault in one operation ends the session: every kernel operation of a filesystem class is
wrapped so that an unexpected exception (a missing object, a pack gone underneath, a bug) fails
that one operation with EIO and one log line (a full disk: ENOSPC, and no log line)."""
from __future__ import annotations

import errno
import functools
import inspect
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from ..metrics import ErrorKind, count_error

log = logging.getLogger(__name__)

# Every request handler pyfuse3 may call (init and stacktrace are not requests).
KERNEL_OPERATIONS = frozenset(
    name for name, member in vars(pyfuse3.Operations).items() if inspect.iscoroutinefunction(member)
)
# A full disk or quota is the caller's to know, as on any file system; the change it would have
# made is rolled back (SQLite) or never recorded, so nothing is left half done.
PASSED_ON = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
SQLITE_FULL = 13
Operation = Callable[..., Awaitable[Any]]
FS = TypeVar("FS", bound=type)


def _log_fault(fs: Any, operation: str, exc: Exception) -> None:
    count_error(ErrorKind.OPERATION)
    log.error("%s: %s failed: %s: %s", getattr(fs, "fsname", "artifactfs"), operation, type(exc).__name__, exc)
    log.debug("%s: %s failed", getattr(fs, "fsname", "artifactfs"), operation, exc_info=exc)


def contain(operation: str, handler: Operation) -> Operation:
    """`handler`, failing with EIO instead of raising anything but FUSEError.

    pyfuse3 lets any other exception out of its main loop, which ends the session and leaves
    every user of the mount with ENOTCONN. Cancellation (and any other BaseException) still
    passes: it is how the mount shuts down.
    """
    if operation == "forget":  # no reply to carry an error, and pyfuse3 wants no exception at all

        @functools.wraps(handler)
        async def forget(self: Any, *args: Any) -> None:
            try:
                await handler(self, *args)
            except Exception as exc:
                _log_fault(self, operation, exc)

        return forget

    @functools.wraps(handler)
    async def contained(self: Any, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if exc.errno in PASSED_ON:
                raise pyfuse3.FUSEError(exc.errno) from None
            _log_fault(self, operation, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                raise pyfuse3.FUSEError(errno.ENOSPC) from None
            _log_fault(self, operation, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:
            _log_fault(self, operation, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return contained


def contained(cls: FS) -> FS:
    """Wrap every kernel operation of `cls` (its own and the ones it inherits) in `contain`."""
    for operation in KERNEL_OPERATIONS:
        setattr(cls, operation, contain(operation, getattr(cls, operation)))
    return cls
