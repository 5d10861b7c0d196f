"""git's fsmonitor protocol (hook version 2) for a mount: which paths changed since a token.

Only the overlay can change a mounted tree, so the mount knows every path that may differ from
the commit shown. git asks through its fsmonitor hook (fsmonitor_hook.sh, configured as
core.fsmonitor), which reads the answer from the mount as a file of its root that a lookup finds
and no listing shows: `.artifactfs-fsmonitor:<token>`, read-only, the mount owner's, made anew by
each lookup. The kernel checks that the asker may read the mount, so the answer needs no other
authentication, and it comes from the one process that knows it. (It was an extended attribute
once: but then the kernel must ask the mount about every attribute, and `ls -l` asks two per
file; with attributes refused once for all, it asks none.)

Tokens:
- `afs1:base:<commit>`: written by preparation into a fresh index of `<commit>` (with every
  entry marked valid), so that the first `git status` stats nothing it need not. The answer is
  every path the overlay holds, plus what differs between `<commit>` and the commit shown.
- `afs1:<overlay id>:<epoch>:<seq>`: handed out by the mount. Within one mount process (epoch)
  the answer is exact: every path changed after change `<seq>`. A token of an earlier process
  gets what the overlay recorded since, plus every path it holds (content written just before a
  crash may have been numbered in memory only).
- anything else (another mount's token, a worktree outside any mount): "/", everything may have
  changed, and git checks every file as it would without a monitor.

Paths are reported as git wants them: relative to the top of the work tree; a directory also with
a trailing slash, which makes git look again at everything under it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import pygit2

from .overlay import Change, EntryKind, Overlay

ANSWER_PREFIX = b".artifactfs-fsmonitor:"  # the name of an answer at the root: the prefix and the token
TOKEN_VERSION = "afs1"
TRIVIAL = b"/\0"  # "no information": git checks everything
HOOK = Path(__file__).with_name("fsmonitor_hook.sh")
# A command git runs without a shell: its own process execs the hook (it has a #! line), where a
# command with a space or any shell character costs an `sh -c` first, a millisecond per command.
PLAIN_COMMAND = re.compile(r"[A-Za-z0-9_./+,@:-]+")


def base_token(commit: str) -> str:
    return f"{TOKEN_VERSION}:base:{commit}"


@dataclass(frozen=True)
class Token:
    overlay: str
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{TOKEN_VERSION}:{self.overlay}:{self.epoch}:{self.seq}"


def parse_token(text: str) -> Token | str | None:
    """A mount's token, the commit of a base token, or None for a token not ours."""
    parts = text.split(":")
    if len(parts) == 3 and parts[0] == TOKEN_VERSION and parts[1] == "base":
        return parts[2]
    if len(parts) == 4 and parts[0] == TOKEN_VERSION and parts[3].isdigit():
        return Token(parts[1], parts[2], int(parts[3]))
    return None


def encode(changes: list[Change]) -> bytes:
    out = bytearray()
    for change in changes:
        if not change.path:
            continue  # the root itself: nothing git tracks
        out += change.path + b"\0"
        if change.directory:
            out += change.path + b"/\0"
    return bytes(out)


def tree_difference(repo: pygit2.Repository, old: str, new: str) -> list[Change] | None:
    """The paths that differ between two commits' trees (trees only: no blob is read), or None
    if either commit is not here."""
    try:
        a, b = repo.get(old), repo.get(new)
    except (ValueError, KeyError):
        return None
    if not isinstance(a, pygit2.Commit) or not isinstance(b, pygit2.Commit):
        return None
    diff = a.tree.diff_to_tree(b.tree)
    paths = {p.encode("utf-8", "surrogateescape") for d in diff.deltas for p in (d.old_file.path, d.new_file.path)}
    return [Change(path, False) for path in sorted(paths)]


class Answers:
    """The mount's side of the protocol: one answer per token asked, served page by page."""

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay
        self.epoch = uuid.uuid4().hex[:12]  # this process: what it numbered in memory dies with it

    @staticmethod
    def asks(name: bytes) -> bool:
        """Whether `name`, at the root of the mount, is a question (see ANSWER_PREFIX)."""
        return name.startswith(ANSWER_PREFIX)

    def answer_to(self, name: bytes, repo: pygit2.Repository, shown: str) -> bytes:
        """The answer that file `.artifactfs-fsmonitor:<token>` holds."""
        return self.answer(name[len(ANSWER_PREFIX) :].decode("utf-8", "replace"), repo, shown)

    def answer(self, token: str, repo: pygit2.Repository, shown: str) -> bytes:
        """git's hook answer to `token`: the new token, NUL, then the changed paths, each ended by
        NUL (or "/" for "everything")."""
        new = Token(self.overlay.id, self.epoch, self.overlay.seq)
        changes = self.changes(parse_token(token), repo, shown)
        return str(new).encode() + b"\0" + (encode(changes) if changes is not None else TRIVIAL)

    def changes(self, token: Token | str | None, repo: pygit2.Repository, shown: str) -> list[Change] | None:
        if isinstance(token, Token) and token.overlay == self.overlay.id:
            found = self.overlay.changes_since(token.seq)
            if token.epoch != self.epoch:
                found += self._everything_held()
            return found
        if isinstance(token, str):  # an index made by preparation for that commit
            found = self._everything_held()
            if token != shown:
                difference = tree_difference(repo, token, shown)
                if difference is None:
                    return None
                found += difference
            return found
        return None

    def _everything_held(self) -> list[Change]:
        held = self.overlay.entries_by_kind()
        return [Change(path, kind in (EntryKind.DIR, EntryKind.WHITEOUT)) for path, kind in held]


# --- the index: a fresh one, every entry valid for the monitor ---

EWAH_EMPTY = struct.pack(">IIQI", 0, 1, 0, 0)  # bit size 0, one word (an empty run), run at word 0


def fsmonitor_extension(token: str) -> bytes:
    """git's FSMN index extension (version 2): `token`, and no entry left to check."""
    body = struct.pack(">I", 2) + token.encode() + b"\0" + struct.pack(">I", len(EWAH_EMPTY)) + EWAH_EMPTY
    return b"FSMN" + struct.pack(">I", len(body)) + body


def add_index_extensions(index: Path, extensions: list[bytes], object_format: str = "sha1") -> None:
    """Append extensions (an FSMN extension: git then trusts every entry until the hook says a
    path changed, so a status stats and hashes only what the overlay holds) to an index that has
    none of them, and seal it again (its trailer is the hash of everything before it)."""
    size = hashlib.new(object_format).digest_size
    content = index.read_bytes()
    if content[:4] != b"DIRC":
        raise ValueError(f"{index} is not a git index")
    body = content[:-size] + b"".join(extensions)
    tmp = index.with_name(index.name + ".artifactfs")
    tmp.write_bytes(body + hashlib.new(object_format, body).digest())
    tmp.replace(index)


def hook_command(hook: Path = HOOK) -> str:
    """core.fsmonitor: git runs it with the version and token appended. The hook itself, if
    everyone may run it and its path needs no quoting; otherwise through `sh` (an installation
    that dropped the executable bits, a path with a space)."""
    path = str(hook)
    try:
        runnable = stat.S_IMODE(hook.stat().st_mode) & 0o111 == 0o111 and os.access(hook, os.X_OK)
    except OSError:
        runnable = False
    if runnable and PLAIN_COMMAND.fullmatch(path):
        return path
    return f"sh {shlex.quote(path)}"
