"""ShardReceiver: the wait on the shard links, shared by every front-end's ShardSync.

One poll sees every shard socket (and the sockets a link keeps from an earlier
connection, for the answers to its requests in flight) and, where a front-end has one,
a descriptor of its own (``wake_fd``: the PVA front-end's inbox, which p4p's threads
write to), so that whichever comes first ends the wait at once.
"""

from __future__ import annotations

import logging

import zmq

from carelay.broker.link import ShardLink
from carelay.common.messages import Ack, Deleted, FieldChanged, Message, Pong, Update

log = logging.getLogger(__name__)

#: Answers that say a request was applied.
APPLIED = frozenset({Ack, Update, FieldChanged, Deleted})


class ShardReceiver:
    """Waits for what the shards send and hands each message to ``handle``."""

    #: A descriptor polled beside the shard sockets, or None.
    wake_fd: int | None = None
    #: The last poll found ``wake_fd`` readable (the caller clears it once it acted).
    woken = False

    def __init__(self, links: list[ShardLink], requests) -> None:
        self.links = links
        self.requests = requests
        self._poller = zmq.Poller()
        #: The sockets ``_poller`` holds (None: none yet).
        self._polled: tuple | None = None

    def handle(self, link: ShardLink, msg: Message) -> None:
        raise NotImplementedError

    def _shard_refused(self, link: ShardLink, msg) -> None:
        raise NotImplementedError

    def poll(self, timeout_ms: float) -> int:
        """Wait up to ``timeout_ms`` for answers and handle what came; returns how many."""
        socks = {link.sock: link for link in self.links if link.sock is not None}
        for link in self.links:
            for sock in link.parked:
                socks[sock] = link
        if not socks and self.wake_fd is None:
            return 0
        key = tuple(socks)
        if key != self._polled:
            self._poller = zmq.Poller()
            if self.wake_fd is not None:
                self._poller.register(self.wake_fd, zmq.POLLIN)
            for sock in socks:
                self._poller.register(sock, zmq.POLLIN)
            self._polled = key
        n = 0
        for sock, _ in self._poller.poll(timeout_ms):
            link = socks.get(sock)
            if link is None:
                self.woken = True  # wake_fd
                continue
            if sock is link.sock:
                n += self.drain(link, ready=True)
            else:
                n += self._drain_parked(link, sock)
        return n

    def drain(self, link: ShardLink, limit: int = 2000, ready: bool = False) -> int:
        """Handle what ``link`` has received, up to about ``limit`` messages; returns how
        many, a lone heartbeat answer not counted: it leaves CA nothing to send.
        ``ready``: a poll just found the link's socket readable."""
        n = 0
        while n < limit:
            msgs = link.recv(ready)
            ready = False
            if msgs is None:
                break
            n += len(msgs) if len(msgs) > 1 or type(msgs[0]) is not Pong else 0
            for msg in msgs:
                self.handle(link, msg)
        return n

    def _drain_parked(self, link: ShardLink, sock) -> int:
        """Answers to orphans, on a socket of an earlier connection: each completes its
        request.  Nothing else there counts: the reconnect's snapshot shows the shard."""
        n = 0
        orphans = self.requests.orphans[link.index]
        ready = True  # the poll found it readable
        while (msgs := link.recv_from(sock, ready)) is not None:
            ready = False
            n += len(msgs)
            for msg in msgs:
                req = getattr(msg, "req", 0)
                if req in orphans:
                    if type(msg) in APPLIED:
                        self.requests.finish(link.index, req, True)
                    else:
                        self._orphan_refused(link, sock, msg)
        return n

    def _orphan_refused(self, link: ShardLink, sock, msg) -> None:
        """The shard refused orphan ``msg.req`` on ``sock``: it fails."""
        self._shard_refused(link, msg)
        self.requests.finish(link.index, msg.req, False)
