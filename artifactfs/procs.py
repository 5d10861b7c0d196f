"""Knowing a process again: pid files that hold a pid and its start time.

A pid alone is not an identity: after a crash or a reboot the number may belong to anything, and a
`down` that signals it would hit an unrelated process. A pid file here holds the pid and the
process's start time (clock ticks since boot, from /proc/<pid>/stat); a process is "ours" only if
both match, and it is not a zombie.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start_time: int  # field 22 of /proc/<pid>/stat: unique for the life of the boot

    def __str__(self) -> str:
        return f"{self.pid} {self.start_time}"


# Work nobody waits on (the backfill, pack consolidation) runs this much nicer than the mount, so
# that it takes the cores the sandbox's own commands leave.
BACKGROUND_NICENESS = 10


def in_background(command: list[str]) -> list[str]:
    """`command`, to run at the background's lower CPU priority (and the I/O priority the kernel
    derives from it)."""
    return ["nice", "-n", str(BACKGROUND_NICENESS), *command]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its end.
    return raw.rsplit(")", 1)[1].split()


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` (R, S, D, T, Z...), or None if there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields is not None else None


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields is not None else None


def all_pids() -> list[int]:
    """Every process on this host (some may be gone by the time they are looked at)."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def identify(pid: int) -> ProcessId | None:
    """The identity of a running (non-zombie) process, or None."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessId(pid, int(fields[19]))


def is_running(proc: ProcessId) -> bool:
    """Whether the very process `proc` names still runs (same pid, same start time)."""
    return identify(proc.pid) == proc


def write_pid_file(path: Path, pid: int) -> ProcessId:
    """Record `pid` with its start time, atomically (readers never see half a file)."""
    ident = identify(pid)
    if ident is None:
        raise ProcessLookupError(pid)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{ident}\n")
    os.replace(tmp, path)
    return ident


def read_pid_file(path: Path) -> ProcessId | None:
    """The process a pid file names, if that very process still runs; None otherwise (a missing,
    malformed or stale file, or a pid that now belongs to another process)."""
    try:
        pid_text, start_text = path.read_text().split()
        recorded = ProcessId(int(pid_text), int(start_text))
    except (OSError, ValueError):
        return None
    return recorded if is_running(recorded) else None


def cmdline(pid: int) -> list[str]:
    """The arguments of process `pid` ([] for a kernel thread or a process gone). A process that
    rewrote its title may leave the last one without its terminating NUL: it still counts."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    if args[-1] == "":
        args.pop()
    return args


def open_files(candidates: set[Path]) -> set[Path]:
    """Which of `candidates` some process on this host has open (every /proc/<pid>/fd is read).

    Files are matched by device and inode, not by name: the kernel names an open file by its
    resolved path, and a candidate's may run through a symbolic link. Costly on a busy host, so
    only for rare paths: deciding whether a file a killed writer left behind is abandoned."""
    wanted: dict[tuple[int, int], Path] = {}
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        wanted[(st.st_dev, st.st_ino)] = path
    found: set[Path] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue  # gone, or not ours to look into
        for fd in fds:
            try:
                st = os.stat(f"/proc/{entry.name}/fd/{fd}")  # the open file itself
            except OSError:
                continue
            path = wanted.get((st.st_dev, st.st_ino))
            if path is not None:
                found.add(path)
    return found
