"""What a shard sends back for one batch: the replies, and the changes it publishes.

The loop collects them here while it handles a batch, commits the batch, and only then
sends them (so a creation or deletion is durable before anyone hears of it).  Each
applied change goes to the peer that asked (its answer) and, published, to every other
peer served, all on the one ROUTER socket: one ordered stream per broker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import zmq

from carelay.common import protocol
from carelay.common.messages import Applied, FieldChanged, Message, Pong, Reject, Update
from carelay.common.runs import UpdateRun, update_runs
from carelay.shard.follow import Follows
from carelay.shard.gate import ReadGate

#: Replies that change nothing, which a failed commit leaves as they are.
_NOT_A_CHANGE = (Reject, Pong)


class Outbox:
    """The messages of one batch, per peer and in order, until they are sent."""

    def __init__(
        self,
        peers: Callable[[], Iterable[bytes]],
        lost: Callable[[bytes, int, zmq.ZMQError], None],
        epoch: int,
        gate: ReadGate,
        follows: Follows,
    ) -> None:
        #: The peers served (Admission.peers), to publish to.
        self._peers = peers
        #: Told of a peer that missed messages (it must resync).
        self._lost = lost
        self._epoch = epoch
        #: Holds answers until the front-ends that watch their PVs have shown them.
        self.gate = gate
        #: (peer, message) in the order they are to go.
        self.items: list[tuple[bytes, Message]] = []
        #: The ids of the messages in ``items`` that publish a change to the other peers.
        self._published: set[int] = set()
        #: The PVs whose puts each following peer hears of (Admission keeps them).
        self.follows = follows
        #: Per peer, the last APPLIED not sent yet (see ``_tell_applied``), and whether
        #: ``items`` holds one.
        self._untold: dict[bytes, Applied] = {}
        self._applied = False

    def reply(self, peer: bytes, msg: Message) -> None:
        self.items.append((peer, msg))

    def applied(self, peer: bytes, msg: Applied) -> None:
        """An APPLIED for ``peer``, in its place among the replies."""
        self.items.append((peer, msg))
        self._applied = True

    def publish(self, origin: bytes, msg: Message) -> None:
        """A change that ``origin`` caused, for every other peer served: a put only for
        those that hear of it (see Follows)."""
        items = self.items
        queued = len(items)
        skips = self.follows.skips if type(msg) is Update and not msg.created else None
        for peer in self._peers():
            if peer != origin and (skips is None or not skips(peer, msg.name)):
                items.append((peer, msg))
        # Only a message ``items`` holds keeps its id until ``send``: one that no peer
        # took is freed at once, and the next message made may get its id.
        if len(items) > queued:
            self._published.add(id(msg))

    def refuse(self, undone: dict[str, int | None], error) -> None:
        """Changes were undone (their commit failed; see ShardStore.rollback_unsaved):
        their answers become Rejects that say why, and they are not published.  Those
        are a PV's field changes, and all of its changes from its creation or deletion
        on; its value puts before that, or beside field changes alone, stay applied and
        answered as they were."""
        reason = f"autosave failed: {error}"
        published = self._published
        items, dropped = [], set()
        for peer, msg in self.items:
            name = getattr(msg, "name", None)
            if name not in undone or type(msg) in _NOT_A_CHANGE:
                items.append((peer, msg))
                continue
            since = undone[name]
            if type(msg) is not FieldChanged and (
                since is None or getattr(msg, "seq", since) < since
            ):
                items.append((peer, msg))  # not undone
            elif id(msg) in published:
                dropped.add(id(msg))
            else:
                items.append((peer, Reject(getattr(msg, "req", 0), name, reason, self._epoch)))
        self.items = items
        published -= dropped  # freed now: by ``send``, another message may have the id

    def send(self, sock: zmq.Socket) -> None:
        """Send what was collected, batched per peer, each peer's messages in order.

        The peers that only hear of others' changes go first, the peers answered last:
        every other front-end's copy of a change is on its way before the answer that
        completes the put, so a read through another front-end right after the put
        completes finds it there.  An answer that must wait until a front-end has shown
        the change waits in the gate (see ReadGate), and goes when it no longer does."""
        items, self.items = self.items, []
        published = self._published
        per_peer: dict[bytes, list[Message]] = {}
        answered: set[bytes] = set()
        for peer, msg in items:
            per_peer.setdefault(peer, []).append(msg)
            if id(msg) not in published:
                answered.add(peer)
        published.clear()
        if self._untold or self._applied:
            self._applied = False
            self._tell_applied(per_peer)
        gate = self.gate
        if gate.active:
            gate.route(per_peer, answered, time.monotonic())
        for peer, msgs in sorted(per_peer.items(), key=lambda pm: pm[0] in answered):
            self._send(sock, peer, msgs)
        if gate.held:
            for peer, msgs in gate.release():
                self._send(sock, peer, msgs)

    def _tell_applied(self, per_peer: dict[bytes, list[Message]]) -> None:
        """An APPLIED matters to a broker only before a change that another front-end made
        after its WRITEs (see ShardSync._change): one that would go alone is kept back, and
        goes first with whatever that broker is sent next (a change, an answer, a PONG).
        A broker that only writes then wakes for no message at all."""
        untold = self._untold
        for peer, msgs in list(per_peer.items()):
            if all(type(msg) is Applied for msg in msgs):
                untold[peer] = msgs[-1]
                del per_peer[peer]
            elif peer in untold:
                msgs.insert(0, untold.pop(peer))  # applied before all of this batch
        if len(untold) > 1:  # more than one writer: forget those no longer served
            served = set(self._peers())
            for peer in [p for p in untold if p not in served]:
                del untold[peer]

    def _send(self, sock: zmq.Socket, peer: bytes, msgs: list[Message]) -> None:
        if not msgs:
            return  # all held
        # Published scalar changes (other front-ends' puts, the bulk of what a peer hears)
        # travel as runs, column by column: one entry each to encode and to decode.
        for batch in protocol.batches(update_runs(msgs)):
            frames = protocol.encode_batch(batch)
            try:
                # Never blocking: with ROUTER_MANDATORY a full pipe blocks a send without
                # NOBLOCK, and one hung front-end would stop the shard for all.
                protocol.send_frames(sock, [peer, *frames], zmq.NOBLOCK)
            except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or queue full
                # It gets nothing more of this batch: a later run would follow a gap.
                self._lost(peer, sum(len(m) if type(m) is UpdateRun else 1 for m in batch), e)
                break
