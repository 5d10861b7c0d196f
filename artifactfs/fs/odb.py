"""The object store off the event loop: one pygit2 repository object per worker thread.

What takes long (inflating a blob, asking about thousands of objects after a batch) runs in trio's
worker threads so that the FUSE loop keeps answering. Each thread opens the git directory once,
for itself: the event loop's own repository object is never shared with a worker.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pygit2


class ThreadOdb:
    def __init__(self, git_dir: Path) -> None:
        self.git_dir = git_dir
        self._threads = threading.local()

    def odb(self) -> pygit2.Odb:
        """The calling thread's object database of the git directory."""
        repo = getattr(self._threads, "repo", None)
        if repo is None:
            repo = self._threads.repo = pygit2.Repository(str(self.git_dir))
        return repo.odb

    def arrived(self, oids: list[str]) -> tuple[list[str], int]:
        """Those of `oids` the object store does not hold, and the size of those it holds (their
        headers alone are read: what a fetch brought is counted without inflating it)."""
        odb = self.odb()
        missing, size = [], 0
        for oid in oids:
            try:
                size += odb.read_header(oid)[1]
            except KeyError:
                missing.append(oid)
        return missing, size
