"""What a shard does with each request of its broker: applied to the store, answered.

The loop hands every admitted message here in order.  Each request changes the store
or not, and says what came of it through ``reply``: an UPDATE, FIELD or DELETED with
the change's sequence number, an ACK for a put with callback the broker had already
mirrored, a REJECT with the reason.  No sockets here, and no SQL: the loop sends the
replies after it has committed the batch (``commit``), and the autosave tells whether
the store can be written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from carelay.common.protocol import Message, Op, WriteRun
from carelay.shard.autosave import Autosave, StoreHealth
from carelay.shard.store import Change, Rejected, ShardStore

log = logging.getLogger(__name__)

#: Requests that a shard drops once they expired (HELLO and PING never expire).
EXPIRING = frozenset({Op.PUT, Op.WRITE, Op.SET_FIELD, Op.DELETE})
_EXPIRED = "expired: the broker has failed it already"


class RequestHandler:
    """Applies a broker's requests to one shard's store and answers them."""

    def __init__(
        self,
        store: ShardStore,
        autosave: Autosave,
        health: StoreHealth,
        reply: Callable[[bytes, Message], None],
        commit: Callable[[], None],
    ) -> None:
        self.store = store
        self.autosave = autosave
        self.health = health
        self._reply = reply
        #: Makes the creations and deletions so far durable (before a snapshot shows them).
        self._commit = commit
        #: For the broker's health figures (PONG): puts applied.
        self.puts_applied = 0
        #: What each operation a broker may send is handled by.
        self._by_op: dict[Op, Callable[[bytes, Message], None]] = {
            Op.WRITE: self._write,
            Op.PUT: self._put,
            Op.PING: self._ping,
            Op.DELETE: self._delete,
            Op.SET_FIELD: self._set_field,
            Op.HELLO: self._snapshot,
        }

    def dispatch(self, peer: bytes, msg: Message) -> None:
        """Handle one request (a WriteRun goes to ``write_run``)."""
        op = msg.op
        if msg.req and op in EXPIRING:
            expires = msg.info.get("expires")
            if type(expires) is float and time.time() > expires:
                self._expired(peer, msg)
                return
        handle = self._by_op.get(op)
        if handle is None:
            log.warning("unexpected operation %s dropped", op.name)
            return
        handle(peer, msg)

    def _ping(self, peer: bytes, msg: Message) -> None:
        self.pong(peer, msg.req)

    def pong(self, peer: bytes, req: int) -> None:
        """The shard's health, as the broker shows it (``req`` 0: unasked)."""
        autosave = self.autosave
        info = {
            "pvs": len(self.store),
            "store_error": self.health.refusing,
            "pid": os.getpid(),
            "puts": self.puts_applied,
            "saved_at": autosave.saved_at,
            "flush": autosave.flush_times.as_dict(),
        }
        if autosave.db is not None:
            info["store_bytes"] = autosave.db.size()
        self._reply(peer, Message(Op.PONG, req=req, seq=self.store.seq, info=info))

    def _reject(self, peer: bytes, msg: Message, reason: str) -> None:
        self._reply(peer, Message(Op.REJECT, msg.name, req=msg.req, reason=reason))

    # -- puts ---------------------------------------------------------------------------

    def _put(self, peer: bytes, msg: Message) -> None:
        if msg.data is None:
            self._reject(peer, msg, "put without data")
            return
        refusing = self.health.refusing
        if refusing and msg.info.get("callback"):
            log.warning("refused put to %s: %s", msg.name, refusing)
            self._reject(peer, msg, refusing)
            return
        try:
            change = self.store.put(msg.name, msg.data, msg.stamp)
        except Rejected as e:
            log.warning("refused put to %s: %s", msg.name, e)
            self._reject(peer, msg, str(e))
            return
        self.puts_applied += 1
        if change.created:
            log.info("created PV %s", msg.name)
        self._reply_change(peer, msg.req, change, {"created": 1} if change.created else {})

    def _write(self, peer: bytes, msg: Message) -> None:
        """A put the broker has already applied to its mirror (see ``_written``)."""
        try:
            if msg.data is None:
                raise Rejected("put without data")
            refusing = self.health.refusing
            if refusing and msg.req:
                raise Rejected(refusing)
            outcome = self.store.put(msg.name, msg.data, msg.stamp, create=False).seq
            self.puts_applied += 1
        except Rejected as e:
            outcome = e
        self._written(peer, msg.name, msg.req, outcome)

    def _expired(self, peer: bytes, msg: Message) -> None:
        """Drop a request that the broker has failed already (see ``_EXPIRED``)."""
        if msg.op is Op.WRITE:
            self._written(peer, msg.name, msg.req, Rejected(_EXPIRED))
            return
        log.warning("dropped %s of %s: %s", msg.op.name, msg.name, _EXPIRED)
        self._reject(peer, msg, _EXPIRED)

    def write_run(self, peer: bytes, run: WriteRun) -> None:
        """A run of one-element WRITEs: each as ``_write`` takes it, column by column.  Past
        the run's expiry, the WRITEs that wait for an answer are dropped, the others (which
        no client waits for) applied."""
        write = self.store.write_one
        values, stamps, reqs = run.values, run.stamps, run.reqs
        refusing = self.health.refusing
        if run.expires and time.time() > run.expires:
            for k, name in enumerate(run.names):
                if reqs[k]:
                    self._written(peer, name, reqs[k], Rejected(_EXPIRED))
                    continue
                try:
                    write(name, values[k : k + 1], stamps[k])
                except Rejected as e:
                    self._written(peer, name, 0, e)
            return
        for k, name in enumerate(run.names):
            if refusing and reqs[k]:
                self._written(peer, name, reqs[k], Rejected(refusing))
                continue
            try:
                outcome = write(name, values[k : k + 1], stamps[k])
            except Rejected as e:
                outcome = e
            else:
                self.puts_applied += 1
                if not reqs[k]:
                    continue  # the commonest WRITE of all: applied, and nothing to say
            self._written(peer, name, reqs[k], outcome)

    def _written(self, peer: bytes, name: str, req: int, outcome: int | Rejected) -> None:
        """Answer a WRITE that came to ``outcome`` (its seq, or why it was refused).  A
        WRITE is silent unless it asked for an answer (``req``, a put with callback: an ACK)
        or was refused: a REJECT, then the PV as it stands here for the broker's mirror."""
        if isinstance(outcome, Rejected):
            log.warning("refused put to %s: %s", name, outcome)
            self._reply(peer, Message(Op.REJECT, name, req=req, reason=str(outcome)))
            self._correct(peer, name)
        elif req:
            self._reply(peer, Message(Op.ACK, name, req=req, seq=outcome))

    def _correct(self, peer: bytes, name: str) -> None:
        """Tell the broker how ``name`` stands here, after a refused WRITE that its mirror
        already shows: not a change, so info "restate" and the current sequence number."""
        store = self.store
        if name not in store:
            self._reply(peer, Message(Op.DELETED, name, seq=store.seq, info={"restate": 1}))
            return
        contents = store.get(name)
        change = Change(name, store.seq, store.stamp(name), contents, len(contents), False)
        self._reply_change(peer, 0, change, {"reset": 1, "restate": 1})

    def _reply_change(self, peer: bytes, req: int, change, info: dict) -> None:
        """An UPDATE carrying what ``change`` did, as the broker mirrors it."""
        self._reply(
            peer,
            Message(
                Op.UPDATE,
                change.name,
                req=req,
                seq=change.seq,
                stamp=change.stamp,
                length=change.length,
                info=info,
                data=change.data,
            ),
        )

    # -- fields, deletions, snapshots -----------------------------------------------------

    def _set_field(self, peer: bytes, msg: Message) -> None:
        field, value = msg.info.get("field"), msg.info.get("value")
        try:
            if field == "RES":
                change = self.store.reset(msg.name)
            else:
                seq, value = self.store.set_field(msg.name, str(field), value)
        except Rejected as e:
            log.warning("refused %s.%s: %s", msg.name, field, e)
            self._reject(peer, msg, str(e))
            return
        if field == "RES":
            log.info("emptied buffer %s", msg.name)
            self._reply_change(peer, msg.req, change, {"reset": 1})
            return
        log.info("set %s.%s = %r", msg.name, field, value)
        self._reply(
            peer,
            Message(
                Op.FIELD, msg.name, req=msg.req, seq=seq, info={"field": field, "value": value}
            ),
        )

    def _delete(self, peer: bytes, msg: Message) -> None:
        try:
            seq = self.store.delete(msg.name)
        except Rejected as e:
            self._reject(peer, msg, str(e))
            return
        log.info("deleted PV %s", msg.name)
        self._reply(peer, Message(Op.DELETED, msg.name, req=msg.req, seq=seq))

    def _snapshot(self, peer: bytes, hello: Message) -> None:
        """Every PV, between a SNAPSHOT_BEGIN and a SNAPSHOT_END, in answer to a HELLO."""
        req = hello.req
        # A snapshot must not show a creation that is not yet durable.
        self._commit()
        store = self.store
        self._reply(peer, Message(Op.SNAPSHOT_BEGIN, req=req, seq=store.seq))
        n = 0
        for name, stamp, contents, fields in store.snapshot():
            self._reply(
                peer,
                Message(
                    Op.SNAPSHOT,
                    name,
                    stamp=stamp,
                    length=len(contents),
                    info={"fields": fields},
                    data=contents,
                ),
            )
            n += 1
        info = {"pvs": n, "store_error": self.health.refusing}
        self._reply(peer, Message(Op.SNAPSHOT_END, req=req, seq=store.seq, info=info))
        log.debug("sent a snapshot of %d PVs at seq %d", n, store.seq)
