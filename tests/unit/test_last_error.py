"""The last error line every process keeps for its status file (carelay.common.lifecycle)."""

from __future__ import annotations

import json
import os

import pytest

from carelay.common import lifecycle
from tests.unit.process_logging import process_logging


@pytest.fixture
def logged():
    """setup_logging as a child process does it; the root logger and hook put back after."""
    with process_logging() as (log, _out):
        yield log


def test_status_file_carries_the_last_error_line(logged, tmp_path):
    path = lifecycle.status_path(tmp_path, "shard 3")
    assert path.name == "shard-3.json"
    lifecycle.write_status(path, {"role": "shard 3"})
    assert json.loads(path.read_text())["last_error"] is None

    logged.warning("a warning is not an error")
    logged.error("shard %d: first\nproblem", 3)
    logged.error("shard %d: cannot start: %s", 3, "store damaged")
    logged.info("an info line after it")
    lifecycle.write_status(path, {"role": "shard 3", "pvs": 1})
    status = json.loads(path.read_text())
    assert status["pid"] == os.getpid() and status["pvs"] == 1
    assert status["last_error"]["message"] == "shard 3: cannot start: store damaged"
    assert status["last_error"]["level"] == "ERROR"


def test_error_lines_are_one_line_and_bounded(logged):
    logged.error("a\nb\r\nc %s", "x" * 10_000)
    message = lifecycle.last_error.last["message"]
    assert "\n" not in message and message.startswith("a b c x")
    assert len(message) <= 500


def test_last_words_of_a_failed_process(logged, tmp_path):
    logged.error("shard 3: cannot listen on tcp://127.0.0.1:1: address in use")
    path = lifecycle.status_path(tmp_path, "shard 3")
    lifecycle.write_last_words(path, "shard 3", 1)
    status = json.loads(path.read_text())
    assert status["exit"] == 1
    assert "cannot listen" in status["last_error"]["message"]


def test_an_uncaught_exception_is_logged_as_the_last_error(logged):
    import sys

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    assert lifecycle.last_error.last["message"] == "shard 3 crashed: RuntimeError: boom"
    assert lifecycle.last_error.last["level"] == "CRITICAL"


def test_a_status_file_that_cannot_be_written_is_said_once_a_window(tmp_path, caplog):
    """Each process writes its status file every second: a directory that cannot take it
    (read-only, gone) must not make it log a line every second for as long as it lasts."""
    path = tmp_path / "gone" / "shard-0.json"  # its directory does not exist
    for k in range(30):
        lifecycle.write_status(path, {"role": "shard 0", "k": k})
    assert caplog.text.count("cannot write status file") == 1
    budget = lifecycle._unwritable[path]
    budget.clock = lambda: float("inf")  # the window is over
    lifecycle.write_status(path, {"role": "shard 0", "k": 30})
    assert "could not be written 29 more times" in caplog.text
    assert caplog.text.count("cannot write status file") == 2
