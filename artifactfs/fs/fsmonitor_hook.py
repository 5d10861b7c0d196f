"""git's fsmonitor hook (version 2) for a work tree in an artifactfs mount.

git runs it from the top of the work tree as `<hook> 2 <token>` and reads, on standard output, a
new token, NUL, and the paths changed since `<token>`, each ended by NUL. The mount answers (see
fsmonitor.py) through an extended attribute of its root, in pages. Anywhere else (a worktree
outside the mount, an older mount) the answer is "/": git then checks every file itself.

It runs for every git command that reads the index, so it starts Python without site packages
(-S -E) and imports nothing but os and sys.
"""
import os
import sys

PREFIX = "user.artifactfs.fsmonitor:"


def ask(token: str) -> bytes:
    first = os.getxattr(".", f"{PREFIX}{token}:0")
    count, _, answer = first.partition(b"\n")
    pages = [answer] + [os.getxattr(".", f"{PREFIX}{token}:{n}") for n in range(1, int(count))]
    return b"".join(pages)


def main(argv: list) -> int:
    if len(argv) < 3 or argv[1] != "2":
        print("artifactfs fsmonitor hook: only hook version 2 is spoken", file=sys.stderr)
        return 1
    token = argv[2]
    try:
        answer = ask(token)
    except (OSError, ValueError):
        answer = b"afs1:none\0/\0"
    sys.stdout.buffer.write(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
