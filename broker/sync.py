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
from carelay.common.naming import InvalidPvName
from carelay.common.protocol import Message, Op

log = logging.getLogger(__name__)

#: Answers that say a request was applied.
_APPLIED = frozenset({Op.ACK, Op.UPDATE, Op.FIELD, Op.DELETED})


class ShardSync:
    """Receives from the shard links and keeps the PV table in line with the shards."""

    def __init__(self, broker) -> None:
        self.broker = broker
        self.links: list[ShardLink] = broker.links
        self.table = broker.table
        self.requests = broker.requests
        #: Per shard, the snapshot being received: name -> (data, stamp, stored fields).
        self._snapshots: dict[int, dict] = {}
        self._poller = zmq.Poller()
        self._polled: tuple = ()

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
        """Handle what ``link`` has received, up to about ``limit`` messages."""
        n = 0
        while n < limit:
            msgs = link.recv()
            if msgs is None:
                break
            n += len(msgs)
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
                if msg.req in orphans:
                    ok = msg.op in _APPLIED
                    if not ok:
                        log.warning("shard %d refused %s: %s", link.index, msg.name, msg.reason)
                        self._shard_refused(link, msg)
                    self.requests.finish(link.index, msg.req, ok)
        return n

    def handle(self, link: ShardLink, msg: Message) -> None:
        op = msg.op
        k = link.index
        requests = self.requests
        requests.answered(k, msg.req)
        if link.live and msg.epoch != link.epoch:
            log.warning("shard %d restarted; resyncing", k)
            self.hello(link)
        if op is Op.UPDATE:
            pv = self.table.pvs.get(msg.name)
            if pv is None:
                try:
                    pv = self.table.new_pv(msg.name)
                except InvalidPvName as e:
                    log.warning("shard %d updated %s, which is not served: %s", k, msg.name, e)
                    requests.finish(k, msg.req, False)
                    return
            self.table.set_real(pv, True)
            pv.apply(
                msg.data, msg.stamp, append=pv.ring is not None, reset=bool(msg.info.get("reset"))
            )
            link.seq = msg.seq
            if msg.info.get("created"):
                self.broker.health.creations += 1
                log.debug("created PV %s (shard %d)", msg.name, k)
            requests.finish(k, msg.req, True)
        elif op is Op.ACK:
            link.seq = msg.seq
            requests.finish(k, msg.req, True)
        elif op is Op.FIELD:
            pv = self.table.pvs.get(msg.name)
            field = msg.info.get("field")
            if pv is not None and isinstance(field, str) and field in fields.STORED:
                pv.field_changed(field, msg.info.get("value"))
            link.seq = msg.seq
            requests.finish(k, msg.req, True)
        elif op is Op.REJECT:
            log.warning("shard %d refused %s: %s", k, msg.name, msg.reason)
            self._shard_refused(link, msg)
            requests.finish(k, msg.req, False)
        elif op is Op.DELETED:
            self.table.forget(msg.name)
            link.seq = msg.seq
            if not msg.info.get("restate"):
                self.broker.health.deletions += 1
            log.debug("deleted PV %s (shard %d)", msg.name, k)
            requests.finish(k, msg.req, True)
        elif op is Op.PONG:
            link.pvs = msg.info.get("pvs", link.pvs)
            self.broker.health.shards[k].update(msg.info)
            self.store_state(link, msg.info.get("store_error", ""))
        elif op is Op.SNAPSHOT_BEGIN:
            self._snapshots[k] = {}
        elif op is Op.SNAPSHOT:
            snap = self._snapshots.get(k)
            if snap is not None:
                stored = msg.info.get("fields")
                snap[msg.name] = (
                    msg.data.copy(),
                    msg.stamp,
                    stored if isinstance(stored, dict) else {},
                )
        elif op is Op.SNAPSHOT_END:
            self._resync(link, msg)
        else:
            log.warning("shard %d: unexpected %s dropped", k, op.name)

    def _shard_refused(self, link: ShardLink, msg: Message) -> None:
        """A REJECT: for ``relay:ERRORS``, with the client that waited for it if one did."""
        waiting = self.requests.waiter(link.index, msg.req)
        client = waiting.client if waiting is not None else None
        self.broker.error(
            "shard_refused", f"shard refused: {msg.reason}", msg.name, link.index, client
        )

    # -- resync ------------------------------------------------------------------------

    def _resync(self, link: ShardLink, end: Message) -> None:
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
        link.synced(end.epoch, end.seq, len(snap))
        self.broker.status_due = True  # `carelay status` learns of the link at once, not in 1 s
        self.store_state(link, end.info.get("store_error", ""))
        table.unserved.discard(link.index)
        log.debug("shard %d in sync at seq %d", link.index, end.seq)
        level = logging.DEBUG if self.broker.quiet_until is not None else logging.INFO
        log.log(level, "shard %d in sync: %d PVs", link.index, len(snap))

    def hello(self, link: ShardLink) -> None:
        info = {"broker": self.broker.instance}
        if self.broker.token is not None:
            info["token"] = self.broker.token
        if self.send_numbered(link, Op.HELLO, info):
            link.hello_sent()

    def send_numbered(self, link: ShardLink, op: Op, info: dict | None = None) -> bool:
        """A HELLO or PING, numbered like the puts so that its answer orders them."""
        self.requests.send(link)
        return link.send(Message(op, req=self.requests.number(), info=info or {}))

    def store_state(self, link: ShardLink, error) -> None:
        """Take what shard ``link`` says of its store; its PVs' alarms follow a change."""
        store_errors = self.broker.store_errors
        error = error if isinstance(error, str) else "store error"
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
