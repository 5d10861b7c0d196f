"""The pieces of logic behind the metrics endpoint (the endpoint itself, scraped while a repository
is prepared and read, is in test_async.py and test_stack.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from artifactfs import metrics


def test_the_files_of_dead_processes_of_this_machine_are_forgotten(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    node = metrics.process_identifier().rsplit("-", 1)[0]
    mine = tmp_path / f"counter_{metrics.process_identifier()}.db"
    gone = [tmp_path / f"counter_{node}-{dead.pid}.db", tmp_path / f"histogram_{node}-{dead.pid}.db"]
    elsewhere = tmp_path / f"counter_other-container-{dead.pid}.db"  # its pids mean nothing here
    unknown = tmp_path / "notes.db"
    for path in (mine, *gone, elsewhere, unknown):
        path.write_bytes(b"")
    assert sorted(metrics.forget_dead_processes(tmp_path)) == sorted(gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, elsewhere, unknown))


def test_a_process_identifier_never_holds_the_collector_separator() -> None:
    assert "_" not in metrics.process_identifier()
    assert metrics.process_identifier().endswith(f"-{os.getpid()}")


FULL_DISK_CHECK = """
import os, sys
from prometheus_client import values
from artifactfs import metrics
os.environ[metrics.MULTIPROC_ENV] = sys.argv[1]
values.ValueClass = values.MultiProcessValue(metrics.process_identifier)
assert not metrics.allocate_files()
assert values.ValueClass is values.MutexValue
metrics.count_error(metrics.ErrorKind.FETCH)  # counted in memory: no file, no SIGBUS
metrics.observe_prepare("failed", 1.0)
print(sorted(os.listdir(sys.argv[1])))
"""


def test_a_full_disk_makes_a_process_count_in_memory_not_crash(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        with open(small / "filler", "wb") as fh:  # the whole file system, less nothing
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass
        done = subprocess.run([sys.executable, "-c", FULL_DISK_CHECK, str(small)], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr  # a SIGBUS would be -7
        assert done.stdout.strip() == "['filler']"
    finally:
        subprocess.run(["umount", str(small)], check=True)
