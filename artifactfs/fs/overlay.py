"""The overlay: what was written on top of the commit shown, kept across restarts.

The base layer (a commit's trees, read through pygit2) never changes; every change lands here.
An entry records one path's state in the overlay:

- a file whose content is ours (`data`, the id of a content file under data/), or still the
  base's blob (`base_oid`: renamed or chmod'ed, never read, so never fetched);
- a directory made here, or one renamed from the base (`base_tree`: its entries come from that
  tree, under the new name, without copying anything); `opaque` hides the base directory that
  stood at the same path (removed, then made again);
- a symbolic link;
- a whiteout: the path exists in the base and was removed.

Metadata lives in a SQLite database (write-ahead log): a committed change is in the operating
system's hands before the operation returns, so a crash of the mount process loses nothing it
acknowledged, and `sync` (on the caller's fsync) makes it safe from a crash of the machine too.
Content files are plain files under data/, written in place. They are named by id, not by path,
so a rename moves no data and an open handle keeps its content after its path is renamed or
unlinked.

Every change is numbered (a sequence that only grows) and the last number of every path changed
is kept, so that git's fsmonitor hook can be told exactly which paths changed since it last
asked (fsmonitor.py). Content writes, which change no metadata, are numbered in memory (`touch`).

Paths are relative, as bytes, without a leading slash (b"src/app.py"); b"" is the root.
"""
from __future__ import annotations

