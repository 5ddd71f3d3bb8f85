"""ShardSync: what the shards send the broker, and how the mirror follows them.

Answers end their requests (see Requests); UPDATE, FIELD and DELETED change the mirror;
PONG carries a shard's figures and the state of its store; a snapshot (SNAPSHOT_BEGIN,
SNAPSHOT..., SNAPSHOT_END) after each HELLO brings the mirror of a shard's PVs back in
line with the shard, after which the updates that follow apply in sequence order.
"""

from __future__ import annotations

import gc
import logging
import time

import zmq

from carelay.broker.link import ShardLink, link_for
from carelay.broker.linkstate import LinkState
from carelay.broker.receive import ShardReceiver
from carelay.common import fields
from carelay.common.messages import (
    DROPPED,
    EXPIRED,
    NOT_SERVED,
    SILENT,
    Ack,
    Applied,
    Confirm,
    Deleted,
    FieldChanged,
    Follow,
    Hello,
    Message,
    Ping,
    Pong,
    Reject,
    Shown,
    Snapshot,
    SnapshotBegin,
    SnapshotEnd,
    Update,
    Wanted,
    Watch,
)
from carelay.common.naming import InvalidPvName
from carelay.common.runs import UpdateRun

log = logging.getLogger(__name__)

#: Snapshot entries gathered between two ``gc.freeze()`` (see ``ShardSync._snapshot``).
_FREEZE_EVERY = 10_000
#: Why a shard refuses, unapplied, what the current connection brings, and it reconnects.
_RETRIED = frozenset({DROPPED, SILENT})


