"""A bound on the log lines that a client's traffic can drive, and one line for the rest.

A front-end logs refused names, refused puts and what PCAS writes (broker/refusals.py,
broker/logbudget.py, broker/cstreams.py); a shard logs refused, expired and failed
requests and field puts (shard/handler.py): each one line per event, as often as a
client cares to cause one.  Each goes through its own ``LogBudget``: so many lines per
window, then the rest counted and summed up in one line when the window is over.
"""

from __future__ import annotations

import logging
import time

from carelay.common.config import LOGGED_NAME_CHARS

__all__ = ["LogBudget", "shorten"]


#: Control characters as a log line shows them: a client's text with a line break would
#: otherwise forge a log line of its own, and an escape sequence would reach a terminal.
_ESCAPED = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def shorten(text: str, limit: int = LOGGED_NAME_CHARS) -> str:
    """``text`` as a log line may carry it: its first ``limit`` characters, with control
    characters escaped, and how long it was when it is longer."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.translate(_ESCAPED)


class LogBudget:
    """At most ``lines`` log lines per ``window`` seconds.

    ``allow`` says whether one may go.  The lines that may not are counted, the first of
    them kept as an example, and once the window is over ``tick`` logs ``summary`` to
    ``log``, formatted with ``count`` (the lines not logged), ``window`` (its seconds)
    and ``example``; a window without such lines says nothing.  A line given a ``key``
    goes once per window for that key: a repeat is counted, as over the budget.  The
    summary goes at ``level`` (a warning unless said)."""

    def __init__(
        self,
        lines: int,
        window: float,
        summary: str,
        log: logging.Logger,
        clock=time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        self.clock = clock
        self.level = level
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
            self.log.log(self.level, "%s", text)
        self._window_end = now + self.window
        self._logged = 0
        self.unlogged = 0
        self._example = None
        self._keys.clear()
