"""LogBudget: so many lines per window, the rest summed up in one line with an example."""

from __future__ import annotations

import logging

from carelay.broker.logbudget import LogBudget

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
