"""Which peers a shard serves: the brokers of its own relay, on their newest connection.

Several brokers (front-ends) are served at once, each on its newest connection; every
change the shard applies goes to all of them (see ShardServer).

A peer (a ROUTER identity) is served once it has opened with a HELLO that presents the
relay's run token (any peer, where the shard asks for none).  With CurveZMQ keys, which
admit peers, a HELLO may come without a token (a front-end started alone, on another
host); one that presents a token not the shard's own is of another run, and refused.

A HELLO with a broker's id fences that broker's earlier connections: what still comes
through them is refused, so that a request the broker sent before it reconnected either
came before the snapshot it asks for now, or is never applied.
"""

from __future__ import annotations

import collections
import hmac
import logging
import time
from collections.abc import Callable

import numpy as np

from carelay.common.config import REFUSED_PEER_LOG_INTERVAL
from carelay.common.messages import DROPPED as _DROPPED
from carelay.common.messages import FENCED as _FENCED
from carelay.common.messages import SILENT as _SILENT
from carelay.common.messages import Hello, Message, Ping, Reject, Write
from carelay.common.protocol import WriteRun
from carelay.shard.follow import Follows
from carelay.shard.handler import EXPIRING

log = logging.getLogger(__name__)

#: Peers (ROUTER identities) remembered as admitted; a broker that reconnects is a new one.
_ADMITTED_MAX = 16
#: Fenced connections remembered.
_FENCED_MAX = 64
_NOT_OURS = (
    "not a front-end of this relay: no token, or another run's (another relay on the same "
    "endpoints and keys?)"
)


