"""Progress of a blocking add: phases and git's own percentages on standard error, as a bar on a
terminal and as plain lines elsewhere, nothing with --quiet; --json on standard output."""
from __future__ import annotations

import fcntl
from types import SimpleNamespace
import io
import json
import os
import pty
import struct
import subprocess
import termios

from artifactfs.progress import Mode, Note, Publisher, Reporter, git_progress, parse
from artifactfs.repos import _LoggedPhases

from .conftest import PYTHON, Artifactfs
from .gitremote import SampleRepo


def test_git_progress_lines_are_read() -> None:
    assert git_progress("Receiving objects:  45% (450/1000), 1.20 MiB | 3.00 MiB/s") == ("Receiving objects", 45)
    assert git_progress("remote: Counting objects: 100% (12/12), done.") == ("Counting objects", 100)
    assert git_progress("Cloning into '/tmp/x'...") is None


def test_plain_lines_say_each_phase_and_each_git_stage_once() -> None:
    out = io.StringIO()
    report = Reporter("app", Mode.LINES, out)
    for note in (Note("clone"), Note(stage="Receiving objects", percent=10), Note(stage="Receiving objects", percent=100),
                 Note(stage="Receiving objects", percent=100), Note("index")):  # fmt: skip
        report(note)
    assert out.getvalue().splitlines() == ["app: clone", "app: clone: Receiving objects 100%", "app: index"]
    quiet = io.StringIO()
    Reporter("app", Mode.QUIET, quiet)(Note("clone"))
    assert quiet.getvalue() == ""


def test_a_published_note_is_read_back_for_its_attempt_only(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    sent: list[str] = []
    monkeypatch.setattr("artifactfs.progress.publish", lambda url, message, channel: sent.append(message) or True)
    publisher = Publisher("unix:///nowhere", "h", "app", attempt_version=7)
    publisher(Note("clone"))
    publisher(Note(stage="Receiving objects", percent=100))
    assert [parse(m, 7) for m in sent] == [Note("clone"), Note("clone", "Receiving objects", 100)]
    assert parse(sent[0], 8) is None and parse(b"not json", 7) is None


class GrowingLog:
    """A log whose phases are appended while a follower reads it (unit test of the ordering)."""

    def __init__(self) -> None:
        self.rows: list[SimpleNamespace] = []

    def append(self, phase: str, version: int = 6) -> None:
        self.rows.append(SimpleNamespace(id=len(self.rows) + 1, type="phase", version=version, payload={"phase": phase}))

    def events(self, name: str, after: int) -> list[SimpleNamespace]:
        return [row for row in self.rows if row.id > after]


def test_a_note_that_arrives_after_the_log_moved_on_is_shown_under_its_phase() -> None:
    log, shown = GrowingLog(), []
    log.append("validate", version=4)  # an earlier attempt's: not this one's
    log.append("validate")
    phases = _LoggedPhases(log, "app", 5, shown.append)  # type: ignore[arg-type]
    phases.show_all()
    for phase in ("clone", "index", "publish"):  # the job ran ahead while notes were batched
        log.append(phase)
    assert phases.show_until("clone")
    shown.append(Note(stage="Receiving objects", percent=100))
    assert not phases.show_until("validate")  # a phase already left: its late notes are dropped
    phases.show_all()
    assert [n.phase or n.stage for n in shown] == ["validate", "clone", "Receiving objects", "index", "publish"]


def test_a_blocking_add_shows_phases_and_git_percentages(afs: Artifactfs, sample: SampleRepo) -> None:
    plain = afs.run("add-repo", "--name", "plain", "--remote", sample.url)
    lines = plain.stderr.splitlines()
    assert [line for line in lines if line in ("plain: validate", "plain: clone", "plain: index", "plain: publish")] == [
        "plain: validate", "plain: clone", "plain: index", "plain: publish"], plain.stderr  # fmt: skip
    assert "plain: clone: Receiving objects 100%" in lines, plain.stderr
    assert plain.stdout == "added plain\n"

    quiet = afs.run("add-repo", "--name", "quiet", "--remote", sample.url, "--quiet", "--json")
    assert "quiet:" not in quiet.stderr, quiet.stderr
    row = json.loads(quiet.stdout)
    assert (row["repo"], row["host"], row["head"]) == ("quiet", afs.env["ARTIFACTFS_HOST"], sample.head)

    # On a terminal: a bar that git's percentages move, erased once done.
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([PYTHON, "-m", "artifactfs.cli", "--log-level", "WARNING", "add-repo", "--name", "bar",
                             "--remote", sample.url], env=afs.env, stdout=subprocess.PIPE, stderr=follower)  # fmt: skip
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0 and proc.stdout is not None and proc.stdout.read() == b"added bar\n"
    frames = drawn.decode(errors="replace").split("\r")
    assert any("bar: clone: Receiving objects" in f and "100%" in f for f in frames), frames
    assert any("bar: index" in f for f in frames), frames
