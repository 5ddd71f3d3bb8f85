"""RefusalLog: refused names remembered by bytes, logged once each, summarised above a rate."""

from __future__ import annotations

import logging

from carelay.broker.refusals import RefusalLog
from carelay.common.config import LOGGED_NAME_CHARS
from carelay.common.logbudget import shorten


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("carelay.broker")]


def test_each_name_is_logged_once(caplog):
    caplog.set_level(logging.WARNING)
    refusals = RefusalLog()
    assert refusals.refuse("R:bad", "why") is True  # new, logged
    assert refusals.refuse("R:bad", "why") is None  # known: no line
    assert lines(caplog) == ["refused PV name R:bad: why"]


def test_a_log_line_carries_at_most_the_first_characters_of_a_name(caplog):
    caplog.set_level(logging.WARNING)
    name = "R:" + "x" * 20_000 + "_f1"
    RefusalLog().refuse(name, "y" * 5000)
    (line,) = lines(caplog)
    assert name[:LOGGED_NAME_CHARS] in line and f"({len(name)} characters)" in line
    assert len(line) < 3 * LOGGED_NAME_CHARS + 100
    assert shorten("short") == "short"


def test_memory_is_bounded_by_bytes_not_count():
    refusals = RefusalLog(memory_bytes=100_000)
    names = [f"R:{k:06d}" + "x" * 60_000 for k in range(1000)]
    for name in names:
        refusals.refuse(name, "too long")
    assert refusals.bytes <= 100_000
    # Long names are kept as digests: hundreds fit, and the newest are remembered.
    assert len(refusals) > 300
    assert names[-1] in refusals and names[0] not in refusals


def test_above_the_rate_refusals_are_summarised(caplog):
    caplog.set_level(logging.WARNING)
    clock = Clock()
    refusals = RefusalLog(lines=3, window=60.0, clock=clock)
    logged = [refusals.refuse(f"R:n{k}", "bad") for k in range(10)]
    assert logged == [True] * 3 + [False] * 7  # new, but over the budget: not logged
    assert len(lines(caplog)) == 3
    refusals.tick()
    assert len(lines(caplog)) == 3  # the window is not over
    clock.now = 60.0
    refusals.tick()
    summary = lines(caplog)[-1]
    assert summary.startswith("refused 7 more PV names in the last 60 s"), summary
    assert "e.g. R:n3: bad" in summary
    # A new window logs one by one again, and a quiet one says nothing.
    refusals.refuse("R:later", "bad")
    assert lines(caplog)[-1] == "refused PV name R:later: bad"
    clock.now = 200.0
    refusals.tick()
    assert len(lines(caplog)) == 5


def test_stderr_lines_are_logged_up_to_a_rate_then_counted(caplog):
    from carelay.broker.cstreams import LineLimiter, split_lines

    caplog.set_level(logging.WARNING)
    partial = bytearray()
    assert split_lines(partial, b"CAS: one\nCAS: tw") == ["CAS: one"]
    assert split_lines(partial, b"o\n\n" + b"z" * 10_000) == ["CAS: two"]
    assert len(partial) == 4096  # a line without end is kept only in part
    clock = Clock()
    limiter = LineLimiter(lines=2, window=60.0, clock=clock)
    for k in range(5):
        limiter.line(f"line {k} " + "x" * 1000)
    assert len(lines(caplog)) == 2 and all(len(m) < 300 for m in lines(caplog))
    clock.now = 61.0
    limiter.tick()
    assert lines(caplog)[-1].startswith("stderr: 3 more lines in the last 60 s")
