"""How every artifactfs process logs: one line per record, as text or, with
ARTIFACTFS_LOG_FORMAT=json, as one JSON object (time, level, host, repo, job, phase, logger,
message), credentials redacted in both.

What a record is about comes from context, not from each call: a mount process is about one
repository for its whole life, a prepare job sets its repository and job id, a preparation its
phase, and mountd the repository it is reconciling (`about`). A record may also name them itself
(`extra={"repo": ...}`).
"""
from __future__ import annotations

import contextvars
import datetime as dt
import enum
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from .model import InvalidInput
from .remotes import redact

FIELDS = ("repo", "job", "phase")
_context: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(f"artifactfs_log_{name}", default=None) for name in FIELDS
}


class LogFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"


def log_format() -> LogFormat:
    """ARTIFACTFS_LOG_FORMAT: text (the default) or json."""
    raw = os.environ.get("ARTIFACTFS_LOG_FORMAT") or LogFormat.TEXT.value
    try:
        return LogFormat(raw.strip().lower())
    except ValueError:
        raise InvalidInput(f"ARTIFACTFS_LOG_FORMAT={raw!r} is not one of text, json: fix or unset it") from None


def set_context(**fields: str | None) -> None:
    """Name what this process's (or this thread's) records are about from now on."""
    for name, value in fields.items():
        _context[name].set(value)


@contextmanager
def about(**fields: str | None) -> Iterator[None]:
    """Name what the records logged inside the block are about."""
    tokens = [(_context[name], _context[name].set(value)) for name, value in fields.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class _Context(logging.Filter):
    """Puts the context on each record (a field the record names itself wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _context.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        # Celery's records of a task's end carry the task's fields; its id is the job's.
        if record.job is None and isinstance(record.args, dict) and isinstance(record.args.get("id"), str):  # type: ignore[attr-defined]
            record.job = record.args["id"]  # type: ignore[attr-defined]
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, prefix: str = "%(name)s") -> None:
        super().__init__(f"%(asctime)s {prefix} %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "host": self.host,
            **{name: getattr(record, name, None) for name in FIELDS},
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str | int, host: str, *, text_prefix: str = "%(name)s", fmt: LogFormat | None = None,
              stream: TextIO | None = None) -> None:  # fmt: skip
    """Log to `stream` (standard error), in ARTIFACTFS_LOG_FORMAT, at `level`; replaces what was set before."""
    handler = logging.StreamHandler(stream)
    chosen = fmt or log_format()
    handler.setFormatter(JsonFormatter(host) if chosen is LogFormat.JSON else TextFormatter(text_prefix))
    handler.addFilter(_Context())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
