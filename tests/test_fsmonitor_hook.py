"""The fsmonitor hook git runs (fsmonitor_hook.sh), in a directory that holds the mount's answer
as the file a lookup at the mount's root finds: the answer whole, NULs kept, and "/" (check
everything) wherever no answer is found."""
from __future__ import annotations

import subprocess
from pathlib import Path

from artifactfs.fs.fsmonitor import ANSWER_PREFIX, Answers, hook_command
from artifactfs.fs.overlay import EntryKind, Overlay, OverlayEntry

T = 1_700_000_000_000_000_000


def run_hook(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(f"{hook_command()} {' '.join(args)}", shell=True, cwd=cwd, capture_output=True, timeout=30)


def test_a_large_answer_arrives_whole(tmp_path: Path) -> None:
    overlay = Overlay(tmp_path / "overlay")
    for n in range(5000):  # about 200 KB of paths
        overlay.put(OverlayEntry(f"dir{n % 7}/file-with-a-long-name-{n:05d}.txt".encode(), EntryKind.FILE, 0o644, T,
                                 data=None, base_oid="0" * 40))  # fmt: skip
    answers = Answers(overlay)
    token = f"afs1:{overlay.id}:{answers.epoch}:0"
    whole = answers.answer(token, None, "")  # type: ignore[arg-type]  (an exact token: no commit read)
    assert len(whole) > 150_000
    served = tmp_path / "served"
    served.mkdir()
    (served / (ANSWER_PREFIX + token.encode()).decode()).write_bytes(whole)
    out = run_hook(served, "2", token)
    assert out.returncode == 0 and out.stdout == whole


def test_without_an_answer_git_checks_everything(tmp_path: Path) -> None:
    out = run_hook(tmp_path, "2", "afs1:someone-else:0:0")
    assert out.returncode == 0 and out.stdout == b"afs1:none\0/\0"
    wrong = run_hook(tmp_path, "1", "12345")
    assert wrong.returncode != 0 and b"only hook version 2" in wrong.stderr
