"""The shard's lines that a client's traffic drives (refused, dropped and field puts) are
bounded per window; the rest are counted and summed up in one line when it is over."""

from __future__ import annotations

import errno
import logging
import time

import numpy as np
import pytest

from carelay.common.config import REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW
from carelay.common.messages import (
    Delete,
    Message,
    Ping,
    Put,
    Reject,
    SetField,
    Update,
    Write,
)
from carelay.common.protocol import WriteRun
from carelay.shard.server import ShardServer
from tests.unit.driven_shard import (
    PREFIX,
    break_store,
    handle,
    past_the_period,
    shard_with_store,
)

#: How many events a client drives in the tests: far more than a window's lines.
FLOOD = 10_000
#: Events per batch, as a broker sends them.
BATCH = 500


@pytest.fixture
def server(tmp_path):
    s = shard_with_store(tmp_path)
    yield s
    s.autosave.close()
    s.db.close()


def _flood(server: ShardServer, msgs: list) -> list[Message]:
    out: list[Message] = []
    for k in range(0, len(msgs), BATCH):
        out += handle(server, *msgs[k : k + BATCH])
    return out


def _refusing(server: ShardServer, monkeypatch, name: str) -> None:
    """The store cannot be written (a full disk) and the autosave period has passed: puts
    with callback are refused (a value of ``name`` is held)."""
    break_store(server, monkeypatch, errno.ENOSPC, "disk full")
    handle(server, Write(name, 0, 1.0, np.array([9.0])))
    server.autosave.flush()
    past_the_period(server)
    assert server.health.refusing


def _window_over(server: ShardServer) -> None:
    """The budgets' window is over: their clock is a window and a bit later."""
    later = time.monotonic() + REFUSAL_LOG_WINDOW + 1
    for budget in server.requests.log_budgets:
        budget.clock = lambda: later


def _lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _summaries(caplog) -> list[str]:
    return _lines(caplog, "not logged one by one")


def _bounded(server: ShardServer, caplog, msgs: list, *texts: str) -> tuple[list, list, str]:
    """``msgs`` flooded in: what they were answered, the lines logged one by one (those
    with any of ``texts``), within the budget and with no summary yet, and the one line
    that sums up the rest once the window is over, though nothing more comes."""
    with caplog.at_level(logging.INFO, logger="carelay.shard"):
        out = _flood(server, msgs)
        logged = [line for text in texts for line in _lines(caplog, text)]
        assert 0 < len(logged) <= REFUSAL_LOG_LINES
        assert not _summaries(caplog)
        _window_over(server)
        server.requests.tick()  # the loop's next turn, with no message
    (summary,) = _summaries(caplog)
    assert f"{len(msgs) - len(logged):,} more" in summary
    return out, logged, summary


def _created(server: ShardServer, names: list[str]) -> None:
    _flood(server, [Put(n, 0, 0.0, np.array([1.0])) for n in names])


# -- refused puts -----------------------------------------------------------------------


def test_puts_with_callback_refused_by_a_full_disk_are_bounded_and_summed_up(
    server, monkeypatch, caplog
):
    names = [f"{PREFIX}p{k}_f1" for k in range(300)]
    _created(server, names)
    _refusing(server, monkeypatch, names[0])
    puts = [
        Put(names[k % len(names)], k + 1, 0.0, np.array([2.0]), callback=True) for k in range(FLOOD)
    ]
    out, logged, summary = _bounded(server, caplog, puts, "refused put to")
    # Every put is refused, as before: only the log is bounded.
    assert len(out) == FLOOD and all(type(m) is Reject for m in out)
    # The first lines in full: the reason and the PV.
    assert names[0] in logged[0] and "cannot be written" in logged[0]
    assert f"in the last {REFUSAL_LOG_WINDOW:.0f} s" in summary
    assert PREFIX in summary and "cannot be written" in summary


