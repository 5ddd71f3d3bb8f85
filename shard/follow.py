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
"""

from __future__ import annotations

from collections.abc import Callable

from carelay.common.messages import Follow


class Follows:
    """Per following front-end, the PVs it follows (see the module)."""

    def __init__(self) -> None:
        self._by_peer: dict[bytes, set[str]] = {}
        #: How many (front-end, PV) follows there are.
        self.count = 0
        #: Answers a FOLLOW with a request number: ``answer(peer, name, req)`` sends
        #: ``name`` as it stands (RequestHandler.restate).
        self.answer: Callable[[bytes, str, int], None] = lambda peer, name, req: None

    def start(self, peer: bytes) -> None:
        """``peer`` said HELLO with ``follow``: it follows nothing yet."""
        self.forget(peer)
        self._by_peer[peer] = set()

    def forget(self, peer: bytes) -> None:
        """``peer`` is served no more."""
        self.count -= len(self._by_peer.pop(peer, ()))

    def skips(self, peer: bytes, name: str) -> bool:
        """Whether another front-end's put to ``name`` does not go to ``peer``."""
        names = self._by_peer.get(peer)
        return names is not None and name not in names

    def handlers(self) -> dict:
        """The messages taken here, for the request handler (see RequestHandler)."""
        return {Follow: self._follow}

    def _follow(self, peer: bytes, msg: Follow) -> None:
        names = self._by_peer.get(peer)
        if names is not None:  # else it hears of every change anyway
            n = len(names)
            if msg.on:
                names.add(msg.name)
            else:
                names.discard(msg.name)
            self.count += len(names) - n
        if msg.on and msg.req:
            self.answer(peer, msg.name, msg.req)
