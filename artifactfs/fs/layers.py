"""The merged view: the commit shown (base) under the overlay, resolved path by path.

A path shows what the overlay records for it, if anything (a whiteout hides it); otherwise the
base entry at that path, where "the base" of a directory the overlay renamed is the tree it was
renamed from (its base_tree), and an opaque directory has no base below it. Nothing here reads a
blob: only trees, which a blobless clone has.
"""
from __future__ import annotations

from dataclasses import dataclass

import pygit2

from ..model import ObjectMissing
from .nodes import GIT_MODE_KINDS, Kind
from .overlay import EntryKind, Overlay, OverlayEntry, parent_of

OVERLAY_KINDS = {EntryKind.DIR: Kind.DIR, EntryKind.LINK: Kind.LINK}


class NotADirectory(Exception):
    """A path runs through something that is not a directory (ENOTDIR)."""


@dataclass(frozen=True)
class Shown:
    """What one path shows."""

    path: bytes
    kind: Kind
    oid: str | None  # the base object behind it: a tree for a directory, a blob for a file
    entry: OverlayEntry | None  # the overlay's record, if the overlay holds the path

    @property
    def base_tree(self) -> str | None:
        """The base tree whose entries a directory lists below the overlay's own."""
        return self.oid if self.kind is Kind.DIR else None


def overlay_kind(entry: OverlayEntry) -> Kind:
    if entry.kind is EntryKind.FILE:
        return Kind.EXEC if entry.mode & 0o111 else Kind.FILE
    return OVERLAY_KINDS[entry.kind]


class Layers:
    def __init__(self, repo: pygit2.Repository, root_tree: str, overlay: Overlay) -> None:
        self.repo = repo
        self.root_tree = root_tree
        self.overlay = overlay

    def base_child(self, tree: str | None, name: bytes) -> tuple[Kind, str] | None:
        if tree is None:
            return None
        obj = self.repo.get(tree)
        if not isinstance(obj, pygit2.Tree):
            return None
        try:
            entry = obj[name.decode("utf-8", "surrogateescape")]
        except KeyError:
            return None
        kind = GIT_MODE_KINDS.get(entry.filemode)
        return (kind, str(entry.id)) if kind is not None else None

    def resolve(self, path: bytes) -> Shown | None:
        """What `path` shows, or None if nothing is there; NotADirectory if a component above
        it is a file or a link."""
        shown = Shown(b"", Kind.DIR, self.root_tree, self.overlay.entry(b""))
        if not path:
            return shown
        for name in path.split(b"/"):
            if shown.kind is not Kind.DIR:
                raise NotADirectory(path.decode(errors="replace"))
            child_path = shown.path + b"/" + name if shown.path else name
            found = self._child(shown, child_path, name)
            if found is None:
                return None
            shown = found
        return shown

    def _child(self, parent: Shown, path: bytes, name: bytes) -> Shown | None:
        entry = self.overlay.entry(path)
        if entry is None:
            base = self.base_child(parent.base_tree, name)
            return Shown(path, base[0], base[1], None) if base is not None else None
        return self._from_entry(parent, entry)

    def _from_entry(self, parent: Shown, entry: OverlayEntry) -> Shown | None:
        if entry.kind is EntryKind.WHITEOUT:
            return None
        if entry.kind is EntryKind.DIR:
            if entry.base_tree is not None:
                tree: str | None = entry.base_tree
            elif entry.opaque:
                tree = None
            else:  # made here over nothing, or chmod'ed: whatever the base has at this path
                base = self.base_child(parent.base_tree, entry.name)
                tree = base[1] if base is not None and base[0] is Kind.DIR else None
            return Shown(entry.path, Kind.DIR, tree, entry)
        return Shown(entry.path, overlay_kind(entry), entry.base_oid, entry)

    def listing(self, directory: Shown) -> dict[bytes, Shown]:
        """A directory's entries by name, in name order: the base's, then the overlay's over them."""
        found: dict[bytes, Shown] = {}
        if directory.base_tree is not None:
            tree = self.repo.get(directory.base_tree)
            if not isinstance(tree, pygit2.Tree):  # a blobless clone has every tree: this is a fault
                raise ObjectMissing(f"tree {directory.base_tree} is missing from the local git directory")
            for item in tree:
                kind = GIT_MODE_KINDS.get(item.filemode)
                if kind is not None:
                    name = item.raw_name if hasattr(item, "raw_name") else item.name.encode()
                    path = directory.path + b"/" + name if directory.path else name
                    found[name] = Shown(path, kind, str(item.id), None)
        for name, entry in self.overlay.children(directory.path).items():
            shown = self._from_entry(directory, entry)
            if shown is None:
                found.pop(name, None)
            else:
                found[name] = shown
        return dict(sorted(found.items()))


__all__ = ["Layers", "NotADirectory", "Shown", "overlay_kind", "parent_of"]
