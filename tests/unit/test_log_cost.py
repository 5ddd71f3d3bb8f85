"""A log line gathers only what its format shows: no caller lookup, thread or process."""

from __future__ import annotations

import logging

import pytest

from tests.unit.process_logging import process_logging


@pytest.fixture
def logged():
    with process_logging() as logged:
        yield logged


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
