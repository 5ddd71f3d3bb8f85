"""LinkState, LinkTimers: the states of a broker's link to a shard, and the timers that
move it between them (reconnect back-off, connection deadline, heartbeat); no sockets."""

from __future__ import annotations

import enum
import math

from carelay.common.config import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    RECONNECT_INITIAL,
    RECONNECT_MAX,
)

#: A ping due this soon goes with a tick that runs now: the links' pings fall into step,
#: and an idle broker wakes once for all of them (s).
_PING_EARLY = HEARTBEAT_INTERVAL / 4
#: How long a shard may stay silent, or a connection take to carry a HELLO (s).
_SILENCE = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS


class LinkState(enum.Enum):
    DOWN = "down"  # no socket; waiting for the back-off to pass
    CONNECTING = "connecting"  # socket made, HELLO not yet accepted by ZeroMQ
    SYNCING = "syncing"  # HELLO sent, snapshot not complete
    LIVE = "live"


class LinkTimers:
    """One link's clock: when it reconnects, gives up connecting, pings its shard, and
    takes the shard for gone (asked, and silent for _SILENCE).  Times are monotonic
    seconds."""

    def __init__(self) -> None:
        self.backoff = RECONNECT_INITIAL
        self.retry_at = 0.0
        self.last_heard = 0.0
        self.last_ping = 0.0
        self.connect_deadline = 0.0
        #: When this front-end asked the shard something (a HELLO, a PING) that nothing it
        #: heard since answers; None: it heard from the shard since it last asked.  The
        #: shard's silence counts from there: a shard is silent only when asked (a loop
        #: held up for seconds asks nothing, and the shard rightly says nothing).
        self.asked_at: float | None = None

    def heard(self, now: float) -> None:
        """The shard said something at ``now``."""
        self.last_heard = now
        self.asked_at = None

    def asked(self, now: float) -> None:
        """A request went to the shard at ``now`` (a HELLO, a PING)."""
        if self.asked_at is None:
            self.asked_at = now

    def connecting(self, now: float) -> None:
        """A connection was made at ``now``: it has until the deadline to carry a HELLO."""
        self.connect_deadline = now + _SILENCE

    def retry_later(self, now: float) -> float:
        """The link went down at ``now``: the next try after the back-off, which doubles
        up to RECONNECT_MAX for the try after.  Returns this back-off (s)."""
        backoff = self.backoff
        self.retry_at = now + backoff
        self.backoff = min(backoff * 2, RECONNECT_MAX)
        return backoff

    def synced(self) -> None:
        """The link came live: the next loss retries soon again."""
        self.backoff = RECONNECT_INITIAL

    def action(self, state: LinkState, now: float) -> str | None:
        """What a link in ``state`` has to do at ``now``: "open" (the back-off passed),
        "hello" (still connecting), "no connection" or "no heartbeat" (give up: the
        reason), "ping" (noted as sent), or None."""
        if state is LinkState.DOWN:
            return "open" if now >= self.retry_at else None
        if state is LinkState.CONNECTING:
            return "no connection" if now >= self.connect_deadline else "hello"
        if self.asked_at is not None and now - self.asked_at > _SILENCE:
            return "no heartbeat"
        if now - self.last_ping >= HEARTBEAT_INTERVAL - _PING_EARLY:
            self.last_ping = now
            self.asked(now)
            return "ping"
        return None

    def due(self, state: LinkState) -> float:
        """When ``action`` next has something to do for ``state``; 0.0: at every tick."""
        if state is LinkState.DOWN:
            return self.retry_at
        if state is LinkState.CONNECTING:
            return 0.0
        silent = math.inf if self.asked_at is None else self.asked_at + _SILENCE
        return min(self.last_ping + HEARTBEAT_INTERVAL, silent)


class WantedPvs:
    """The PVs of a shard that another front-end follows (or all of them, while one is
    served that follows nothing), as the shard says (WANTED, see shard/follow.py): a plain
    put to one goes to the shard at once, the rest with the next batch or tick."""

    __slots__ = ("names", "all")

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.all = False

    def __contains__(self, name: str) -> bool:
        return self.all or name in self.names

    def take(self, name: str, on: bool) -> None:
        if not name:
            self.all = on
        elif on:
            self.names.add(name)
        else:
            self.names.discard(name)

    def clear(self) -> None:
        """A new HELLO: the shard tells them all again."""
        self.names.clear()
        self.all = False