import enum
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    path BLOB PRIMARY KEY,
    parent BLOB NOT NULL,
    kind TEXT NOT NULL,
    mode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    data INTEGER,
    base_oid TEXT,
    base_tree TEXT,
    target BLOB,
    opaque INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_parent ON entries(parent);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS changes (path BLOB PRIMARY KEY, seq INTEGER NOT NULL, dir INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS changes_seq ON changes(seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class EntryKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    LINK = "link"
    WHITEOUT = "whiteout"


@dataclass(frozen=True)
class OverlayEntry:
    path: bytes
    kind: EntryKind
    mode: int  # permission bits (0o755 for an executable file)
    mtime_ns: int
    data: int | None = None  # FILE: our content file
    base_oid: str | None = None  # FILE: content still the base's blob
    base_tree: str | None = None  # DIR: entries of this base tree show under the new path
    target: bytes | None = None  # LINK
    opaque: bool = False  # DIR: the base directory at this path is hidden

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]


@dataclass(frozen=True)
class Change:
    """A path changed since some point: a directory change covers everything under it."""

    path: bytes
    directory: bool


def parent_of(path: bytes) -> bytes:
    return path.rsplit(b"/", 1)[0] if b"/" in path else b""


def _under(prefix: bytes) -> tuple[bytes, bytes]:
    """The half-open key range of every path strictly under directory `prefix` ('/' + 1 is '0')."""
    return prefix + b"/", prefix + b"0"


class Overlay:
    """One mount's overlay under `root`: meta.db and data/<id>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_root = root / "data"
        self.data_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.conn = sqlite3.connect(root / "meta.db", isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        # In WAL mode a commit is written (not synced) before it returns: a crash of this process
        # loses nothing; sync() checkpoints, for the caller's fsync.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        with self._tx() as tx:
            tx.execute("INSERT OR IGNORE INTO meta(name, value) VALUES ('id', ?)", (uuid.uuid4().hex,))
        self.id: str = self.conn.execute("SELECT value FROM meta WHERE name = 'id'").fetchone()[0]
        self.seq: int = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        self.touched: dict[bytes, int] = {}  # content writes of this process: path -> seq
        self.collect_garbage()

    def close(self) -> None:
        self.conn.close()

    def sync(self) -> None:
        """Make every committed change durable against a crash of the machine."""
        self.conn.execute("PRAGMA wal_checkpoint(FULL)")

    def collect_garbage(self) -> list[int]:
        """Delete content files no entry refers to (a crash between making one and recording it,
        or between a removal and the last close of a handle on it). Only at open: nothing is
        open yet."""
        referenced = {row[0] for row in self.conn.execute("SELECT data FROM entries WHERE data IS NOT NULL")}
        freed = []
        for item in self.data_root.iterdir():
            if item.name.isdigit() and int(item.name) not in referenced:
                item.unlink(missing_ok=True)
                freed.append(int(item.name))
        return freed

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk at COMMIT): a second ROLLBACK would
            # fail and hide the error that matters (SQLITE_FULL, which the caller gets as ENOSPC).
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    # --- reading ---

    def entry(self, path: bytes) -> OverlayEntry | None:
        row = self.conn.execute("SELECT * FROM entries WHERE path = ?", (path,)).fetchone()
        return _entry(row) if row is not None else None

    def children(self, directory: bytes) -> dict[bytes, OverlayEntry]:
        """The overlay's direct entries in `directory`, whiteouts included, by name."""
        rows = self.conn.execute("SELECT * FROM entries WHERE parent = ? ORDER BY path", (directory,))
        return {entry.name: entry for entry in map(_entry, rows)}

    def entries_by_kind(self) -> list[tuple[bytes, EntryKind]]:
        """Every path the overlay holds, with its kind: the only paths whose state may differ
        from the base."""
        return [(row[0], EntryKind(row[1])) for row in self.conn.execute("SELECT path, kind FROM entries ORDER BY path")]

    def dirty_paths(self) -> list[bytes]:
        return [path for path, _ in self.entries_by_kind()]

    def data_path(self, data: int) -> Path:
        return self.data_root / str(data)

    def changes_since(self, seq: int) -> list[Change]:
        """Every path changed after change number `seq`, content writes of this process included."""
        rows = self.conn.execute("SELECT path, dir FROM changes WHERE seq > ?", (seq,))
        found = {path: bool(directory) for path, directory in rows}
        for path, at in self.touched.items():
            if at > seq:
                found.setdefault(path, False)
        return [Change(path, directory) for path, directory in sorted(found.items())]

    def touch(self, path: bytes) -> None:
        """Number a content write to `path` (kept in memory: a write changes no metadata)."""
        self.seq += 1
        self.touched[path] = self.seq

    def _changed(self, tx: sqlite3.Connection, path: bytes, *, directory: bool = False) -> None:
        self.seq += 1
        tx.execute(
            "INSERT INTO changes(path, seq, dir) VALUES (?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET seq = excluded.seq, dir = MAX(dir, excluded.dir)",
            (path, self.seq, int(directory)),
        )

    # --- writing ---

    def new_data(self) -> int:
        """A new, empty content file (0600); its id."""
        with self._tx() as tx:
            row = tx.execute(
                "INSERT INTO counters(name, value) VALUES ('data', 1) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value"
            ).fetchone()
        data = int(row[0])
        fd = os.open(self.data_path(data), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        return data

    def put(self, entry: OverlayEntry) -> None:
        """Record `entry`, replacing what the overlay held at its path."""
        with self._tx() as tx:
            _put(tx, entry)
            self._changed(tx, entry.path)

    def remove(self, path: bytes, *, in_base: bool, mtime_ns: int) -> list[int]:
        """Remove `path` (and all under it): a whiteout if the base has it, nothing otherwise.
        Returns the content files no entry refers to any more (the caller frees them once no
        handle holds them open)."""
        with self._tx() as tx:
            freed = _delete_tree(tx, path)
            if in_base:
                _put(tx, OverlayEntry(path, EntryKind.WHITEOUT, 0, mtime_ns))
            self._changed(tx, path, directory=True)
        return freed

    def rename(self, old: bytes, new: bytes, *, moved: OverlayEntry, old_in_base: bool, mtime_ns: int) -> list[int]:
        """Move `old` (and every entry under it) to `new`, replacing what stood there.

        `moved` is the entry to record at `new`, made by the caller from what `old` shows: a
        base file or directory is recorded by reference (base_oid or base_tree) and nothing is
        copied; a directory must carry its base tree or be opaque, or the base at `new` would
        show through it. The old path gets a whiteout if the base has it. Returns the content
        files freed by what the rename replaced."""
        with self._tx() as tx:
            freed = _delete_tree(tx, new)
            lo, hi = _under(old)
            tx.execute(
                # || makes text of blobs: cast back, or the moved paths would no longer match.
                "UPDATE entries SET path = CAST(? || substr(path, ?) AS BLOB), "
                "parent = CAST(? || substr(parent, ?) AS BLOB) WHERE path >= ? AND path < ?",
                (new, len(old) + 1, new, len(old) + 1, lo, hi),
            )
            tx.execute("DELETE FROM entries WHERE path = ?", (old,))
            _put(tx, replace(moved, path=new))
            if old_in_base:
                _put(tx, OverlayEntry(old, EntryKind.WHITEOUT, 0, mtime_ns))
            self._changed(tx, old, directory=True)
            self._changed(tx, new, directory=True)
        return freed

    def move_base(self, put: list[OverlayEntry], delete: list[bytes], state: dict[str, str]) -> list[int]:
        """Rewrite entries for a new base (reconcile.py) and record it (`state`), in one
        transaction: a crash leaves the overlay against the old base or the new, never between.
        Changes nothing a reader sees, so no change is numbered. Returns the content files freed."""
        with self._tx() as tx:
            before = {row[0] for row in tx.execute("SELECT data FROM entries WHERE data IS NOT NULL")}
            for path in delete:
                tx.execute("DELETE FROM entries WHERE path = ?", (path,))
            for entry in put:
                _put(tx, entry)
            after = {row[0] for row in tx.execute("SELECT data FROM entries WHERE data IS NOT NULL")}
            _set_state(tx, state)
        return sorted(before - after)

    def state(self, name: str) -> str | None:
        """A value recorded with the entries (the base they are against: see TreeFS.show)."""
        row = self.conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row is not None else None

    def set_state(self, state: dict[str, str]) -> None:
        with self._tx() as tx:
            _set_state(tx, state)

    def unreferenced(self, data: int) -> bool:
        return self.conn.execute("SELECT 1 FROM entries WHERE data = ?", (data,)).fetchone() is None

    def free(self, data: int) -> None:
        """Delete a content file no entry refers to (and no handle holds open any more)."""
        if self.unreferenced(data):
            self.data_path(data).unlink(missing_ok=True)


def _entry(row: sqlite3.Row | tuple) -> OverlayEntry:  # type: ignore[type-arg]
    path, _parent, kind, mode, mtime_ns, data, base_oid, base_tree, target, opaque = tuple(row)
    return OverlayEntry(path, EntryKind(kind), mode, mtime_ns, data, base_oid, base_tree, target, bool(opaque))


def _put(tx: sqlite3.Connection, entry: OverlayEntry) -> None:
    tx.execute(
        "INSERT OR REPLACE INTO entries(path, parent, kind, mode, mtime_ns, data, base_oid, base_tree, target, opaque) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (entry.path, parent_of(entry.path), entry.kind.value, entry.mode, entry.mtime_ns, entry.data,
         entry.base_oid, entry.base_tree, entry.target, int(entry.opaque)),
    )  # fmt: skip


def _set_state(tx: sqlite3.Connection, state: dict[str, str]) -> None:
    tx.executemany("INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", list(state.items()))


def _delete_tree(tx: sqlite3.Connection, path: bytes) -> list[int]:
    """Delete the entry at `path` and every entry under it; return the content files they held."""
    lo, hi = _under(path)
    where = "path = ? OR (path >= ? AND path < ?)"
    held = [row[0] for row in tx.execute(f"SELECT data FROM entries WHERE ({where}) AND data IS NOT NULL", (path, lo, hi))]
    tx.execute(f"DELETE FROM entries WHERE {where}", (path, lo, hi))
    return [data for data in held if tx.execute("SELECT 1 FROM entries WHERE data = ?", (data,)).fetchone() is None]
