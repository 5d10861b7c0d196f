"""The warm-up's lookups (see warmup.py), in a process of its own: python -I -S touch.py MOUNT.

stdin holds NUL-ended paths relative to MOUNT; each is looked up (lstat), whether it is there or
not, and the number of lookups that worked (found, or found absent) is printed. It imports
nothing beyond the interpreter's core, so that it starts in milliseconds.
"""
import errno
import os
import sys

GONE = (errno.ENOTCONN, errno.ENODEV, errno.ESHUTDOWN)  # the mount went away: stop


def main() -> int:
    root = os.fsencode(sys.argv[1])
    looked_up = 0
    for name in sys.stdin.buffer.read().split(b"\0"):
        if not name:
            continue
        try:
            os.lstat(os.path.join(root, name))
            looked_up += 1
        except FileNotFoundError:
            looked_up += 1  # an absence is what the kernel caches
        except OSError as exc:
            if exc.errno in GONE:
                break
    print(looked_up)
    return 0


if __name__ == "__main__":
    sys.exit(main())
