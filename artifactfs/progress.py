"""Progress of a preparation, for whoever waits on it: the phases, and git's own percentages
("Receiving objects: 45%") while it clones or fetches.

A preparation reports Notes. Run in the command's own process (a blocking `add-repo`), they go
straight to the Reporter on its standard error. Run by a worker, the job publishes them on a Redis
channel of the repository's (at most a few a second), and a command that waits (`prepare --wait`,
`add-repo --host H`) follows the event log for the outcome and that channel for the percentages:
the log is the truth, the channel only shows how far git has got. The Reporter draws a bar on a
terminal (tqdm), writes plain lines elsewhere (a log, a CI job), and nothing with --quiet.
"""
from __future__ import annotations

import enum
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from .wakeup import publish

# git writes "Receiving objects:  45% (450/1000), 1.2 MiB | 3 MiB/s" and the remote's
# "remote: Counting objects: 100% (12/12), done." to stderr, ended by \r or \n.
GIT_PROGRESS_RE = re.compile(r"(?:remote: )?(?P<stage>[A-Z][a-z]+(?: [a-z]+)*):\s+(?P<percent>\d{1,3})%")
PUBLISH_INTERVAL_SECONDS = 0.25

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Note:
    phase: str | None = None  # a phase of the preparation (model.Phase)
    stage: str | None = None  # git's: "Counting objects", "Receiving objects", "Resolving deltas"
    percent: int | None = None


Report = Callable[[Note], None]


def git_progress(line: str) -> tuple[str, int] | None:
    """(stage, percent) from one of git's progress lines, or None."""
    found = GIT_PROGRESS_RE.search(line)
    if found is None:
        return None
    return found["stage"], min(int(found["percent"]), 100)


def channel(host: str, name: str) -> str:
    return f"artifactfs:progress:{host}:{name}"


class Mode(str, enum.Enum):
    BAR = "bar"
    LINES = "lines"
    QUIET = "quiet"


def mode_for(quiet: bool, stream: TextIO) -> Mode:
    if quiet:
        return Mode.QUIET
    return Mode.BAR if stream.isatty() else Mode.LINES


class Reporter:
    """Shows the Notes of one repository's preparation on `stream`."""

    def __init__(self, name: str, mode: Mode, stream: TextIO | None = None) -> None:
        self.name = name
        self.mode = mode
        self.stream = stream or sys.stderr
        self.phase: str | None = None
        self.stage: str | None = None
        self.percent = -1
        self._bar: Any = None

    def __call__(self, note: Note) -> None:
        if self.mode is Mode.QUIET:
            return
        if note.phase is not None and note.phase != self.phase:
            self.phase, self.stage, self.percent = note.phase, None, -1
            self._line(f"{self.name}: {self.phase}")
        if note.stage is None or note.percent is None:
            return
        if note.stage != self.stage:
            self.stage, self.percent = note.stage, -1
        if note.percent <= self.percent:
            return
        self.percent = note.percent
        if self.mode is Mode.BAR:
            bar = self._open_bar()
            bar.set_description_str(f"{self.name}: {self.phase or 'git'}: {self.stage}", refresh=False)
            bar.n = note.percent
            bar.refresh()
        elif note.percent == 100:  # plain lines: each of git's stages once, when it is done
            self._line(f"{self.name}: {self.phase or 'git'}: {self.stage} 100%")

    def _open_bar(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm  # only a terminal pays for it

            self._bar = tqdm(total=100, file=self.stream, leave=False, dynamic_ncols=True,
                             bar_format="{desc} {bar} {n:3.0f}%")  # fmt: skip
        return self._bar

    def _line(self, text: str) -> None:
        if self.mode is Mode.BAR:
            bar = self._open_bar()
            bar.n = 0
            bar.set_description_str(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Publisher:
    """A worker's Notes, published on the repository's channel: every phase, and git's
    percentages at most every PUBLISH_INTERVAL_SECONDS (and each stage's 100%)."""

    def __init__(self, redis_url: str, host: str, name: str, attempt_version: int) -> None:
        self.url = redis_url
        self.name = name
        self.channel = channel(host, name)
        self.attempt_version = attempt_version
        self.phase: str | None = None
        self._last = 0.0

    def __call__(self, note: Note) -> None:
        if note.phase is not None:
            self.phase = note.phase
            log.info("%s: phase %s", self.name, note.phase)
        now = time.monotonic()
        if note.phase is None and note.percent != 100 and now - self._last < PUBLISH_INTERVAL_SECONDS:
            return
        self._last = now
        message = {**asdict(note), "phase": self.phase, "attempt_version": self.attempt_version}
        publish(self.url, json.dumps(message), channel=self.channel)


def parse(message: bytes | str, attempt_version: int) -> Note | None:
    """A Note published for this attempt, or None (another attempt's, or not a Note)."""
    try:
        data = json.loads(message)
        if not isinstance(data, dict) or data.get("attempt_version") != attempt_version:
            return None
        percent = data.get("percent")
        return Note(data.get("phase"), data.get("stage"), int(percent) if percent is not None else None)
    except (ValueError, TypeError):
        return None