def test_writes_with_callback_refused_by_a_full_disk_are_bounded(server, monkeypatch, caplog):
    names = [f"{PREFIX}w{k}_f1" for k in range(300)]
    _created(server, names)
    _refusing(server, monkeypatch, names[0])
    runs = [WriteRun(np.dtype("<f8")) for _ in range(FLOOD // 2 // BATCH)]
    for k in range(FLOOD // 2):
        runs[k // BATCH].add(names[k % len(names)], k + 1, 1.0, np.array([3.0]))
    writes = [Write(names[k % len(names)], k + 1, 1.0, np.array([3.0])) for k in range(FLOOD // 2)]
    with caplog.at_level(logging.INFO, logger="carelay.shard"):
        out = [m for run in runs for m in handle(server, run)] + _flood(server, writes)
        # Each refused, then restated to the broker's mirror, as before.
        assert [type(m) for m in out] == [Reject, Update] * FLOOD
        logged = _lines(caplog, "refused put to")
        assert 0 < len(logged) <= REFUSAL_LOG_LINES
        _window_over(server)
        server.requests.tick()
    (summary,) = _summaries(caplog)
    assert f"{FLOOD - len(logged):,} more" in summary


def test_puts_the_store_refuses_are_bounded(server, caplog):
    """A value of the wrong type, to PVs of a client's choosing: line 124's refusal."""
    names = [f"{PREFIX}r{k}_f1" for k in range(300)]
    _created(server, names)
    puts = [
        Put(names[k % len(names)], k + 1, 0.0, np.array([1], dtype="<i4")) for k in range(FLOOD)
    ]
    out, _, summary = _bounded(server, caplog, puts, "refused put to")
    assert all(type(m) is Reject for m in out)
    assert "dtype" in summary


def test_expired_requests_dropped_after_a_stall_are_bounded(server, caplog):
    names = [f"{PREFIX}e{k}_f1" for k in range(300)]
    _created(server, names)
    past = time.time() - 1
    backlog = [
        Delete(names[k % len(names)], k + 1, expires=past)
        if k % 2
        else Put(names[k % len(names)], k + 1, 0.0, np.array([1.0]), expires=past)
        for k in range(FLOOD)
    ]
    out, _, summary = _bounded(server, caplog, backlog, "dropped")
    assert len(out) == FLOOD and all(type(m) is Reject for m in out)
    assert "expired" in summary


# -- field puts -------------------------------------------------------------------------


def test_field_puts_in_a_loop_are_bounded_and_summed_up(server, caplog):
    names = [f"{PREFIX}f{k}_f1" for k in range(300)]
    buffers = [f"{PREFIX}b{k}_F3" for k in range(300)]
    _created(server, names + buffers)
    puts = [
        SetField(buffers[k % len(buffers)], k + 1, "RES", 0)
        if k % 2
        else SetField(names[k % len(names)], k + 1, "EGU", f"V{k}")
        for k in range(FLOOD)
    ]
    out, logged, summary = _bounded(server, caplog, puts, "set ", "emptied buffer")
    assert not [m for m in out if type(m) is Reject]
    assert f"set {names[0]}.EGU = 'V0'" in logged
    assert f"{FLOOD - len(logged):,} more field puts" in summary


def test_refused_field_puts_are_bounded(server, caplog):
    puts = [SetField(f"{PREFIX}none{k}_f1", k + 1, "EGU", "V") for k in range(FLOOD)]
    out, _, summary = _bounded(server, caplog, puts, "refused U:")
    assert all(type(m) is Reject for m in out)
    assert "no PV named" in summary


# -- what stays one line per event ------------------------------------------------------


def test_creations_and_deletions_are_each_logged_still(server, caplog):
    names = [f"{PREFIX}c{k}_f1" for k in range(2 * REFUSAL_LOG_LINES)]
    with caplog.at_level(logging.INFO, logger="carelay.shard"):
        _created(server, names)
        _flood(server, [Delete(n, k + 1) for k, n in enumerate(names)])
    assert len(_lines(caplog, "created PV")) == len(names)
    assert len(_lines(caplog, "deleted PV")) == len(names)
    assert not _summaries(caplog)


def test_a_window_within_the_budget_logs_each_line_and_no_summary(server, caplog):
    name = f"{PREFIX}q_f1"
    _created(server, [name])
    with caplog.at_level(logging.INFO, logger="carelay.shard"):
        handle(server, SetField(name, 1, "EGU", "A"), SetField(name, 2, "HOPR", 5.0))
        _window_over(server)
        handle(server, Ping(3), SetField(name, 4, "EGU", "B"))
    assert _lines(caplog, f"set {name}.") == [
        f"set {name}.EGU = 'A'",
        f"set {name}.HOPR = 5.0",
        f"set {name}.EGU = 'B'",
    ]
    assert not _summaries(caplog)
