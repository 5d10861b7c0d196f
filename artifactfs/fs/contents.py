"""The contents of present blobs, as reads want them.

Inflating a blob is work: done on the event loop, a large one stops every other operation of the
mount for as long as it takes, and held in memory, a few large ones outgrow the machine. So:

- a blob up to LARGE_BLOB_BYTES is inflated in a worker thread (with a repository object of that
  thread's own: libgit2's objects are not shared between threads) and kept in a cache bounded in
  bytes, not entries. The trip to the thread and back costs more than inflating a small file, and
  a walk (grep -r, tar, an indexer) reads a directory's files one after another: so the blobs the
  caller names as next (the files after it in its directory) are inflated in the same trip, up to
  ALONG_BYTES, and the reads that follow find them in the cache;
- a larger one is written once, by `git cat-file`, to a spool file beside the overlay, and read
  from there: the mount process never holds it, whatever its size.

Sizes come from object headers elsewhere (TreeFS._header_size): a stat inflates nothing.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from ..model import ObjectMissing
from .odb import ThreadOdb

log = logging.getLogger(__name__)

LARGE_BLOB_BYTES = 8 * 1024 * 1024  # above this a blob is read from a spool file
CACHE_BYTES = 64 * 1024 * 1024  # small blobs kept inflated, in all
OPEN_SPOOLS = 16  # spool files kept open for reads
ALONG_BYTES = 1024 * 1024  # inflated beside a missed blob, ahead of the reads of a walk
ALONG_BLOBS = 64


class Contents:
    def __init__(self, git_dir: Path, spool_dir: Path, env: dict[str, str]) -> None:
        self.git_dir = git_dir
        self.spool_dir = spool_dir
        self.env = env
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._spooling: dict[str, trio.Event] = {}
        self._open: OrderedDict[str, int] = OrderedDict()  # oid -> fd of its spool file
        self._odb = ThreadOdb(git_dir)
        # What an earlier process spooled may be from a git directory since replaced: start empty.
        shutil.rmtree(spool_dir, ignore_errors=True)

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    async def read(self, oid: str, size: int, off: int, length: int, along: Callable[[], Iterable[str]] = tuple) -> bytes:
        """`length` bytes at `off` of present blob `oid`, whose size is `size`; `along` names the
        blobs likely read next, worth inflating in the same trip if `oid` is not cached."""
        if size > LARGE_BLOB_BYTES:
            fd = await self._spool_fd(oid)
            return os.pread(fd, length, off)
        return (await self.whole(oid, along))[off : off + length]

    async def whole(self, oid: str, along: Callable[[], Iterable[str]] = tuple) -> bytes:
        """The content of a present blob that is not large (a symbolic link's target, a small file)."""
        data = self._cache.get(oid)
        if data is not None:
            self._cache.move_to_end(oid)
            return data
        ahead = [o for o in itertools.islice(along(), ALONG_BLOBS) if o != oid and o not in self._cache]
        data, more = await trio.to_thread.run_sync(self._inflate, oid, ahead)
        for other, content in more.items():
            self._keep(other, content)
        self._keep(oid, data)
        return data

    def _keep(self, oid: str, data: bytes) -> None:
        if len(data) > CACHE_BYTES // 8:  # one blob never crowds out the whole cache
            return
        if oid in self._cache:
            self._cached_bytes -= len(self._cache.pop(oid))
        self._cache[oid] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > CACHE_BYTES:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= len(dropped)

    async def copy_to(self, oid: str, size: int, dest: Path) -> None:
        """Write present blob `oid` into file `dest` (a copy-up), never holding a large one."""
        if size > LARGE_BLOB_BYTES:
            source = await self._spool(oid)
            await trio.to_thread.run_sync(shutil.copyfile, source, dest)
        else:
            data = await self.whole(oid)
            await trio.to_thread.run_sync(dest.write_bytes, data)

    def _inflate(self, oid: str, ahead: list[str]) -> tuple[bytes, dict[str, bytes]]:
        """In a worker thread: the blob's content, read with that thread's repository object, and
        those of `ahead` that are here and small, up to ALONG_BYTES in all."""
        odb = self._odb.odb()
        try:
            data = odb.read(oid)[1]
        except KeyError:
            raise ObjectMissing.of(oid) from None
        more: dict[str, bytes] = {}
        budget = ALONG_BYTES
        for other in ahead:
            try:
                _, size = odb.read_header(other)
                if size > budget:
                    break
                more[other] = odb.read(other)[1]
            except KeyError:
                continue  # not here (yet): its own read will fetch it
            budget -= size
        return data, more

    async def _spool_fd(self, oid: str) -> int:
        fd = self._open.get(oid)
        if fd is not None:
            self._open.move_to_end(oid)
            return fd
        fd = os.open(await self._spool(oid), os.O_RDONLY | os.O_CLOEXEC)
        self._open[oid] = fd
        while len(self._open) > OPEN_SPOOLS:
            os.close(self._open.popitem(last=False)[1])
        return fd

    async def _spool(self, oid: str) -> Path:
        """The spool file of blob `oid`, written by git (streaming) the first time it is wanted."""
        path = self.spool_dir / oid
        while True:
            if path.exists():
                return path
            writing = self._spooling.get(oid)
            if writing is None:
                break
            await writing.wait()  # another reader is spooling it
        done = self._spooling[oid] = trio.Event()
        try:
            self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{oid}.tmp")
            with open(tmp, "wb") as out:
                proc = await trio.run_process(
                    ["git", f"--git-dir={self.git_dir}", "cat-file", "blob", oid],
                    stdout=out, capture_stderr=True, check=False, env=self.env,
                )  # fmt: skip
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise ObjectMissing(f"could not spool {oid}: {proc.stderr.decode(errors='replace').strip()}")
            os.replace(tmp, path)
            log.info("spooled blob %s (%d bytes)", oid, path.stat().st_size)
            return path
        finally:
            del self._spooling[oid]
            done.set()
