"""Pack indexes, read directly: which objects came from the promisor remote.

A pack fetched from a promisor remote has a `.promisor` file beside it. Git treats every object of
such a pack, and every object those objects name, as promised: the remote will send it on demand.
"""
from __future__ import annotations

import struct
from pathlib import Path

IDX_MAGIC = b"\xfftOc"
FANOUT_ENTRIES = 256


def promisor_packs(git_dir: Path) -> list[Path]:
    """The .idx files of the promisor packs of `git_dir`."""
    pack_dir = git_dir / "objects" / "pack"
    return sorted(p.with_suffix(".idx") for p in pack_dir.glob("pack-*.promisor") if p.with_suffix(".idx").is_file())


def pack_object_ids(idx: Path, hash_size: int) -> list[str]:
    """Every object id a version-2 pack index lists (git has written no other since 2008)."""
    data = idx.read_bytes()
    if data[:4] != IDX_MAGIC or struct.unpack(">I", data[4:8])[0] != 2:
        raise ValueError(f"{idx}: not a version 2 pack index")
    start = 8 + 4 * FANOUT_ENTRIES
    count = struct.unpack(">I", data[start - 4:start])[0]
    return [data[i:i + hash_size].hex() for i in range(start, start + count * hash_size, hash_size)]


def promisor_objects(git_dir: Path, hash_size: int = 20) -> frozenset[str]:
    """The ids of every object in a promisor pack of `git_dir`."""
    found: set[str] = set()
    for idx in promisor_packs(git_dir):
        found.update(pack_object_ids(idx, hash_size))
    return frozenset(found)
