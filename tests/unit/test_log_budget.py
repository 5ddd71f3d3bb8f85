"""LogBudget: so many lines per window, the rest summed up in one line with an example."""

from __future__ import annotations

import logging

from carelay.broker.health import Health
from carelay.broker.logbudget import RefusedPuts
from carelay.common.logbudget import LogBudget

log = logging.getLogger("carelay.test.logbudget")
SUMMARY = "{count} more in {window:.0f} s, e.g. {example}"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_over_the_budget_are_summed_up_once_the_window_is_over(caplog):
    caplog.set_level(logging.WARNING, logger=log.name)
    clock = Clock()
    budget = LogBudget(2, 60.0, SUMMARY, log, clock)
    assert [budget.allow(f"x{k}") for k in range(1500)] == [True, True] + [False] * 1498
    budget.tick()
    assert caplog.messages == []  # the window is not over
    clock.now = 60.0
    budget.tick()
    assert caplog.messages == ["1,498 more in 60 s, e.g. x2"]
    # A new window: lines may go again, and one without lines over the budget is quiet.
    assert budget.allow("y") and budget.allow("z")
    clock.now = 200.0
    budget.tick()
    assert caplog.messages == ["1,498 more in 60 s, e.g. x2"]


def test_a_window_that_is_over_is_summed_up_before_the_next_line_is_judged(caplog):
    caplog.set_level(logging.WARNING, logger=log.name)
    clock = Clock()
    budget = LogBudget(1, 10.0, SUMMARY, log, clock)
    assert budget.allow("a") and not budget.allow("b")
    clock.now = 10.0
    assert budget.allow("c")
    assert caplog.messages == ["1 more in 10 s, e.g. b"]
    assert not budget.allow("d") and budget.unlogged == 1


def test_a_keyed_line_goes_once_per_window():
    clock = Clock()
    budget = LogBudget(100, 60.0, SUMMARY, log, clock)
    assert budget.allow("a", key="a")
    assert not budget.allow("a", key="a")
    assert budget.allow("b", key="b") and budget.allow("c")
    assert budget.unlogged == 1
    clock.now = 60.0
    assert budget.allow("a", key="a")


def _health(clock: Clock, lines: int = 100) -> Health:
    h = Health(shards=2, version="test")
    h.put_refusals = RefusedPuts(log, lines, 60.0, clock)
    return h


def test_a_put_refused_again_and_again_is_kept_once_a_window_and_counted_each_time(caplog):
    """A client that repeats a refused put fast neither fills the log nor pushes other
    clients' refusals out of ERRORS."""
    caplog.set_level(logging.WARNING, logger=log.name)
    clock = Clock()
    h = _health(clock)
    assert h.refused("convert", "refused put: not a number", "P:b_f1", 0, ("h2", "bob"))
    kept = [h.refused("no_such_pv", "delpv failed: no such PV", "P:gone_f1") for _ in range(500)]
    assert kept == [True] + [False] * 499
    assert h.refusals["no_such_pv"] == 500 and h.refusals["convert"] == 1
    lines = list(h.errors.lines)
    assert len(lines) == 2 and "bob@h2 pv P:b_f1" in lines[0], lines
    clock.now = 60.0
    h.put_refusals.tick()
    assert caplog.messages == [
        "499 more refused puts in the last 60 s, not logged one by one, "
        "e.g. P:gone_f1: delpv failed: no such PV"
    ]
    assert h.refused("no_such_pv", "delpv failed: no such PV", "P:gone_f1")


def test_refused_puts_share_a_budget_of_lines_but_names_and_denials_keep_their_own():
    clock = Clock()
    h = _health(clock, lines=3)
    kept = [h.refused("convert", f"refused put: value {k}", "P:a_f1") for k in range(5)]
    assert kept == [True, True, True, False, False]
    # Bounded where they are found: a refused name or limit once per name, an access
    # denial by DeniedPuts.
    for kind in ("name", "limit", "access"):
        assert all(h.refused(kind, "why", "P:a_f1") for _ in range(5))
    assert h.refusals["convert"] == 5 and h.refusals["access"] == 5


def test_clients_bad_puts_never_hide_a_shard_that_is_down():
    clock = Clock()
    h = _health(clock, lines=3)
    assert [h.refused("convert", f"refused put: value {k}", "P:a_f1") for k in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    assert h.refused("shard_down", "put failed: shard unreachable", "P:b_f1", 1)
    assert "shard unreachable" in list(h.errors.lines)[-1]
