"""The refused and failed puts of a front-end, logged within budgets (``RefusedPuts``).

Refused names (broker/refusals.py), puts refused by access security
(broker/sockethooks.py) and what PCAS writes on stderr (broker/cstreams.py) have
budgets of their own: each a ``LogBudget`` (common/logbudget.py).
"""

from __future__ import annotations

import logging
import time

from carelay.common.config import LOGGED_NAME_CHARS, REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW
from carelay.common.logbudget import LogBudget

__all__ = ["RefusedPuts"]

#: Kinds of refusal bounded elsewhere: a refused name or a limit is logged once per name
#: (broker/refusals.py), an access denial through a budget of its own.
OWN_BUDGET = frozenset({"name", "limit", "access"})
#: Failures of the relay rather than of a client's put: a budget apart, so that a client's
#: bad puts never hide a shard that is down.
FAILURES = frozenset({"shard_down", "shard_refused"})


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
