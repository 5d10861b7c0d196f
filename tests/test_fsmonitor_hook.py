"""The fsmonitor hook git runs (fsmonitor_hook.sh), in a directory that holds the mount's answer
as the file a lookup at the mount's root finds: the answer whole, NULs kept, and "/" (check
everything) wherever no answer is found."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from artifactfs.fs.fsmonitor import ANSWER_PREFIX, HOOK, Answers, hook_command
from artifactfs.fs.overlay import EntryKind, Overlay, OverlayEntry

T = 1_700_000_000_000_000_000


def run_hook(cwd: Path, *args: str, command: str | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(f"{command or hook_command()} {' '.join(args)}", shell=True, cwd=cwd, capture_output=True,
                          timeout=30)  # fmt: skip


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


def test_git_runs_the_hook_itself_where_it_can_and_through_sh_where_it_cannot(tmp_path: Path) -> None:
    """A bare path, which git execs without a shell in front, for the executable hook at a plain
    path; `sh` and a quoted path for a copy without executable bits, or at a path with a space."""
    assert hook_command() == str(HOOK)
    unplain = tmp_path / "with space"
    unplain.mkdir()
    shutil.copy2(HOOK, unplain / "hook.sh")
    assert hook_command(unplain / "hook.sh") == f"sh '{unplain / 'hook.sh'}'"
    unrunnable = tmp_path / "hook.sh"
    shutil.copyfile(HOOK, unrunnable)  # the content without the mode
    assert hook_command(unrunnable) == f"sh {unrunnable}"
    for command in (hook_command(), hook_command(unplain / "hook.sh"), hook_command(unrunnable)):
        out = run_hook(tmp_path, "2", "afs1:someone-else:0:0", command=command)
        assert out.returncode == 0 and out.stdout == b"afs1:none\0/\0", (command, out.stderr)
