"""The cap on the monitor events one PV posts in one turn of the broker's loop.

A burst of puts to one PV within one turn (a script writing fast while a display
watches) posts TURN_POST_CAP events at once; the turn's further events of that PV
are merged into one, posted when the turn ends: the PV's latest value, stamp and
alarm, with the event kinds of all of them OR'ed.  An IOC's CA server does the same
for each subscription once 16 events wait in its queue, so monitors see what they
would see anyway (the last value of a burst always, in order), and the broker does
not build an event for each value the CA server would replace.  No pcaspy: the PVs
post through their own ``post_held``.
"""

from __future__ import annotations

#: Events one PV posts in one loop turn before the rest wait for the turn's end.
TURN_POST_CAP = 16


class TurnPosts:
    """The posts of each PV in the loop's current turn, and the events held past the cap
    until the turn ends (``flush``)."""

    __slots__ = ("counts", "held")

    def __init__(self) -> None:
        #: Posts made this turn, by PV.
        self.counts: dict = {}
        #: Events held this turn (OR'ed masks), by PV, in the order first held.
        self.held: dict = {}

    def admit(self, pv, mask: int) -> int:
        """The events of ``mask`` that ``pv`` posts now: all of them for the turn's first
        TURN_POST_CAP posts of it; past those 0, and ``mask`` waits for ``flush``."""
        counts = self.counts
        n = counts.get(pv, 0)
        if n < TURN_POST_CAP:
            counts[pv] = n + 1
            return mask
        held = self.held
        held[pv] = held.get(pv, 0) | mask
        return 0

    def flush(self) -> None:
        """The turn ends: each PV with events held posts them as one (``post_held``)."""
        if self.counts:
            self.counts = {}
        if self.held:
            held, self.held = self.held, {}
            for pv, mask in held.items():
                pv.post_held(mask)
