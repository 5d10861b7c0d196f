"""Log lines: text or one JSON object per record, what a record is about, credentials redacted.
(Every service's log in JSON, from a real stack, is checked in test_async.py.)"""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from artifactfs import logs
from artifactfs.model import InvalidInput

SECRET_URL = "https://builder:s3cret-token@git.example.com/org/repo.git"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_name_host_repo_job_and_phase_and_hide_credentials(captured: io.StringIO) -> None:
    logs.configure("INFO", "builder-7", fmt=logs.LogFormat.JSON, stream=captured)
    log = logging.getLogger("artifactfs.test")
    log.info("outside any job")
    with logs.about(repo="app", job="prepare:builder-7:app:3", phase=None):
        logs.set_context(phase="clone")
        log.warning("cloning %s", SECRET_URL)
        try:
            raise RuntimeError(f"git failed for {SECRET_URL}")
        except RuntimeError:
            log.exception("failed")
    log.info("about another", extra={"repo": "other"})
    first, clone, failed, other = records(captured)
    assert first["host"] == "builder-7" and first["repo"] is None and first["job"] is None
    assert first["level"] == "INFO" and first["logger"] == "artifactfs.test" and first["message"] == "outside any job"
    assert str(first["time"]).endswith("+00:00")
    assert (clone["repo"], clone["job"], clone["phase"]) == ("app", "prepare:builder-7:app:3", "clone")
    assert clone["message"] == "cloning https://***@git.example.com/org/repo.git"
    assert "s3cret" not in captured.getvalue()
    assert "RuntimeError" in str(failed["exception"])
    assert other["repo"] == "other" and other["phase"] is None  # the job's context ended with it


def test_text_lines_hide_credentials_too(captured: io.StringIO) -> None:
    logs.configure("INFO", "h", fmt=logs.LogFormat.TEXT, stream=captured)
    logging.getLogger("artifactfs.test").error("could not fetch %s", SECRET_URL)
    line = captured.getvalue()
    assert "https://***@git.example.com" in line and "s3cret" not in line


def test_an_unknown_log_format_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTIFACTFS_LOG_FORMAT", "xml")
    with pytest.raises(InvalidInput, match="ARTIFACTFS_LOG_FORMAT='xml' is not one of text, json"):
        logs.log_format()
