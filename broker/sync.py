"""ShardSync: what the shards send the broker, and how the mirror follows them.

Answers end their requests (see Requests); UPDATE, FIELD and DELETED change the mirror;
PONG carries a shard's figures and the state of its store; a snapshot (SNAPSHOT_BEGIN,
SNAPSHOT..., SNAPSHOT_END) after each HELLO brings the mirror of a shard's PVs back in
line with the shard, after which the updates that follow apply in sequence order.
"""

from __future__ import annotations

import logging
import time

import zmq

from carelay.broker.link import ShardLink
from carelay.common import fields
from carelay.common.messages import (
    Ack,
    Applied,
    Deleted,
    FieldChanged,
    Hello,
    Message,
    Ping,
    Pong,
    Reject,
    Snapshot,
    SnapshotBegin,
    SnapshotEnd,
    Update,
)
from carelay.common.naming import InvalidPvName

log = logging.getLogger(__name__)

#: Answers that say a request was applied.
_APPLIED = frozenset({Ack, Update, FieldChanged, Deleted})


class ShardSync:
    """Receives from the shard links and keeps the PV table in line with the shards."""

    def __init__(self, broker) -> None:
        self.broker = broker
        self.links: list[ShardLink] = broker.links
        self.table = broker.table
        self.requests = broker.requests
        #: Per shard, the snapshot being received: name -> (data, stamp, stored fields).
        self._snapshots: dict[int, dict] = {}
        #: Other front-ends change PVs too (configured, or a change of theirs seen).
        self.others = broker.config.brokers > 1 or broker.config.pva
        self._poller = zmq.Poller()
        self._polled: tuple = ()
        #: What each kind of message a shard sends is handled by.
        self._by_kind = {
            Update: self._update,
            Ack: self._ack,
            FieldChanged: self._field_changed,
            Reject: self._reject,
            Deleted: self._deleted,
            Pong: self._pong,
            SnapshotBegin: self._snapshot_begin,
            Snapshot: self._snapshot,
            SnapshotEnd: self._resync,
            Applied: self._applied,
        }

    # -- receiving ------------------------------------------------------------------

    def poll(self, timeout_ms: float) -> int:
        """Wait up to ``timeout_ms`` for answers and handle what came; returns how many."""
        socks = {link.sock: link for link in self.links if link.sock is not None}
        for link in self.links:
            for sock in link.parked:
                socks[sock] = link
        if not socks:
            return 0
        key = tuple(socks)
        if key != self._polled:
            self._poller = zmq.Poller()
            for sock in socks:
                self._poller.register(sock, zmq.POLLIN)
            self._polled = key
        n = 0
        for sock, _ in self._poller.poll(timeout_ms):
            link = socks[sock]
            n += self.drain(link) if sock is link.sock else self._drain_parked(link, sock)
        return n

    def drain(self, link: ShardLink, limit: int = 2000) -> int:
        """Handle what ``link`` has received, up to about ``limit`` messages; returns how
        many, a lone heartbeat answer not counted: it leaves CA nothing to send."""
        n = 0
        while n < limit:
            msgs = link.recv()
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
        while (msgs := link.recv_from(sock)) is not None:
            n += len(msgs)
            for msg in msgs:
                req = getattr(msg, "req", 0)
                if req in orphans:
                    ok = type(msg) in _APPLIED
                    if not ok:
                        log.warning("shard %d refused %s: %s", link.index, msg.name, msg.reason)
                        self._shard_refused(link, msg)
                    self.requests.finish(link.index, req, ok)
        return n

    def handle(self, link: ShardLink, msg: Message) -> None:
        """Take one message of shard ``link``: the answer it is to a request, and the change
        it brings to the mirror."""
        req = getattr(msg, "req", 0)  # a Snapshot answers nothing by itself
        self.requests.answered(link.index, req)
        handle = self._by_kind.get(type(msg))
        if handle is None:  # a kind that only a broker sends
            log.warning("shard %d: unexpected %s dropped", link.index, type(msg).__name__)
            return
        if link.live and msg.epoch != link.epoch:
            log.warning("shard %d restarted; resyncing", link.index)
            self.hello(link)
        handle(link, msg)

    def _update(self, link: ShardLink, msg: Update) -> None:
        k = link.index
        pv = self.table.pvs.get(msg.name)
        if pv is None:
            try:
                pv = self.table.new_pv(msg.name)
            except InvalidPvName as e:
                log.warning("shard %d updated %s, which is not served: %s", k, msg.name, e)
                self.requests.finish(k, msg.req, False)
                return
        self.table.set_real(pv, True)
        # Another broker's change, while this broker's own later WRITE was not yet applied
        # when the shard sent it: that WRITE comes after it at the shard too (see _applied).
        if (
            not msg.req
            and not msg.reset
            and pv.ring is None
            and link.own_writes.get(msg.name, 0) > link.writes_applied
        ):
            return
        if not msg.req:
            self.others = True
        pv.apply(msg.data, msg.stamp, append=pv.ring is not None, reset=msg.reset)
        if msg.created:
            self.broker.health.creations += 1
            log.debug("created PV %s (shard %d)", msg.name, k)
        self.requests.finish(k, msg.req, True)

    def _applied(self, link: ShardLink, msg: Applied) -> None:
        """The shard has applied the first ``msg.writes`` WRITEs of this connection."""
        link.writes_applied = msg.writes
        if msg.writes >= link.writes:
            link.own_writes.clear()

    def _ack(self, link: ShardLink, msg: Ack) -> None:
        self.requests.finish(link.index, msg.req, True)

    def _field_changed(self, link: ShardLink, msg: FieldChanged) -> None:
        pv = self.table.pvs.get(msg.name)
        if pv is not None and msg.field in fields.STORED:
            pv.field_changed(msg.field, msg.value)
        self.requests.finish(link.index, msg.req, True)

    def _reject(self, link: ShardLink, msg: Reject) -> None:
        log.warning("shard %d refused %s: %s", link.index, msg.name, msg.reason)
        self._shard_refused(link, msg)
        self.requests.finish(link.index, msg.req, False)

    def _deleted(self, link: ShardLink, msg: Deleted) -> None:
        self.table.forget(msg.name)
        if not msg.restate:
            self.broker.health.deletions += 1
        log.debug("deleted PV %s (shard %d)", msg.name, link.index)
        self.requests.finish(link.index, msg.req, True)

    def _pong(self, link: ShardLink, msg: Pong) -> None:
        link.pvs = msg.pvs
        self.broker.health.shards[link.index].update(msg)
        self.store_state(link, msg.store_error)

    def _snapshot_begin(self, link: ShardLink, msg: SnapshotBegin) -> None:
        self._snapshots[link.index] = {}

    def _snapshot(self, link: ShardLink, msg: Snapshot) -> None:
        snap = self._snapshots.get(link.index)
        if snap is not None:
            snap[msg.name] = (msg.data.copy(), msg.stamp, msg.fields)

    def _shard_refused(self, link: ShardLink, msg: Reject) -> None:
        """A REJECT: for ``relay:ERRORS``, with the client that waited for it if one did."""
        waiting = self.requests.waiter(link.index, msg.req)
        client = waiting.client if waiting is not None else None
        self.broker.error(
            "shard_refused", f"shard refused: {msg.reason}", msg.name, link.index, client
        )

    # -- resync ------------------------------------------------------------------------

    def _resync(self, link: ShardLink, end: SnapshotEnd) -> None:
        snap = self._snapshots.pop(link.index, None)
        if snap is None:
            return
        table = self.table
        for name, pv in list(table.pvs.items()):
            if pv.shard == link.index and pv.real and name not in snap:
                table.forget(name)
        for name, (data, stamp, stored) in snap.items():
            pv = table.pvs.get(name)
            if pv is None:
                try:
                    pv = table.new_pv(name)
                except InvalidPvName as e:
                    log.warning(
                        "shard %d holds %s, which this relay cannot serve: %s", link.index, name, e
                    )
                    continue
            if pv.shard != link.index:
                log.warning(
                    "shard %d holds %s, which belongs to shard %d under %d shards",
                    link.index,
                    name,
                    pv.shard,
                    len(self.links),
                )
            table.set_real(pv, True)
            pv.set_fields({k: v for k, v in stored.items() if k in fields.STORED})
            pv.apply(data, stamp, append=False, owned=True)  # the snapshot's own copy
        if link.ever_synced and end.epoch != link.epoch:
            self.broker.health.restarts[link.index].append(time.monotonic())  # a new process
            self.requests.fail_orphans(link.index)
        link.synced(end.epoch, len(snap))
        self.broker.status_due = True  # `carelay status` learns of the link at once, not in 1 s
        self.store_state(link, end.store_error)
        table.unserved.discard(link.index)
        log.debug("shard %d in sync at seq %d", link.index, end.seq)
        level = logging.DEBUG if self.broker.quiet_until is not None else logging.INFO
        log.log(level, "shard %d in sync: %d PVs", link.index, len(snap))

    def hello(self, link: ShardLink) -> None:
        """Ask shard ``link`` for a snapshot, with this broker's id and the relay's token."""
        self.requests.send(link)
        hello = Hello(self.requests.number(), self.broker.token or "", self.broker.instance)
        if link.send(hello):
            link.hello_sent()

    def ping(self, link: ShardLink) -> None:
        """A heartbeat, numbered like the puts so that its answer orders them."""
        self.requests.send(link)
        link.send(Ping(self.requests.number()))

    def store_state(self, link: ShardLink, error: str) -> None:
        """Take what shard ``link`` says of its store; its PVs' alarms follow a change."""
        store_errors = self.broker.store_errors
        if error == store_errors[link.index]:
            return
        store_errors[link.index] = error
        if error:
            log.warning("shard %d: %s; puts with callback to its PVs fail", link.index, error)
        else:
            log.warning("shard %d can write its store again", link.index)
        for pv in self.table.pvs.values():
            if pv.shard == link.index and pv.real:
                pv.post(0)  # alarm change only: WRITE/MAJOR, or back

    def link_down(self, link: ShardLink, gone: bool = False) -> None:
        """``gone``: the shard process closed the connection (see ShardLink.local), so
        what it has not answered it never applies: those requests fail now."""
        self.broker.status_due = True
        self.broker.store_errors[link.index] = ""  # unknown until it answers again: COMM alarm
        link.down_since = time.monotonic()
        self.requests.link_down(link.index, gone)
        self._snapshots.pop(link.index, None)
        for pv in self.table.pvs.values():
            if pv.shard == link.index and pv.real:
                pv.post(0)  # alarm change only: COMM/INVALID


def catch_up(sync: ShardSync, link: ShardLink) -> None:
    """Before a read: what ``link``'s shard has sent already is taken first.  The shard
    sends other front-ends a change before it answers the put that made it
    (``Outbox.send``), so a read here right after that put completed finds the change."""
    sock = link.sock
    if sock is not None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        sync.drain(link)
