"""The backfill's order (a unit test of backfill.priority; the backfill itself runs against a real
remote in test_hydration.py)."""
from __future__ import annotations

from artifactfs.fs.backfill import in_order, priority


def test_manifests_and_sources_come_first_large_binaries_last() -> None:
    paths = [b"assets/logo.png", b"docs/guide.md", b"src/main.rs", b"Cargo.toml", b"vendor/lib.so",
             b"data/blob.weird", b"services/api/package.json", b"README.md", b"web/app.tsx"]  # fmt: skip
    ordered = sorted(paths, key=lambda p: (priority(p), p))
    assert ordered == [b"Cargo.toml", b"README.md", b"services/api/package.json", b"src/main.rs", b"web/app.tsx",
                       b"docs/guide.md", b"data/blob.weird", b"assets/logo.png", b"vendor/lib.so"]  # fmt: skip


def test_a_name_that_is_not_utf8_still_has_a_place() -> None:
    assert priority(b"src/\xff\xfe.py") == 1


def test_a_suffix_is_the_last_dot_of_the_name_alone() -> None:
    assert priority(b"dist/site.tar.gz") == 4  # .gz
    assert priority(b"home/.bashrc") == priority(b"bin/tool.") == priority(b"lib.d/noext") == 3  # no suffix
    assert priority(b"SRC/MAIN.PY") == 1  # case does not matter


def test_the_order_puts_only_the_missing_first_to_last() -> None:
    blobs = {"1": b"logo.png", "2": b"setup.py", "3": b"pyproject.toml", "4": b"notes.txt"}
    assert in_order(blobs, {"1", "2", "3"}) == ["3", "2", "1"]
