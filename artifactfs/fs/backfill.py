"""Backfill: what is still missing at the commit shown, fetched in the background.

A mount hydrates what is read. Once a repository is in use, most of what is missing will be
wanted sooner or later (a build, a search, an indexer), and fetching it in a few large batches
costs a fraction of what the same blobs cost one directory at a time. The backfill fetches the
missing blobs of the commit shown, in priority order (manifests and sources first, large
binaries last), in bulk batches one after another. Reads never wait for it: they go in the
hydrator's urgent lane.

When it starts is a setting (ARTIFACTFS_BACKFILL): at the first read that misses (`used`, the
default), as soon as the repository is ready (`ready`), or never (`never`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import trio

from ..model import BackfillState
from .hydrator import Hydrator

log = logging.getLogger(__name__)

BACKFILL_BATCH = 2000  # blobs per bulk batch: large, yet a walk's batch is never long behind one

# What a build or an agent reads first: the files that say what a project is and how it builds.
MANIFESTS = frozenset({
    "makefile", "gnumakefile", "cmakelists.txt", "meson.build", "build", "build.bazel", "workspace",
    "package.json", "pyproject.toml", "setup.py", "setup.cfg", "requirements.txt", "pipfile",
    "cargo.toml", "go.mod", "go.sum", "pom.xml", "build.gradle", "build.gradle.kts",
    "settings.gradle", "gemfile", "composer.json", "dockerfile", "readme", "readme.md",
    ".gitignore", ".gitattributes", ".gitmodules", ".editorconfig", "tsconfig.json",
})  # fmt: skip
SOURCE = frozenset({
    ".c", ".h", ".cc", ".cpp", ".cxx", ".hh", ".hpp", ".py", ".pyi", ".js", ".jsx", ".ts", ".tsx",
    ".mjs", ".go", ".rs", ".java", ".kt", ".scala", ".rb", ".php", ".cs", ".swift", ".m", ".mm",
    ".sh", ".bash", ".pl", ".lua", ".sql", ".proto", ".thrift", ".vue", ".svelte", ".css", ".scss",
    ".html", ".el", ".ex", ".exs", ".erl", ".hs", ".ml", ".clj", ".dart", ".zig", ".nim", ".s",
})  # fmt: skip
TEXT = frozenset({
    ".md", ".rst", ".txt", ".json", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".xml",
    ".csv", ".lock", ".mk", ".cmake", ".bzl", ".gradle", ".properties", ".in", ".tmpl", ".j2",
})  # fmt: skip
BINARY = frozenset({
    ".png", ".jpg", ".jpeg", ".gif", ".webp", ".ico", ".bmp", ".tif", ".tiff", ".psd", ".pdf",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".tar", ".jar", ".war", ".whl", ".so",
    ".dll", ".dylib", ".a", ".o", ".exe", ".bin", ".dat", ".db", ".sqlite", ".iso", ".img",
    ".mp3", ".mp4", ".mov", ".avi", ".wav", ".flac", ".ogg", ".woff", ".woff2", ".ttf", ".otf",
    ".onnx", ".pt", ".pth", ".h5", ".pb", ".tflite", ".npy", ".npz", ".parquet", ".pkl",
})  # fmt: skip


def priority(path: bytes) -> int:
    """Where a blob goes in the backfill's order: 0 manifests, 1 sources, 2 other text, 3 the
    rest, 4 binaries (the large files a repository has are nearly always among them)."""
    # Bytes and str methods, not PurePosixPath: this runs for every blob of the commit.
    name = path.rpartition(b"/")[2].decode(errors="replace").lower()
    if name in MANIFESTS:
        return 0
    dot = name.rfind(".")
    suffix = name[dot:] if 0 < dot < len(name) - 1 else ""  # as PurePosixPath.suffix has it
    if suffix in SOURCE:
        return 1
    if suffix in TEXT:
        return 2
    if suffix in BINARY:
        return 4
    return 3


def in_order(blobs: dict[str, bytes], missing: set[str]) -> list[str]:
    """The missing ones of `blobs` (id: path), in the order the backfill fetches them."""
    return sorted((oid for oid in blobs if oid in missing), key=lambda oid: (priority(blobs[oid]), blobs[oid]))


@dataclass
class BackfillProgress:
    state: BackfillState
    present: int = 0  # blobs of the commit shown that are here
    total: int = 0  # blobs of the commit shown
    present_bytes: int = 0  # their sizes, summed

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "state": self.state.value}


class Backfill:
    """One backfill of one commit's tree; run() fetches until nothing is missing."""

    def __init__(self, hydrator: Hydrator, tree: str, on_progress: Callable[[BackfillProgress], None]) -> None:
        self.hydrator = hydrator
        self.tree = tree
        self.on_progress = on_progress
        self.progress = BackfillProgress(BackfillState.RUNNING)

    async def run(self) -> None:
        blobs = await self._blobs()
        missing = set(await self.hydrator.missing_under(self.tree, background=True))
        present = [oid for oid in blobs if oid not in missing]
        self.progress.total = len(blobs)
        self.progress.present = len(present)
        self.progress.present_bytes = sum((await self.hydrator.sizes(present)).values())
        self.on_progress(self.progress)
        # Off the event loop: for a large tree the sort takes long enough to hold up the mount's calls.
        order = await trio.to_thread.run_sync(in_order, blobs, missing)
        log.info("backfill of %s: %d of %d blobs missing", self.tree, len(order), len(blobs))
        for start in range(0, len(order), BACKFILL_BATCH):
            chunk = order[start : start + BACKFILL_BATCH]
            failed = await self.hydrator.fetch_bulk(chunk)
            fetched = [oid for oid in chunk if oid not in failed]
            self.progress.present += len(fetched)
            self.progress.present_bytes += sum((await self.hydrator.sizes(fetched)).values())
            self.on_progress(self.progress)
        still = len(await self.hydrator.missing_under(self.tree, background=True))
        self.progress.state = BackfillState.DONE if still == 0 else BackfillState.INCOMPLETE
        self.on_progress(self.progress)
        log.info("backfill of %s ended: %s, %d blobs still missing", self.tree, self.progress.state.value, still)

    async def _blobs(self) -> dict[str, bytes]:
        """Every blob of the tree, by id, with one of its paths (submodules are not blobs)."""
        proc = await trio.run_process(
            ["git", f"--git-dir={self.hydrator.git_dir}", "ls-tree", "-r", "-z", self.tree],
            capture_stdout=True, capture_stderr=True, env=self.hydrator.env,
        )  # fmt: skip
        blobs: dict[str, bytes] = {}
        for record in proc.stdout.split(b"\0"):
            if not record:
                continue
            meta, _, path = record.partition(b"\t")
            _mode, kind, oid = meta.split(b" ")
            if kind == b"blob":
                blobs.setdefault(oid.decode(), path)
        return blobs
