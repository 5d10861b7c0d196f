"""Batched blob hydration for a mount.

Git's own lazy fetch costs one fetch transaction per missing object. Here every read that misses
joins the next batch: a short window lets concurrent misses gather, then one `git fetch --stdin`
brings them all. Two readers of the same blob share one fetch; a blob already present never
touches the network.

Two lanes: what a reader waits for goes in small urgent batches, one at a time; what nobody
waits for yet (a walk's subtree, the rest of the commit) goes in large bulk batches, several of
which may be in flight beside it. A read never waits behind a bulk batch, unless the batch is
its own process's walk: that reader wants the whole batch anyway.

No read waits forever on the network: a batch that outlives the fetch deadline is killed, git
and every process it started (a remote helper holding the connection), and its readers get an
error. A reader waits on behalf of a caller whose signals end its wait (gate.wait_for); the batch
goes on for the readers still waiting.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from ..gitstore import (
    CONSOLIDATE_ARGS,
    PACK_GRACE_SECONDS,
    batch_fetch_command,
    classify_git_error,
    git_env,
    pack_count,
    remove_abandoned_packs,
    temporary_packs,
)
from ..metrics import observe_fetch
from ..model import BlobFetchFailed
from ..procs import in_background
from .gate import wait_for
from .odb import ThreadOdb

log = logging.getLogger(__name__)


@dataclass
class FetchStats:
    transactions: int = 0
    objects: int = 0
    seconds: float = 0.0
    failures: int = 0


class Lane(enum.Enum):
    URGENT = "urgent"  # a reader waits for it
    BULK = "bulk"  # queued ahead of need: a walk's subtree, the rest of the commit


class _Pending:
    """One object in a lane; `error` is set if its batch failed; `owner` is the process whose
    walk queued it (bulk only)."""

    __slots__ = ("done", "error", "owner")

    def __init__(self, owner: int | None = None) -> None:
        self.done = trio.Event()
        self.error: str | None = None
        self.owner = owner


class Hydrator:
    def __init__(
        self,
        git_dir: Path,
        exists: Callable[[str], bool],
        *,
        fetch_timeout: float,
        window: float = 0.003,
        max_batch: int = 20000,
        concurrency: int = 2,
        pack_limit: int = 50,
        credential_env: dict[str, str] | None = None,
        on_batch: Callable[[FetchStats], None] | None = None,
        own_git_dir: bool = True,
    ) -> None:
        self.git_dir = git_dir
        # A prepared git dir is its owner's: their git may be at work in it, so what a failed
        # fetch leaves there is theirs to judge, not ours to remove.
        self.own_git_dir = own_git_dir
        self._exists = exists
        # What the object store is known to hold. A lookup that misses makes libgit2 rescan the
        # pack directory, which grows by one pack per batch: ask it again about an object only
        # after a batch may have brought it.
        self._present: set[str] = set()
        self._absent: set[str] = set()  # found missing since the last batch
        self._odb = ThreadOdb(git_dir)  # what a batch brought is checked off the event loop
        self.fetch_timeout = fetch_timeout  # seconds a batch may take (ARTIFACTFS_FETCH_TIMEOUT)
        self.window = window
        self.max_batch = max_batch
        self.env = credential_env if credential_env is not None else git_env()
        self.on_batch = on_batch
        self.stats = FetchStats()
        # Transactions in flight at most: one urgent, the rest bulk (ARTIFACTFS_FETCH_CONCURRENCY).
        self.concurrency = max(2, concurrency)
        self._queued: dict[Lane, dict[str, _Pending]] = {lane: {} for lane in Lane}  # for the next batch
        self._in_flight: dict[Lane, dict[str, _Pending]] = {lane: {} for lane in Lane}  # being fetched
        self._wakeup = {lane: trio.Event() for lane in Lane}
        self._nursery: trio.Nursery | None = None  # run()'s: cleanups after failed fetches
        # Past this many packs the git directory is consolidated (ARTIFACTFS_PACK_LIMIT): every
        # lookup that misses scans them all, and each batch adds one.
        self.pack_limit = pack_limit
        self._consolidating = False
        self.consolidations = 0

    def is_present(self, oid: str) -> bool:
        if oid in self._present:
            return True
        if oid in self._absent:
            return False
        if self._exists(oid):
            self._present.add(oid)
            return True
        self._absent.add(oid)
        return False

    def known_present(self, oid: str) -> bool:
        """Whether `oid` is known to be here, without asking the object store (a miss there
        rescans the pack directory: too dear for every entry of a directory listing)."""
        return oid in self._present

    def is_pending(self, oid: str) -> bool:
        """Whether `oid` is queued for, or in, a batch already."""
        return self._pending(oid) is not None

    def _pending(self, oid: str) -> _Pending | None:
        """What `oid` is queued or in flight as, in any lane."""
        for lanes in (self._queued, self._in_flight):
            for pending in lanes.values():
                if oid in pending:
                    return pending[oid]
        return None

    async def run(self) -> None:
        """The batch loops, one urgent and the rest bulk: they run for the life of the mount."""
        async with trio.open_nursery() as self._nursery:
            self._nursery.start_soon(self._batches, Lane.URGENT)
            for _ in range(self.concurrency - 1):
                self._nursery.start_soon(self._batches, Lane.BULK)

    async def _batches(self, lane: Lane) -> None:
        queued, in_flight = self._queued[lane], self._in_flight[lane]
        while True:
            await self._wakeup[lane].wait()
            self._wakeup[lane] = trio.Event()
            # Let concurrent misses (parallel readers, a listed directory) join this batch.
            await trio.sleep(self.window)
            while queued:
                oids = list(queued)[: self.max_batch]
                batch = {oid: queued.pop(oid) for oid in oids}
                in_flight.update(batch)
                try:
                    await self._fetch(batch, lane)
                except Exception as exc:  # a git dir gone, a full disk: it costs this batch, not the mount
                    log.error("batch fetch of %d objects failed: %s: %s", len(batch), type(exc).__name__, exc)
                    for pending in batch.values():
                        pending.error = pending.error or f"{type(exc).__name__}: {exc}"
                finally:
                    for oid, pending in batch.items():
                        if in_flight.get(oid) is pending:
                            del in_flight[oid]
                        pending.done.set()

    def _queue(self, lane: Lane, oid: str, pending: _Pending) -> _Pending:
        self._queued[lane][oid] = pending
        self._wakeup[lane].set()
        return pending

    def _urgent_wait(self, oid: str, owner: int | None) -> _Pending | None:
        """What a reader of `oid` waits on (None: it is here). A bulk batch is waited for only
        by the process whose walk queued it; anyone else has the object fetched urgently."""
        pending = self._in_flight[Lane.URGENT].get(oid) or self._queued[Lane.URGENT].get(oid)
        if pending is not None:
            return pending
        for bulk in (self._in_flight[Lane.BULK], self._queued[Lane.BULK]):
            pending = bulk.get(oid)
            if pending is not None and owner is not None and pending.owner == owner:
                return pending
        queued = self._queued[Lane.BULK].pop(oid, None)
        if queued is not None:  # not on its way yet: it goes now, and its bulk waiters with it
            return self._queue(Lane.URGENT, oid, queued)
        if self.is_present(oid):  # (an urgent fetch may have brought one a bulk batch still has in flight)
            return None
        return self._queue(Lane.URGENT, oid, _Pending())

    async def ensure(self, oids: Iterable[str], caller_tid: int | None = None, *, owner: int | None = None) -> None:
        """Return once every object in `oids` is present locally; raise BlobFetchFailed if not.
        `owner` is the reader's process (see _urgent_wait).

        The wait is on behalf of thread `caller_tid` (see gate.wait_for): a signal to it raises
        FUSEError(EINTR) at once, and the batch goes on without it."""
        waits: list[tuple[str, _Pending]] = []
        for oid in oids:
            pending = self._urgent_wait(oid, owner)
            if pending is not None:
                waits.append((oid, pending))
        for oid, pending in waits:
            await wait_for(pending.done, caller_tid)
            if pending.error is not None:
                raise BlobFetchFailed(f"could not fetch {oid}: {pending.error}")

    def prefetch(self, oids: Iterable[str], owner: int | None = None) -> int:
        """Queue `oids`, known to be missing, for the next batch without waiting for them (a
        walk's subtree, the rest of the commit): nobody waits, and asking the object store about
        each first would cost a rescan of the pack directory per object. Returns how many were
        queued."""
        _, queued = self._bulk(oids, owner)
        return queued

    def _bulk(self, oids: Iterable[str], owner: int | None = None) -> tuple[dict[str, _Pending], int]:
        """Queue in the bulk lane those of `oids` that are neither here nor on their way; return
        what each one not here waits on (queued now or before), and how many were queued now."""
        waits: dict[str, _Pending] = {}
        queued = 0
        for oid in oids:
            pending = self._pending(oid)
            if pending is None:
                if oid in self._present:
                    continue
                pending = self._queue(Lane.BULK, oid, _Pending(owner))
                queued += 1
            waits[oid] = pending
        return waits, queued

    async def missing_under(self, tree: str, *, background: bool = False) -> list[str]:
        """The blobs under `tree` that are not here, from git itself (one process, off the event
        loop, fetching nothing; at a lower priority in the `background`); [] if git cannot tell."""
        command = ["git", f"--git-dir={self.git_dir}", "rev-list", "--objects", "--missing=print", tree]
        proc = await trio.run_process(
            in_background(command) if background else command,
            capture_stdout=True, capture_stderr=True, check=False, env=self.env,
        )  # fmt: skip
        if proc.returncode != 0:
            log.warning("could not list what is missing under %s: %s", tree, proc.stderr.decode(errors="replace").strip())
            return []
        return [line[1:] for line in proc.stdout.decode().splitlines() if line.startswith("?")]

    async def fetch_bulk(self, oids: list[str]) -> set[str]:
        """Fetch `oids`, known to be missing, in the bulk lane and wait for them (the backfill);
        returns those that could not be fetched."""
        failed = set()
        waits, _ = self._bulk(oids)
        for oid, pending in waits.items():
            await pending.done.wait()
            if pending.error is not None:
                failed.add(oid)
        return failed

    async def sizes(self, oids: list[str]) -> dict[str, int]:
        """The sizes of present objects, from their headers, by one git process off the event loop
        (objects that are not here are left out)."""
        if not oids:
            return {}
        proc = await trio.run_process(
            ["git", f"--git-dir={self.git_dir}", "cat-file", "--batch-check=%(objectname) %(objectsize)"],
            stdin="".join(f"{oid}\n" for oid in oids).encode(), capture_stdout=True, capture_stderr=True,
            check=False, env=self.env,
        )  # fmt: skip
        found: dict[str, int] = {}
        for line in proc.stdout.decode().splitlines():
            oid, _, size = line.partition(" ")
            if size.isdigit():
                found[oid] = int(size)
        return found

    async def _fetch(self, batch: dict[str, _Pending], lane: Lane) -> None:
        started = time.monotonic()
        # Only a batch nobody waits for (the backfill's alone: a walk waits for its own) yields the cores.
        background = lane is Lane.BULK and all(pending.owner is None for pending in batch.values())
        error = await self._run_fetch("".join(f"{oid}\n" for oid in batch).encode(), background=background)
        elapsed = time.monotonic() - started
        if error is not None and self.own_git_dir:
            # git is gone (failed or killed with its group): a temporary pack it began is waste,
            # and on a full disk it holds the very space the next fetch needs.
            assert self._nursery is not None
            # Only a failure looks at the pack directory: a batch that succeeds costs no glob.
            self._nursery.start_soon(self._remove_left_packs, temporary_packs(self.git_dir))
        self._absent.clear()  # what was missing may be here now
        self.stats.transactions += 1
        self.stats.objects += len(batch)
        self.stats.seconds += elapsed
        if error is not None:
            self.stats.failures += 1
            log.warning("batch fetch of %d objects failed after %.2fs: %s", len(batch), elapsed, error)
        else:
            log.info("fetched %d objects in one %s transaction in %.3fs", len(batch), lane.value, elapsed)
        # Whether the remote sent every object: asked in a worker thread, since a bulk batch holds
        # thousands, and the FUSE loop answers meanwhile.
        missing, size = set(batch), 0
        if error is None:
            absent, size = await trio.to_thread.run_sync(self._odb.arrived, list(batch))
            missing = set(absent)
        observe_fetch(lane.value, error is None, elapsed, len(batch) - len(missing), size)
        for oid, pending in batch.items():
            if oid in missing:
                pending.error = error or "the remote did not send it"
            else:
                self._present.add(oid)
        if self.on_batch is not None:
            self.on_batch(self.stats)
        if error is None and self.own_git_dir and not self._consolidating and pack_count(self.git_dir) > self.pack_limit:
            assert self._nursery is not None
            self._consolidating = True
            self._nursery.start_soon(self._consolidate)

    async def _consolidate(self) -> None:
        """Repack the git directory into a few packs, beside the mount at work: git writes the
        new pack before it removes the old ones, so every object stays readable (libgit2 looks
        again when an object is not where it was). Only in a git directory of ours (a prepared
        one is its owner's to maintain)."""
        try:
            before = pack_count(self.git_dir)
            started = time.monotonic()
            proc = await trio.run_process(
                in_background(["git", f"--git-dir={self.git_dir}", *CONSOLIDATE_ARGS]), capture_stdout=True, capture_stderr=True,
                check=False, env=self.env, start_new_session=True, deliver_cancel=_kill_group,
            )  # fmt: skip
            if proc.returncode != 0:
                log.warning("could not consolidate %d packs: %s", before, proc.stderr.decode(errors="replace").strip())
                return
            self.consolidations += 1
            log.info("consolidated %d packs into %d in %.2fs", before, pack_count(self.git_dir), time.monotonic() - started)
        except Exception as exc:  # consolidation is a help, never a reason to end the mount
            log.warning("could not consolidate packs: %s: %s", type(exc).__name__, exc)
        finally:
            self._consolidating = False

    async def _remove_left_packs(self, left: set[Path]) -> None:
        """Remove what a failed fetch left in the pack directory, once the grace period that
        tells it from a fetch at work has passed (see gitstore.remove_abandoned_packs)."""
        if not left:
            return
        try:
            await trio.sleep(PACK_GRACE_SECONDS)
            removed = await trio.to_thread.run_sync(remove_abandoned_packs, self.git_dir, left)
        except Exception as exc:  # a cleanup that fails costs the cleanup, never the mount
            log.warning("could not remove the temporary packs of a failed fetch: %s", exc)
            return
        if removed:
            log.info("removed %d temporary pack files a failed fetch left", len(removed))

    async def _run_fetch(self, payload: bytes, *, background: bool) -> str | None:
        """Run one `git fetch --stdin` (at a lower priority in the `background`); return what went
        wrong, or None.

        git runs in a process group of its own, so that at the deadline the whole group is
        killed: git, and the remote helper or index-pack it started, which would otherwise hold
        the connection (and the pipes run_process reads) open."""
        with trio.move_on_after(self.fetch_timeout):
            try:
                command = batch_fetch_command(self.git_dir)
                proc = await trio.run_process(
                    in_background(command) if background else command, stdin=payload, capture_stdout=True, capture_stderr=True,
                    check=False, env=self.env, start_new_session=True, deliver_cancel=_kill_group,
                )  # fmt: skip
            except OSError as exc:
                return f"could not run git: {exc}"
            if proc.returncode != 0:
                return str(classify_git_error(["fetch"], proc.stderr))
            return None
        return f"timed out after {self.fetch_timeout:g}s (ARTIFACTFS_FETCH_TIMEOUT); git was killed"


async def _kill_group(proc: trio.Process) -> None:
    """How run_process stops a fetch it was cancelled in: SIGKILL to its whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
