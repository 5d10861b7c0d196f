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

    def missing_among(self, oids: list[str]) -> list[str]:
        """Those of `oids` the object store does not hold."""
        odb = self.odb()
        return [oid for oid in oids if not odb.exists(oid)]
