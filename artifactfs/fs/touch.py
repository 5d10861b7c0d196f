"""The warm-up's lookups (see warmup.py), in a process of its own: python -I -S touch.py MOUNT.

stdin holds NUL-ended paths relative to MOUNT; each is looked up (lstat), whether it is there or
not, and the number of lookups that worked (found, or found absent) is printed. The overlay is
the sandbox's to change, so a directory on the way may have become a symbolic link: the walk
follows none, so it never looks outside the mount. It imports nothing beyond the interpreter's
core, so that it starts in milliseconds.
"""
import errno
import os
import sys

GONE = (errno.ENOTCONN, errno.ENODEV, errno.ESHUTDOWN)  # the mount went away: stop
DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_directory(root: int, parts: list) -> int:
    """The directory `parts` under `root`, walked one component at a time, following no link."""
    fd = os.dup(root)
    try:
        for part in parts:
            next_fd = os.open(part, DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def main() -> int:
    root = os.open(sys.argv[1], DIRECTORY)
    looked_up = 0
    here, here_fd = None, -1  # names come grouped by directory: keep the last one open
    for name in sys.stdin.buffer.read().split(b"\0"):
        parts = name.split(b"/")
        if not name or b"" in parts or b"." in parts or b".." in parts:
            continue
        try:
            if parts[:-1] != here:
                if here_fd >= 0:
                    os.close(here_fd)
                here, here_fd = None, -1  # until the next one opens
                here_fd = open_directory(root, parts[:-1])
                here = parts[:-1]
            os.lstat(parts[-1], dir_fd=here_fd)
            looked_up += 1
        except FileNotFoundError:
            looked_up += 1  # an absence is what the kernel caches
        except OSError as exc:  # a name changed since (a file where a directory was, a link)
            if exc.errno in GONE:
                break
    print(looked_up)
    return 0


if __name__ == "__main__":
    sys.exit(main())
