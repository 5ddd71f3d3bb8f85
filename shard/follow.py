"""Follows: which PVs each following front-end hears of other front-ends' puts to.

A front-end mirrors a PV for its clients, and a client of another front-end may put
to it at any rate.  A front-end that says HELLO with ``follow`` is sent those puts only
for the PVs it follows: the ones its clients hold channels to (FOLLOW, on the first
channel and after the last, and all of them after every HELLO).  The rest of its
mirror is as the snapshot or its last FOLLOW left it, and a FOLLOW with a request
number is answered with the PV as it stands, which the front-end's reads wait for (a
CA read, the opening of a PVA channel).  So a front-end whose clients never look at
another's PVs spends nothing on their puts.

Creations, deletions and field changes still go to every front-end: they are rare, and
they are what a front-end's PV table and limits are made of.  A front-end that does
not follow hears of every change.

The other way round, each front-end is told which of its puts another one shows
(WANTED): those to the PVs another front-end follows, or all of them while one is
served that follows nothing.  It sends those at once, and the rest in batches, as a
front-end alone does: a PV that nobody else looks at costs no wake per put, here or
there.
"""

from __future__ import annotations

from collections.abc import Callable

from carelay.common.messages import Follow, Message, Wanted


class Follows:
    """Per following front-end, the PVs it follows (see the module)."""

    def __init__(self, epoch: int = 0) -> None:
        self._by_peer: dict[bytes, set[str]] = {}
        #: Per PV followed, the front-ends that follow it.
        self._followers: dict[str, set[bytes]] = {}
        #: The front-ends served that follow nothing: they hear of every change.
        self._all: set[bytes] = set()
        #: How many (front-end, PV) follows there are.
        self.count = 0
        self.epoch = epoch
        #: Answers a FOLLOW with a request number: ``answer(peer, name, req)`` sends
        #: ``name`` as it stands (RequestHandler.restate).
        self.answer: Callable[[bytes, str, int], None] = lambda peer, name, req: None
        #: Sends a front-end a message (Outbox.reply); the front-ends served
        #: (Admission.peers).
        self.tell: Callable[[bytes, Message], None] = lambda peer, msg: None
        self.peers: Callable[[], list[bytes]] = list

    def start(self, peer: bytes) -> None:
        """``peer`` said HELLO with ``follow``: it follows nothing yet, and hears which PVs
        the others follow."""
        self.forget(peer)
        self._by_peer[peer] = set()
        self._tell_wanted(peer)

    def hears_all(self, peer: bytes) -> None:
        """``peer`` is served and follows nothing: every put is the others' to send at once."""
        if peer not in self._all:
            self._tell_wanted(peer)
            before = set(self._all)
            self._all.add(peer)
            self._moved("", before, self._all)

    def _tell_wanted(self, peer: bytes) -> None:
        """What the others follow, for ``peer``, new: it follows nothing yet."""
        if self._all - {peer}:
            self.tell(peer, Wanted("", True, self.epoch))
        for name in self._followers:
            self.tell(peer, Wanted(name, True, self.epoch))

    def forget(self, peer: bytes) -> None:
        """``peer`` is served no more."""
        names = self._by_peer.pop(peer, ())
        self.count -= len(names)
        for name in names:
            self._unfollow(peer, name)
        if peer in self._all:
            before = set(self._all)
            self._all.discard(peer)
            self._moved("", before, self._all)

    def skips(self, peer: bytes, name: str) -> bool:
        """Whether another front-end's put to ``name`` does not go to ``peer``."""
        names = self._by_peer.get(peer)
        return names is not None and name not in names

    def heard(self, origin: bytes, name: str) -> bool:
        """Whether a front-end other than ``origin`` hears of its put to ``name``."""
        for peers in (self._followers.get(name), self._all):
            if peers and (len(peers) > 1 or origin not in peers):
                return True
        return False

    def handlers(self) -> dict:
        """The messages taken here, for the request handler (see RequestHandler)."""
        return {Follow: self._follow}

    def _follow(self, peer: bytes, msg: Follow) -> None:
        names = self._by_peer.get(peer)
        name = msg.name
        if names is not None and msg.on != (name in names):  # else it hears of every change
            if msg.on:
                names.add(name)
                followers = self._followers.setdefault(name, set())
                before = set(followers)
                followers.add(peer)
                self._moved(name, before, followers)
            else:
                names.discard(name)
                self._unfollow(peer, name)
            self.count += 1 if msg.on else -1
        if msg.on and msg.req:
            self.answer(peer, name, msg.req)

    def _unfollow(self, peer: bytes, name: str) -> None:
        followers = self._followers.get(name, set())
        before = set(followers)
        followers.discard(peer)
        if not followers:
            self._followers.pop(name, None)
        self._moved(name, before, followers)

    def _moved(self, name: str, before: set[bytes], after: set[bytes]) -> None:
        """The front-ends that follow ``name`` ("": that hear of every change) were
        ``before`` and are ``after``: those for which another one now does, or none does
        any longer, are told (WANTED)."""
        if len(before) > 1 and len(after) > 1:
            return  # wanted by another, for each of them, before and after
        for peer in self.peers():
            now = bool(after - {peer})
            if bool(before - {peer}) != now:
                self.tell(peer, Wanted(name, now, self.epoch))
