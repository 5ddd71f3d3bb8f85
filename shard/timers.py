"""ShardTimers, wait_ms: the shard loop's clock (the autosave flush, the good copy, the
status file, the brokers' silence) and how long the loop waits for messages.

While nothing changes, only the clocks that have work wake the loop: the flush only
while values wait to be saved, the status file only at STATUS_TOUCH_INTERVAL (it is
rewritten every STATUS_INTERVAL at the wakes that come anyway, a broker's ping).  An
idle shard with a broker connected then wakes for the pings alone."""

from __future__ import annotations

import math

from carelay.common.config import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    STATUS_INTERVAL,
    STATUS_TOUCH_INTERVAL,
)
from carelay.shard.autosave import GOOD_COPY_INTERVAL

#: The longest wait for a message while something may change on its own (a store that
#: failed, a flush in parts) (ms); otherwise the loop waits until a timer is due.
BUSY_WAIT_MS = 100
#: A timer is looked at once the clock is this far beyond it (s).
_LATE = 0.001
#: How much later than STATUS_INTERVAL a status file that would say the same is due:
#: it is only touched, every STATUS_TOUCH_INTERVAL (s).
_TOUCH_LATER = STATUS_TOUCH_INTERVAL - STATUS_INTERVAL
#: Silence after which the brokers are taken to have gone quiet (s).
_QUIET_AFTER = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS


class ShardTimers:
    """When the loop flushes values, refreshes the good copy and writes its status file,
    and whether a broker has been heard from lately.  Times are monotonic seconds."""

    def __init__(self, autosave_period: float, good_copy: bool) -> None:
        self.autosave_period = autosave_period
        #: The store keeps a good copy (a shard with a database file).
        self.good_copy = good_copy
        self.next_flush = self.next_copy = self.next_status = 0.0
        #: When a broker was last heard from, and whether one counts as connected.
        self.broker_seen = 0.0
        self.broker_alive = False

    def start(self, now: float) -> None:
        """The loop starts at ``now``: the first flush and good copy are a period away, the
        status file is due at once."""
        self.next_flush = now + self.autosave_period
        self.next_copy = now + GOOD_COPY_INTERVAL if self.good_copy else math.inf
        self.next_status = 0.0

    def heard(self, now: float) -> bool:
        """A broker's message came at ``now``; True when none was connected before."""
        self.broker_seen = now
        if self.broker_alive:
            return False
        self.broker_alive = True
        return True

    def went_quiet(self, now: float) -> bool:
        """True once, when the brokers have been silent too long at ``now``."""
        if self.broker_alive and now - self.broker_seen > _QUIET_AFTER:
            self.broker_alive = False
            return True
        return False

    def flush_due(self, now: float) -> bool:
        """The autosave period passed: True, and the next flush is a period away."""
        if now < self.next_flush:
            return False
        self.next_flush = now + self.autosave_period
        return True

    def copy_due(self, now: float) -> bool:
        """The good copy is due: True, and the next one is GOOD_COPY_INTERVAL away."""
        if now < self.next_copy:
            return False
        self.next_copy = now + GOOD_COPY_INTERVAL
        return True

    def status_due(self, now: float, changed: bool, moved: bool = True) -> bool:
        """The status file is due (``changed``: the store's state changed; ``moved``:
        what the file says may have moved, e.g. the number of PVs): True, and the next
        one is STATUS_INTERVAL away, looked at in a wake that comes anyway.  A file that
        would say the same is only touched, every STATUS_TOUCH_INTERVAL (``due``)."""
        wait = 0.0 if moved else _TOUCH_LATER
        if now < self.next_status + wait and not changed:
            return False
        self.next_status = now + STATUS_INTERVAL
        return True

    def due(self, unsaved: bool = True) -> float:
        """When the next timer is due: the flush only while values are ``unsaved``; the
        status file at the latest when it would otherwise go stale; a connected broker's
        silence."""
        status = self.next_status + _TOUCH_LATER
        quiet = self.broker_seen + _QUIET_AFTER if self.broker_alive else status
        flush = self.next_flush if unsaved else math.inf
        return min(flush, status, self.next_copy, quiet)


def wait_ms(now: float, due: float, busy: bool) -> int:
    """How long the shard waits for messages at ``now`` (ms): until ``due``, its next
    timer; at most BUSY_WAIT_MS while ``busy`` (something may change on its own)."""
    wait = round(max(0.0, due + _LATE - now) * 1000)
    return min(BUSY_WAIT_MS, wait) if busy else wait
