"""ShardClock: how far a shard's wall clock is from this front-end's.

A request that waits for an answer carries its expiry in wall-clock time, and the
shard judges it by its own clock (see Requests.expect); its last flush, as a PONG says
it, is a time of its clock too.  On one host the clocks are the same; a shard on
another host may be seconds off (no NTP, or a clock stepped), which would make
every request expire at once (shard ahead) or let one be applied after the front-end
failed it (shard behind).  So the front-end learns the difference from the heartbeats,
as NTP does: each PONG says the shard's time when it answered, and with the PING's
round trip ``rtt`` the offset is known to within ``rtt / 2``.  Of the last WINDOW
samples, the one with the shortest round trip is used: a late PONG (a busy shard or
link) says little.
"""

from __future__ import annotations

import collections
import math

from carelay.common.config import EXPIRY_MARGIN

#: Samples of the offset kept (one per heartbeat, HEARTBEAT_INTERVAL apart): a clock
#: that is stepped is followed within this many heartbeats.
WINDOW = 8
#: A round trip longer than this says too little of the offset (half of it is the error):
#: a quarter of the expiry margin at worst.
MAX_RTT = EXPIRY_MARGIN / 2


class ShardClock:
    """The offset of one shard's wall clock from ours (shard minus here, seconds)."""

    __slots__ = ("offset", "_samples", "_ping")

    def __init__(self) -> None:
        #: 0.0 until a PONG has said otherwise.
        self.offset = 0.0
        self._samples: collections.deque = collections.deque(maxlen=WINDOW)
        #: The PING in flight: (its request number, our time when it went).
        self._ping: tuple[int, float] | None = None

    def pinged(self, req: int, now: float) -> None:
        """PING ``req`` went at ``now`` (our wall clock)."""
        self._ping = (req, now)

    def ponged(self, req: int, remote: float, now: float) -> None:
        """The PONG to ``req`` came at ``now``, saying the shard's time was ``remote``
        (0.0: it did not say)."""
        ping = self._ping
        if ping is None or ping[0] != req:
            return  # a PONG of the shard's own (``req`` 0), or to an older PING
        self._ping = None
        if 0.0 < remote < math.inf:  # said, and a time (not NaN, not infinite)
            self.sample(ping[1], remote, now)

    def sample(self, sent: float, remote: float, received: float) -> None:
        """One round trip: sent at ``sent``, answered at ``remote`` by the shard's clock,
        back at ``received``."""
        rtt = received - sent
        if not 0.0 <= rtt <= MAX_RTT:
            return
        self._samples.append((rtt, remote - (sent + received) / 2))
        self.offset = min(self._samples)[1]

    def to_shard(self, t: float) -> float:
        """Our wall-clock time ``t`` as the shard's clock reads it then."""
        return t + self.offset

    def from_shard(self, t: float) -> float:
        """The shard's wall-clock time ``t`` as ours reads it then."""
        return t - self.offset