class Admission:
    """The peers a shard serves, and the refusal of the others (see the module)."""

    def __init__(
        self,
        token: str | None,
        reply: Callable[[bytes, Message], None],
        epoch: int = 0,
        follows: Follows | None = None,
        required: bool = True,
    ) -> None:
        #: What a peer presents in its HELLO before it is served (None: every peer is).
        self.token = token
        #: False where CurveZMQ keys admit peers: a HELLO without a token is served, one
        #: with a token not this shard's (a front-end of another run) is not.
        self.required = required
        self._reply = reply
        #: The shard's start id, which every reply carries.
        self.epoch = epoch
        #: The peers served, newest last, each with the broker it is (the id in its
        #: HELLO; "" where none came).
        self._admitted: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        #: Earlier connections of a broker that has said HELLO again, and connections that
        #: missed a change: what still comes through them is refused, with the reason.
        self._fenced: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        #: Per peer served, the WRITEs it has sent (what an APPLIED counts).
        self._writes: dict[bytes, int] = {}
        #: Per peer served, when its last message came (monotonic s; see ``silent``).
        self._heard: dict[bytes, float] = {}
        self._refused = 0
        self._refused_logged = -REFUSED_PEER_LOG_INTERVAL
        #: Plain WRITEs of a connection no longer served, to apply (``take_late``).
        self._late: list = []
        #: Told of each peer no longer served (ReadGate.forget).
        self.on_drop: Callable[[bytes], None] = lambda peer: None
        #: The PVs each peer that said HELLO with ``follow`` follows (started and forgotten
        #: with the peer here; the Outbox and the request handler use them too).
        self.follows = follows if follows is not None else Follows()

    def __contains__(self, peer: bytes) -> bool:
        """Whether ``peer`` is admitted already."""
        return peer in self._admitted

    def peers(self) -> list[bytes]:
        """The peers served, oldest first."""
        return list(self._admitted)

    def __len__(self) -> int:
        return len(self._admitted)

    def drop(self, peer: bytes, reason: str = _DROPPED) -> None:
        """Stop serving ``peer`` (gone, or missed a change): what it still sends is refused
        (its PINGs go unanswered, so its broker reconnects), and a new connection of its
        broker says HELLO and takes a fresh snapshot."""
        if self._admitted.pop(peer, None) is not None:
            self._fence(peer, reason)

    def heard(self, peer: bytes, now: float) -> None:
        """A message of ``peer`` came at ``now``."""
        self._heard[peer] = now

    def silent(self, before: float) -> list[bytes]:
        """The peers served whose last message came before ``before``."""
        heard = self._heard
        return [p for p in self._admitted if heard.get(p, before) < before]

    def drop_silent(self, peer: bytes) -> None:
        """Stop serving ``peer``, which sent nothing, not even a PING, for so long that it
        is hung (stopped, its host gone): everything published to it would wait in its
        queue, in this process's memory, for as long as it hangs."""
        self.drop(peer, _SILENT)

    def wrote(self, peer: bytes, n: int) -> int:
        """Count ``n`` more WRITEs from ``peer``; returns how many it has sent in all."""
        total = self._writes[peer] = self._writes.get(peer, 0) + n
        return total

    def written(self, peer: bytes) -> int:
        """How many WRITEs ``peer`` has sent in all (every one applied by now)."""
        return self._writes.get(peer, 0)

    def admit(self, peer: bytes, msgs: list) -> bool:
        """Whether to serve ``peer``, not yet admitted, that sent ``msgs``.

        Else its messages are dropped unanswered (a HELLO gets a REJECT, so that a
        misconfigured broker can say why); a fenced connection's requests get a REJECT
        each, on the old connection, where the broker may still listen."""
        if peer in self._fenced:
            self._refuse_fenced(peer, msgs)
            return False
        first = msgs[0]
        hello = type(first) is Hello
        if self._not_ours(first, hello):
            if hello:
                self._reply(peer, Reject(first.req, "", _NOT_OURS, self.epoch))
            self._refused_peer(len(msgs), "a peer without this relay's token, or of another run")
            return False
        broker = first.broker if hello else ""
        if broker:
            for old in [p for p, b in self._admitted.items() if b == broker]:
                del self._admitted[old]
                self._fence(old, _FENCED)
        self._admitted[peer] = broker
        if hello and first.follow:
            self.follows.start(peer)
        else:
            self.follows.hears_all(peer)
        if len(self._admitted) > _ADMITTED_MAX:
            oldest = self._admitted.popitem(last=False)[0]
            self._writes.pop(oldest, None)
            self._heard.pop(oldest, None)
            self.follows.forget(oldest)
            self.on_drop(oldest)
        return True

    def _not_ours(self, first, hello: bool) -> bool:
        """Whether a peer whose first message is ``first`` is refused for its token."""
        if not self.required:
            said = first.token if hello else ""
            if not said:
                return False  # the keys admitted it
            return self.token is None or not hmac.compare_digest(said.encode(), self.token.encode())
        return self.token is not None and not (
            hello and hmac.compare_digest(first.token.encode(), self.token.encode())
        )

    def _fence(self, peer: bytes, reason: str) -> None:
        self._writes.pop(peer, None)
        self._heard.pop(peer, None)
        self.follows.forget(peer)
        self.on_drop(peer)
        self._fenced[peer] = reason
        if len(self._fenced) > _FENCED_MAX:
            self._fenced.popitem(last=False)

    def take_late(self) -> list:
        """The plain WRITEs that the last refused messages brought and that are to be
        applied all the same (see ``_refuse_fenced``); taken."""
        late, self._late = self._late, []
        return late

    def _refuse_fenced(self, peer: bytes, msgs: list) -> None:
        """Refuse what a connection no longer served still brings: a REJECT for each
        request that waits for an answer and each heartbeat (the front-end reconnects on
        the first: see common.messages.NOT_SERVED).  Its plain WRITEs, which no client
        waits for, are its clients' latest puts where it was dropped (silent too long, a
        change it missed): it sent them before the PING whose refusal tells it, so before
        anything of its next connection; they are kept for the server to apply
        (``take_late``), as puts that came late.  An earlier connection of a broker that
        said HELLO again may bring them after its new connection's: dropped."""
        reason = self._fenced[peer]
        late = reason is not _FENCED
        for msg in msgs:
            if type(msg) is WriteRun:
                for name, req in zip(msg.names, msg.reqs, strict=True):
                    if req:
                        self._reply(peer, Reject(req, name, reason, self.epoch))
                if late and not all(msg.reqs):
                    self._late.append(_plain(msg))
            elif type(msg) is Write and not msg.req:
                if late:
                    self._late.append(msg)
            elif type(msg) in EXPIRING and msg.req:
                self._reply(peer, Reject(msg.req, msg.name, reason, self.epoch))
            elif type(msg) is Ping and msg.req:
                # A front-end that puts nothing learns so from its heartbeat, at once.
                self._reply(peer, Reject(msg.req, "", reason, self.epoch))
        who = "an earlier connection of a broker that reconnected"
        if reason is _DROPPED:
            who = "a broker connection that missed a change"
        elif reason is _SILENT:
            who = "a broker connection that was silent too long"
        self._refused_peer(len(msgs), who)

    def _refused_peer(self, n: int, who: str) -> None:
        """Count ``n`` refused messages; one log line per REFUSED_PEER_LOG_INTERVAL."""
        self._refused += n
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_PEER_LOG_INTERVAL:
            log.warning("refused %d messages from %s", self._refused, who)
            self._refused = 0
            self._refused_logged = now


def _plain(run: WriteRun) -> WriteRun:
    """The WRITEs of ``run`` that no client waits for."""
    keep = [k for k, req in enumerate(run.reqs) if not req]
    return WriteRun(
        run.dtype,
        [run.names[k] for k in keep],
        [0] * len(keep),
        [run.stamps[k] for k in keep],
        np.asarray(run.values, dtype=run.dtype)[keep],
    )
