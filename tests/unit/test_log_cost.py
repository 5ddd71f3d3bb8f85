"""A log line gathers only what its format shows: no caller lookup, thread or process."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from carelay.common import lifecycle

_KNOBS = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")


@pytest.fixture
def logged():
    root = logging.getLogger()
    handlers, level, hook = root.handlers[:], root.level, sys.excepthook
    knobs = {k: getattr(logging, k) for k in _KNOBS}
    out = io.StringIO()
    stderr, sys.stderr = sys.stderr, out
    try:
        log = lifecycle.setup_logging("INFO", "shard 3")
    finally:
        sys.stderr = stderr
    yield log, out
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook = hook
    for k, v in knobs.items():
        setattr(logging, k, v)


def test_a_line_skips_what_the_format_does_not_show(logged):
    log, out = logged
    seen = []
    probe = logging.Handler()
    probe.emit = seen.append
    logging.getLogger().addHandler(probe)
    try:
        logging.getLogger("carelay.shard.handler").info("created PV %s", "P:a_f1")
    finally:
        logging.getLogger().removeHandler(probe)
    (record,) = seen
    assert record.lineno == 0 and record.thread is None and record.process is None
    assert out.getvalue().rstrip().endswith(" INFO shard 3: created PV P:a_f1")
