"""A bound on the log lines that a client's traffic can drive, and one line for the rest.

Refused names (broker/refusals.py), puts refused by access security
(broker/sockethooks.py), other refused and failed puts (``RefusedPuts``) and what PCAS
writes on stderr (broker/cstreams.py) each log one line per event, as often as a client
cares to cause one.  Each goes through its own ``LogBudget``: so many lines per window,
then the rest counted and summed up in one line when the window is over.
"""

from __future__ import annotations

import logging
import time

from carelay.common.config import LOGGED_NAME_CHARS, REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW

__all__ = ["LogBudget", "RefusedPuts"]

#: Kinds of refusal bounded elsewhere: a refused name or a limit is logged once per name
#: (broker/refusals.py), an access denial through a budget of its own.
OWN_BUDGET = frozenset({"name", "limit", "access"})
#: Failures of the relay rather than of a client's put: a budget apart, so that a client's
#: bad puts never hide a shard that is down.
FAILURES = frozenset({"shard_down", "shard_refused"})


class LogBudget:
    """At most ``lines`` log lines per ``window`` seconds.

    ``allow`` says whether one may go.  The lines that may not are counted, the first of
    them kept as an example, and once the window is over ``tick`` logs ``summary`` to
    ``log``, formatted with ``count`` (the lines not logged), ``window`` (its seconds)
    and ``example``; a window without such lines says nothing.  A line given a ``key``
    goes once per window for that key: a repeat is counted, as over the budget."""

    def __init__(
        self,
        lines: int,
        window: float,
        summary: str,
        log: logging.Logger,
        clock=time.monotonic,
    ) -> None:
        self.clock = clock
        self.window = window
        self._window_end = clock() + window
        self.lines = lines
        self._logged = 0
        self.summary = summary
        self.log = log
        #: Lines not logged one by one in this window, and the first of them.
        self.unlogged = 0
        self._example: str | None = None
        #: Keys of the lines that went in this window (at most ``lines``).
        self._keys: set = set()

    def allow(self, example: str | None = None, key=None) -> bool:
        """Whether one more line may go now (a window that is over is summed up first);
        if not, it is counted, and ``example`` kept if it is the window's first.  With a
        ``key``: not if a line of that key went in this window."""
        self.tick()
        if self._logged < self.lines and (key is None or key not in self._keys):
            self._logged += 1
            if key is not None:
                self._keys.add(key)
            return True
        self.unlogged += 1
        if self._example is None:
            self._example = example
        return False

    def tick(self) -> None:
        """At the end of a window, the summary of what was not logged one by one; a new
        window starts."""
        now = self.clock()
        if now < self._window_end:
            return
        if self.unlogged:
            text = self.summary.format(
                count=f"{self.unlogged:,}", window=self.window, example=self._example
            )
            self.log.warning("%s", text)
        self._window_end = now + self.window
        self._logged = 0
        self.unlogged = 0
        self._example = None
        self._keys.clear()


class RefusedPuts:
    """The refused and failed puts of a front-end (a value that does not convert, a bad
    field value, a delpv of no such PV, a shard down or refusing), each logged and kept
    for LAST_ERROR/ERRORS up to ``lines`` per ``window`` seconds, and one of a PV and a
    reason per window; the rest counted and summed up in one line at the end of the
    window.  A client that repeats one fast cannot fill the log, nor push everyone
    else's entries out of ERRORS.  The relay's own failures (a shard down or refusing)
    have a budget of their own, which clients' bad puts cannot spend."""

    def __init__(
        self,
        log: logging.Logger,
        lines: int = REFUSAL_LOG_LINES,
        window: float = REFUSAL_LOG_WINDOW,
        clock=time.monotonic,
    ) -> None:
        self.budget, self.failures = (
            LogBudget(
                lines,
                window,
                f"{{count}} more {what} in the last {{window:.0f}} s, not logged one by "
                "one, e.g. {example}",
                log,
                clock,
            )
            for what in ("refused puts", "failed puts (shard down or refusing)")
        )

    def allow(self, kind: str, reason: str, pv: str | None = None) -> bool:
        """Whether a refusal of ``kind`` may be logged and kept now."""
        if kind in OWN_BUDGET:
            return True
        example = f"{pv[:LOGGED_NAME_CHARS]}: {reason}" if pv else reason
        budget = self.failures if kind in FAILURES else self.budget
        return budget.allow(example, key=(pv, reason))

    def tick(self) -> None:
        self.budget.tick()
        self.failures.tick()
