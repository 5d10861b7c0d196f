"""Batched blob hydration for a mount.

Git's own lazy fetch costs one fetch transaction per missing object. Here every read that misses
joins the next batch: a short window lets concurrent misses gather, then one `git fetch --stdin`
brings them all. Two readers of the same blob share one fetch; a blob already present never
touches the network.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from .gitstore import batch_fetch_command, classify_git_error, git_env
from .model import BlobFetchFailed

log = logging.getLogger(__name__)


@dataclass
class FetchStats:
    transactions: int = 0
    objects: int = 0
    seconds: float = 0.0
    failures: int = 0


class _Pending:
    """One object some reader waits for; `error` is set if its batch failed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


class Hydrator:
    def __init__(
        self,
        git_dir: Path,
        exists: Callable[[str], bool],
        *,
        window: float = 0.003,
        max_batch: int = 20000,
        credential_env: dict[str, str] | None = None,
        on_batch: Callable[[FetchStats], None] | None = None,
    ) -> None:
        self.git_dir = git_dir
        self._exists = exists
        # What the object store is known to hold. A lookup that misses makes libgit2 rescan the
        # pack directory, which grows by one pack per batch: ask it again about an object only
        # after a batch may have brought it.
        self._present: set[str] = set()
        self._absent: dict[str, int] = {}  # oid -> batch generation in which it was missing
        self._generation = 0
        self.window = window
        self.max_batch = max_batch
        self.env = credential_env if credential_env is not None else git_env()
        self.on_batch = on_batch
        self.stats = FetchStats()
        self._queued: dict[str, _Pending] = {}  # waiting for the next batch
        self._in_flight: dict[str, _Pending] = {}  # in the batch being fetched now
        self._wakeup = trio.Event()

    def is_present(self, oid: str) -> bool:
        if oid in self._present:
            return True
        if self._absent.get(oid) == self._generation:
            return False
        if self._exists(oid):
            self._present.add(oid)
            self._absent.pop(oid, None)
            return True
        self._absent[oid] = self._generation
        return False

    def is_pending(self, oid: str) -> bool:
        """Whether `oid` is queued for, or in, a batch already."""
        return oid in self._queued or oid in self._in_flight

    async def run(self) -> None:
        """The batch loop: runs for the life of the mount."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            # Let concurrent misses (parallel readers, a listed directory) join this batch.
            await trio.sleep(self.window)
            while self._queued:
                oids = list(self._queued)[: self.max_batch]
                batch = {oid: self._queued.pop(oid) for oid in oids}
                self._in_flight.update(batch)
                try:
                    await self._fetch(batch)
                finally:
                    for oid, pending in batch.items():
                        self._in_flight.pop(oid, None)
                        pending.done.set()

    async def ensure(self, oids: Iterable[str]) -> None:
        """Return once every object in `oids` is present locally; raise BlobFetchFailed if not."""
        waits: list[tuple[str, _Pending]] = []
        for oid in oids:
            pending = self._in_flight.get(oid) or self._queued.get(oid)
            if pending is None:
                if self.is_present(oid):
                    continue
                pending = self._queued[oid] = _Pending()
                self._wakeup.set()
            waits.append((oid, pending))
        for oid, pending in waits:
            await pending.done.wait()
            if pending.error is not None:
                raise BlobFetchFailed(f"could not fetch {oid}: {pending.error}")

    async def _fetch(self, batch: dict[str, _Pending]) -> None:
        started = time.monotonic()
        payload = "".join(f"{oid}\n" for oid in batch).encode()
        error: str | None = None
        try:
            proc = await trio.run_process(
                batch_fetch_command(self.git_dir), stdin=payload, capture_stdout=True, capture_stderr=True,
                check=False, env=self.env,
            )  # fmt: skip
            if proc.returncode != 0:
                error = str(classify_git_error(["fetch"], proc.stderr))
        except OSError as exc:
            error = f"could not run git: {exc}"
        elapsed = time.monotonic() - started
        self._generation += 1  # what was missing may be here now
        self.stats.transactions += 1
        self.stats.objects += len(batch)
        self.stats.seconds += elapsed
        if error is not None:
            self.stats.failures += 1
            log.warning("batch fetch of %d objects failed after %.2fs: %s", len(batch), elapsed, error)
        else:
            log.info("fetched %d objects in one transaction in %.3fs", len(batch), elapsed)
        for oid, pending in batch.items():
            if error is not None or not self.is_present(oid):
                pending.error = error or "the remote did not send it"
        if self.on_batch is not None:
            self.on_batch(self.stats)