class ShardSync(ShardReceiver):
    """Receives from the shard links and keeps the PV table in line with the shards."""

    #: The PVs followed are watched too (``watches``); the PVA front-end watches those its
    #: channels serve instead (PvaSync).
    watch_follows = True

    def __init__(self, broker) -> None:
        super().__init__(broker.links, broker.requests)
        self.broker = broker
        self.table = broker.table
        #: Per shard, the snapshot being received: name -> (data, stamp, stored fields).
        self._snapshots: dict[int, dict] = {}
        #: Other front-ends change PVs too (configured, or a change of theirs seen).
        self.others = broker.config.front_ends > 1
        #: Of other front-ends' puts, the shards send only those to the PVs this broker
        #: follows (``followed``: those its CA clients hold; see shard/follow.py).
        self.follows = self.others
        self.followed: set[str] = set()
        #: The shards also hold the answer to another front-end's put to a PV followed
        #: here until this broker has the change (WATCH; see shard/gate.py): a read here
        #: right after that put completed gives the new value, though the change is still
        #: on its way between the processes (``catch_up`` takes only what has come).
        self.watches = self.follows and self.watch_follows
        #: What each kind of message a shard sends is handled by.
        self._by_kind = {
            Update: self._update,
            UpdateRun: self._update_run,
            Ack: self._ack,
            FieldChanged: self._field_changed,
            Reject: self._reject,
            Deleted: self._deleted,
            Pong: self._pong,
            Confirm: self._confirm,
            SnapshotBegin: self._snapshot_begin,
            Snapshot: self._snapshot,
            SnapshotEnd: self._resync,
            Applied: self._applied,
            Wanted: lambda link, msg: link.wanted.take(msg.name, msg.on),
        }

    # -- what the shards send ----------------------------------------------------------

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
        if not self._change(link, msg.name, msg.req, msg.data, msg.stamp, msg.reset):
            return
        if msg.created:
            self.broker.health.creations += 1
            log.debug("created PV %s (shard %d)", msg.name, link.index)
        self.requests.finish(link.index, msg.req, True)

    def _update_run(self, link: ShardLink, run: UpdateRun) -> None:
        """Other front-ends' puts, published as one run (see common/runs.py)."""
        change, value = self._change, run.value
        for k, (name, stamp) in enumerate(zip(run.names, run.stamps, strict=True)):
            change(link, name, 0, value(k), stamp, False)

    def _change(self, link: ShardLink, name: str, req: int, data, stamp, reset) -> bool:
        """Apply what an UPDATE brings to the mirror of ``name``; False if it is not served
        here (its request failed)."""
        pv = self.table.pvs.get(name)
        if pv is None:
            try:
                pv = self.table.new_pv(name)
            except InvalidPvName as e:
                log.warning("shard %d updated %s, which is not served: %s", link.index, name, e)
                self.requests.finish(link.index, req, False)
                return False
        self.table.set_real(pv, True)
        # Another broker's change, while this broker's own later WRITE was not yet applied
        # when the shard sent it: that WRITE comes after it at the shard too (see _applied).
        theirs = not (req or reset)
        mine = link.own_writes.get(name, 0) if theirs else 0
        if pv.ring is None and mine > link.writes_applied:
            return True
        if reset and not req and name in link.stale_restate:
            link.stale_restate.discard(name)
            if pv.ring is None:
                return True  # the later WRITE, shown already, replaces it at the shard too
            # A buffer: the refused elements go, and ours after them come again with the
            # buffer read once more (the answer waits for the WRITEs queued before it).
            pv.apply(data, stamp, append=True, reset=True)
            self._follow(link, name)
            return True
        if not req:
            self.others = True
        pv.apply(data, stamp, append=pv.ring is not None, reset=reset)
        if theirs and pv.ring is not None:
            # Another front-end appends to this buffer too: from now on this one's appends
            # take the shard's order.  One of its own, written through, that the shard
            # had not applied yet comes after this one there, not before as here: the
            # buffer is read again (the answer waits for the appends queued before it).
            pv.mirror.shared = True
            if mine > link.writes_applied:
                self._follow(link, name)
        return True

    def _applied(self, link: ShardLink, msg: Applied) -> None:
        """The shard has applied the first ``msg.writes`` WRITEs of this connection."""
        link.writes_applied = msg.writes
        if msg.writes >= link.writes:
            link.own_writes.clear()
        elif len(link.own_writes) > link.own_writes_bound:
            link.forget_applied_writes()

    def _ack(self, link: ShardLink, msg: Ack) -> None:
        link.write_places.pop(msg.req, None)
        self.requests.finish(link.index, msg.req, True)

    def _field_changed(self, link: ShardLink, msg: FieldChanged) -> None:
        pv = self.table.pvs.get(msg.name)
        if pv is not None and msg.field in fields.STORED:
            pv.field_changed(msg.field, msg.value)
        self.requests.finish(link.index, msg.req, True)

    def _reject(self, link: ShardLink, msg: Reject) -> None:
        if not self._retried(link, msg, link.usable):
            self._shard_refused(link, msg)
            self.requests.finish(link.index, msg.req, False)
        if msg.reason in NOT_SERVED and link.usable:
            # What else waits for an answer through this connection is refused too, while
            # the REJECTs keep it from looking silent: the loop reconnects.  (Its plain
            # WRITEs are applied late, unless it was fenced for a newer connection.)
            link.not_served = msg.reason

    def _orphan_refused(self, link: ShardLink, sock, msg: Reject) -> None:
        # The loop took the connection down at the first REJECT that said it is no longer
        # served (a heartbeat's, say), and the others come on its parked socket: each goes
        # again as if it had come first, while no new connection has been opened (one may
        # carry later puts: then it fails, as one refused through an earlier connection).
        if not self._retried(link, msg, sock is link.last_parked):
            super()._orphan_refused(link, sock, msg)

    def _retried(self, link: ShardLink, msg: Reject, latest: bool) -> bool:
        """Whether refused request ``msg.req`` goes again, through the link's next
        connection: refused unapplied through its ``latest`` connection by a shard that
        took this process for hung (a stall longer than PEER_SILENCE), or that it missed a
        change, a put (a field change, a deletion) goes again, unless a later WRITE of ours
        to the PV, which the shard applies late, would then come before it.  Not one
        refused through an earlier connection (FENCED): the new one may have carried later
        puts already."""
        # A refused WRITE is followed by the PV as the shard holds it then; a later WRITE
        # of ours to it, which the mirror shows, comes after that at the shard.
        place = link.write_places.pop(msg.req, 0) if msg.req else 0
        later = 0 < place < link.own_writes.get(msg.name, 0)
        if later:
            link.stale_restate.add(msg.name)
        return (
            msg.reason in _RETRIED
            and latest
            and not later
            and self.requests.repark(link.index, msg.req)
        )

    def _deleted(self, link: ShardLink, msg: Deleted) -> None:
        self.table.forget(msg.name)
        link.stale_restate.discard(msg.name)  # the restatement, if one was awaited
        if not msg.restate:
            self.broker.health.deletions += 1
        log.debug("deleted PV %s (shard %d)", msg.name, link.index)
        self.requests.finish(link.index, msg.req, True)

    def _pong(self, link: ShardLink, msg: Pong) -> None:
        self.requests.clocks[link.index].ponged(msg.req, msg.now, time.time())
        link.pvs = msg.pvs
        self.broker.health.shards[link.index].update(msg)
        self.store_state(link, msg.store_error)

    def _snapshot_begin(self, link: ShardLink, msg: SnapshotBegin) -> None:
        self._snapshots[link.index] = {}

    def _snapshot(self, link: ShardLink, msg: Snapshot) -> None:
        snap = self._snapshots.get(link.index)
        if snap is not None:
            snap[msg.name] = (msg.data.copy(), msg.stamp, msg.fields)
            if len(snap) % _FREEZE_EVERY == 0:
                # What a large snapshot gathers lives until it is applied, and what it
                # becomes as long as its PVs do: kept out of the collector's walks, as
                # at start-up (settle_gc).  Else they made its full collections long
                # (398 ms in one turn, 150,000 PVs resyncing, other shards' clients
                # waiting).
                gc.freeze()

    def _shard_refused(self, link: ShardLink, msg: Reject) -> None:
        """A REJECT: logged and for ``relay:ERRORS`` (within the budget of refused puts),
        with the client that waited for it if one did."""
        waiting = self.requests.waiter(link.index, msg.req)
        client = waiting.client if waiting is not None else None
        if msg.reason == EXPIRED:
            # Not applied in time (the shard was stopped, say): the timeout it is, said
            # once, here or at the deadline (Requests.expire) if that came first.
            why = "no answer from the shard in time"
            if waiting is not None and self.broker.error(
                "shard_down", why, msg.name, link.index, client
            ):
                log.warning("shard %d dropped %s: %s", link.index, msg.name, msg.reason)
            return
        why = f"shard refused: {msg.reason}"
        if self.broker.error("shard_refused", why, msg.name, link.index, client):
            what = msg.name or "this front-end"  # no name: its HELLO
            log.warning("shard %d refused %s: %s", link.index, what, msg.reason)

    # -- resync ------------------------------------------------------------------------

    def _resync(self, link: ShardLink, end: SnapshotEnd) -> None:
        snap = self._snapshots.pop(link.index, None)
        if snap is None:
            return
        restarted = link.ever_synced and end.epoch != link.epoch  # a new process
        # In sync from here on, its store as it says: the PVs posted below carry the
        # alarm of a shard in sync (till now, of one away).
        link.synced(end.epoch, len(snap))
        self.store_state(link, end.store_error)
        table = self.table
        for name in table.real_by_shard[link.index].keys() - snap.keys():
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
        if restarted:
            self.broker.health.shard_restarted(link.index)
            self.requests.fail_orphans(link.index)
        self.broker.status_due = True  # `carelay status` learns of the link at once, not in 1 s
        table.unserved.discard(link.index)
        if len(snap) >= _FREEZE_EVERY:
            gc.freeze()  # the mirror's new state (see _snapshot)
        log.debug("shard %d in sync at seq %d", link.index, end.seq)
        level = logging.DEBUG if self.broker.quiet_until is not None else logging.INFO
        log.log(level, "shard %d in sync: %d PVs", link.index, len(snap))

    def hello(self, link: ShardLink) -> None:
        """Ask shard ``link`` for a snapshot, with this broker's id and the relay's token;
        then the PVs of it that this broker follows, each answered as it stands then; and
        a heartbeat, whose answer says the shard's clock before any put goes."""
        self.requests.send(link)
        number = self.requests.number()
        hello = Hello(number, self.broker.token or "", self.broker.instance, self.follows)
        if not link.send(hello):
            return
        was_live = link.live
        link.hello_sent()
        if was_live:  # a shard that restarted under a live link: away till its snapshot
            self._post_alarms(link)
        for name in self.followed:
            if link_for(self.links, name) is link:
                self._follow(link, name)
                if self.watches:
                    link.queue(Watch(0, name, True))
        link.send_queued()
        self.ping(link)

    # -- what this broker's clients hold ------------------------------------------------

    def follow(self, name: str) -> bool:
        """A CA client holds PV ``name`` (or a field of it): its shard sends its puts from
        now on, and its value as it stands, which a read of it waits for.  A shard not in
        sync hears of it with the next HELLO.  Whether a FOLLOW went now (or failed)."""
        if not self.follows or name in self.followed:
            return False
        self.followed.add(name)
        link = link_for(self.links, name)
        if link.state not in (LinkState.SYNCING, LinkState.LIVE):
            return False
        req = self._follow(link, name)  # after the queued WRITEs: the answer shows them
        if self.watches:
            link.queue(Watch(0, name, True))
        self.requests.send(link)  # a FOLLOW that cannot go fails now
        return self.requests.waiter(link.index, req) is not None

    def unfollow(self, name: str) -> None:
        """No CA client holds ``name`` any longer."""
        if name not in self.followed:
            return
        self.followed.discard(name)
        link = link_for(self.links, name)
        if link.state in (LinkState.SYNCING, LinkState.LIVE):
            if self.watches:
                link.queue(Watch(0, name, False))
            link.send(Follow(0, name, False))

    def _confirm(self, link: ShardLink, msg: Confirm) -> None:
        # Every change before it is applied and posted: shown (see shard/gate.py).
        link.send(Shown(0, msg.token))

    def _follow(self, link: ShardLink, name: str, notify=None) -> int:
        """Queue a FOLLOW of ``name``; its request number."""
        pv = self.table.pvs.get(name)
        req, _ = self.requests.expect(link.index, pv, name, notify, None, quiet=True)
        link.queue(Follow(req, name, True))
        return req

    def ping(self, link: ShardLink) -> None:
        """A heartbeat, numbered like the puts so that its answer orders them."""
        self.requests.send(link)
        req = self.requests.number()
        self.requests.clocks[link.index].pinged(req, time.time())
        link.send(Ping(req))

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
        self._post_alarms(link)

    def link_down(self, link: ShardLink, gone: bool = False) -> None:
        """``gone``: the shard process closed the connection (see ShardLink.local), so
        what it has not answered it never applies: those requests fail now."""
        self.broker.status_due = True
        self.broker.store_errors[link.index] = ""  # unknown until it answers again: COMM alarm
        link.down_since = time.monotonic()
        self.requests.link_down(link.index, gone)
        self._snapshots.pop(link.index, None)
        self._post_alarms(link)

    def _post_alarms(self, link: ShardLink) -> None:
        """The alarm of each PV of shard ``link`` changed (it is away: COMM/INVALID; its
        store cannot be written: WRITE/MAJOR; or back): posted to the monitors."""
        for pv in list(self.table.real_by_shard[link.index].values()):
            pv.post(0)  # alarm change only


def catch_up(sync: ShardSync, link: ShardLink) -> None:
    """Before a read: what ``link``'s shard has sent already is taken first.  The shard
    sends other front-ends a change before it answers the put that made it
    (``Outbox.send``), so a read here right after that put completed finds the change."""
    sock = link.sock
    if sock is not None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        sync.drain(link)
