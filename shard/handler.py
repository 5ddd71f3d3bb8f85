"""What a shard does with each request of its broker: applied to the store, answered.

The loop hands every admitted message here in order.  Each request changes the store
or not, and says what came of it through ``reply``: an UPDATE, FIELD or DELETED with
the change's sequence number, an ACK for a put with callback the broker had already
mirrored, a REJECT with the reason.  Every applied change also goes to ``publish``, with
no request number, for the other front-ends the shard serves (``fanout``: set by the loop
while there are others).  No sockets here, and no SQL: the loop sends the
replies after it has committed the batch (``commit``), and the autosave tells whether
the store can be written.

The lines a client's traffic drives (a refused, expired or dropped request, a field put)
each go through a ``LogBudget``: so many per window, then the rest counted and summed up
in one line once the window is over (common/logbudget.py).  Creations
and deletions, the audit trail of the store, are each logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from carelay.common import messages as wire
from carelay.common.config import REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW
from carelay.common.fields import ACTIONS, PROCESSING
from carelay.common.lifecycle import log_each
from carelay.common.logbudget import LogBudget, shorten
from carelay.common.messages import EXPIRED
from carelay.common.protocol import WriteRun
from carelay.shard.autosave import Autosave, StoreHealth
from carelay.shard.store import Change, Rejected, ShardStore

log = logging.getLogger(__name__)

#: Requests that a shard drops once they expired (HELLO and PING never expire).
EXPIRING = frozenset({wire.Put, wire.Write, wire.SetField, wire.Delete})
#: The RequestHandler method that handles each kind of request a broker may send.
_HANDLERS = {
    wire.Write: "_write",
    wire.Put: "_put",
    wire.Ping: "_ping",
    wire.Delete: "_delete",
    wire.SetField: "_set_field",
    wire.Hello: "_snapshot",
}
#: The summary of each budget's lines not logged one by one (see ``LogBudget``).
_NOT_LOGGED = "in the last {window:.0f} s, not logged one by one, e.g. {example}"


class RequestHandler:
    """Applies a broker's requests to one shard's store and answers them."""

    def __init__(
        self,
        store: ShardStore,
        autosave: Autosave,
        health: StoreHealth,
        reply: Callable[[bytes, wire.Message], None],
        commit: Callable[[], None],
        epoch: int = 0,
        publish: Callable[[bytes, wire.Message], None] | None = None,
        others: dict[type, Callable[[bytes, Any], None]] | None = None,
    ) -> None:
        self.store = store
        self.autosave = autosave
        self.health = health
        self._reply = reply
        #: Makes the creations and deletions so far durable (before a snapshot shows them).
        self._commit = commit
        #: The shard's start id, which every reply carries.
        self.epoch = epoch
        #: For the broker's health figures (PONG): puts applied.
        self.puts_applied = 0
        #: Hands each applied change, with req 0, to the front-ends other than its sender.
        self._publish = publish
        #: Whether another front-end than the sender may be served (set by the loop): while
        #: False, no change is built for publishing; nor for a put nobody else hears of.
        self.fanout = False
        self.heard: Callable[[bytes, str], bool] = lambda peer, name: True  # Follows.heard
        #: The PVs created since the last commit, in order: logged once it made them
        #: durable (``log_created``).
        self.created: list[str] = []
        #: (sender, PV, field) of each put since the last commit to a field whose put
        #: processes the PV (fields.PROCESSING): done once the change is durable
        #: (``process_after_fields``).
        self._processing: list[tuple[bytes, str, str]] = []
        #: What each kind of request a broker may send is handled by.
        self._by_kind: dict[type, Callable[[bytes, Any], None]] = {
            kind: getattr(self, method) for kind, method in _HANDLERS.items()
        }
        # Messages that change no PV (the read gate's), handled by whom the loop says.
        self._by_kind.update(others or {})
        window = REFUSAL_LOG_WINDOW
        #: Requests refused for what they ask (no such PV, a wrong type, a bad field value).
        self.refused_log = LogBudget(
            REFUSAL_LOG_LINES, window, "refused {count} more requests " + _NOT_LOGGED, log
        )
        #: Requests refused or dropped for the shard's state (its store cannot be written,
        #: they expired in a stall): a budget apart, which a client's bad puts cannot spend.
        self.failed_log = LogBudget(
            REFUSAL_LOG_LINES,
            window,
            "refused or dropped {count} more requests (store not writable, or expired) "
            + _NOT_LOGGED,
            log,
        )
        #: Field puts applied (INFO).
        self.fields_log = LogBudget(
            REFUSAL_LOG_LINES,
            window,
            "{count} more field puts " + _NOT_LOGGED,
            log,
            level=logging.INFO,
        )
        self.log_budgets = (self.refused_log, self.failed_log, self.fields_log)

    def dispatch(self, peer: bytes, msg: wire.Message) -> None:
        """Handle one request (a WriteRun goes to ``write_run``)."""
        kind = type(msg)
        if kind in EXPIRING and msg.req and msg.expires and time.time() > msg.expires:
            self._expired(peer, msg)
            return
        handle = self._by_kind.get(kind)
        if handle is None:
            log.warning("unexpected %s dropped", kind.__name__)
            return
        handle(peer, msg)

    def log_created(self, undone: frozenset[str] = frozenset()) -> None:
        """One line for each PV created since the last commit, now durable; ``undone``:
        those the commit could not keep (its error says so)."""
        names, self.created = self.created, []
        if undone:
            names = [name for name in names if name not in undone]
        log_each(log, logging.INFO, "created PV %s", names)

    def process_after_fields(self, undone: frozenset[str] = frozenset()) -> None:
        """After a commit: each PV a put to a drive limit, an alarm limit or a severity
        changed (and the commit made durable: not in ``undone``) is processed, as an ao or
        longout record is when they are put: its value put again, through the drive limits,
        stamped now (an array's only when past new drive limits), and sent to its sender and
        the other front-ends as a put is.  A put to them that failed changes no value."""
        processing, self._processing = self._processing, []
        for peer, name, field in processing:
            if name in undone:
                continue
            c = self.store.process_after_field(name, field)
            if c is None:
                continue
            # To its sender as the PV stands here (reset): not a change of another
            # front-end's, which its mirror leaves to a WRITE of its own still on its way
            # (ShardSync._change); that WRITE came before and is within this.  It follows
            # the answer, in sequence order, in the same batch: a front-end tells its
            # client once it has handled all that came with an answer, and judges the
            # alarm the new field brings on it, at its stamp (PvMirror.field_changed).
            self._reply_change(peer, 0, c, reset=True)
            if self.fanout:
                self._publish_change(peer, c)

    def tick(self) -> None:
        """The summary of each log budget whose window is over (the loop's every turn,
        whether or not a message came)."""
        for budget in self.log_budgets:
            budget.tick()

    def _refusal_log(self, reason: str) -> LogBudget:
        """The budget of a refusal for ``reason``: the shard's state (its store, a stall)
        or what the request asks."""
        failed = reason == self.health.refusing or reason == EXPIRED
        return self.failed_log if failed else self.refused_log

    def _refused_put(self, name: str, reason: str) -> None:
        """Log a put refused for ``reason``, within its budget."""
        example = f"{shorten(name)}: {reason}"
        if self._refusal_log(reason).allow("put to " + example, key=(name, reason)):
            log.warning("refused put to %s", example)

    def _ping(self, peer: bytes, msg: wire.Ping) -> None:
        self.pong(peer, msg.req)

    def pong(self, peer: bytes, req: int) -> None:
        """The shard's health, as the broker shows it (``req`` 0: unasked)."""
        self._reply(peer, health_pong(self, req))

    def _reject(self, peer: bytes, msg: Any, reason: str) -> None:
        self._reply(peer, wire.Reject(msg.req, msg.name, reason, self.epoch))

    # -- puts ---------------------------------------------------------------------------

    def _put(self, peer: bytes, msg: wire.Put) -> None:
        refusing = self.health.refusing
        if refusing and msg.callback:
            self._refused_put(msg.name, refusing)
            self._reject(peer, msg, refusing)
            return
        try:
            change = self.store.put(msg.name, msg.data, msg.stamp)
        except Rejected as e:
            self._refused_put(msg.name, str(e))
            self._reject(peer, msg, str(e))
            return
        self.puts_applied += 1
        if change.created:
            self.created.append(msg.name)
        self._reply_change(peer, msg.req, change, created=change.created)
        if self.fanout:
            self._publish_change(peer, change, created=change.created)

    def _write(self, peer: bytes, msg: wire.Write, publish: bool = False) -> None:
        """A put the broker has already applied to its mirror (see ``_written``); published
        while there are other front-ends, or whatever their number with ``publish``."""
        try:
            refusing = self.health.refusing
            if refusing and msg.req:
                raise Rejected(refusing)
            change = self.store.put(msg.name, msg.data, msg.stamp, create=False)
            outcome = change.seq
            self.puts_applied += 1
        except Rejected as e:
            outcome = e
        else:
            if self.fanout or publish:
                self._publish_change(peer, change)
        self._written(peer, msg.name, msg.req, outcome)

    def _expired(self, peer: bytes, msg: Any) -> None:
        """Drop a request that came past its expiry (see ``common.messages.EXPIRED``)."""
        if type(msg) is wire.Write:
            self._written(peer, msg.name, msg.req, Rejected(EXPIRED))
            return
        example = f"{type(msg).__name__} of {shorten(msg.name)}: {EXPIRED}"
        if self.failed_log.allow("dropped " + example, key=(msg.name, EXPIRED)):
            log.warning("dropped %s", example)
        self._reject(peer, msg, EXPIRED)

    def write_run(self, peer: bytes, run: WriteRun, publish: bool = False) -> None:
        """A run of one-element WRITEs: each as ``_write`` takes it, column by column.  Past
        the run's expiry, the WRITEs that wait for an answer are dropped, the others (which
        no client waits for) applied."""
        write = self.store.write_one
        values, stamps, reqs = run.values, run.stamps, run.reqs
        refusing = self.health.refusing
        fanout = self.fanout or publish
        if run.expires and time.time() > run.expires:
            for k, name in enumerate(run.names):
                if reqs[k]:
                    self._written(peer, name, reqs[k], Rejected(EXPIRED))
                    continue
                try:
                    seq = write(name, values[k : k + 1], stamps[k])
                except Rejected as e:
                    self._written(peer, name, 0, e)
                else:
                    if fanout:
                        self._publish_written(peer, name, seq, values[k : k + 1])
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
                if fanout:
                    self._publish_written(peer, name, outcome, values[k : k + 1])
                if not reqs[k]:
                    continue  # the commonest WRITE of all: applied, and nothing to say
            self._written(peer, name, reqs[k], outcome)

    def write_late(self, peer: bytes, writes: list) -> None:
        """Apply the plain WRITEs of a connection no longer served (see
        Admission.take_late): its clients' puts, published to every front-end served,
        whatever their number."""
        for msg in writes:
            if type(msg) is WriteRun:
                self.write_run(peer, msg, publish=True)
            else:
                self._write(peer, msg, publish=True)

    def _written(self, peer: bytes, name: str, req: int, outcome: int | Rejected) -> None:
        """Answer a WRITE that came to ``outcome`` (its seq, or why it was refused).  A
        WRITE is silent unless it asked for an answer (``req``, a put with callback: an ACK)
        or was refused: a REJECT, then the PV as it stands here for the broker's mirror."""
        if isinstance(outcome, Rejected):
            self._refused_put(name, str(outcome))
            self._reply(peer, wire.Reject(req, name, str(outcome), self.epoch))
            self.restate(peer, name)
        elif req:
            self._reply(peer, wire.Ack(name, req, outcome, self.epoch))

    def restate(self, peer: bytes, name: str, req: int = 0) -> None:
        """Tell the broker how ``name`` stands here, after a refused WRITE that its mirror
        already shows, or in answer to a FOLLOW (``req``): not a change, so the current
        sequence number (and ``restate`` on a Deleted, which the broker does not count
        as a deletion)."""
        store = self.store
        if name not in store:
            self._reply(peer, wire.Deleted(name, req, store.seq, restate=True, epoch=self.epoch))
            return
        contents = store.get(name)
        change = Change(name, store.seq, store.stamp(name), contents, len(contents), False)
        self._reply_change(peer, req, change, reset=True)

    def _reply_change(
        self, peer: bytes, req: int, change, reset: bool = False, created: bool = False
    ) -> None:
        """An Update carrying what ``change`` did, as the broker mirrors it."""
        update = wire.Update(
            change.name, req, change.seq, change.stamp, change.data, reset, created, self.epoch
        )
        self._reply(peer, update)

    def _publish_change(self, peer: bytes, change, created=False, reset=False) -> None:
        """``change`` for the other front-ends: an Update with no request number."""
        c = change
        update = wire.Update(c.name, 0, c.seq, c.stamp, c.data, reset, created, self.epoch)
        self._publish(peer, update)

    def _publish_written(self, peer: bytes, name: str, seq: int, element) -> None:
        """A WRITE of a run, applied at ``seq``, for the other front-ends: the element
        appended to a buffer, else the value as stored (after drive-limit clipping)."""
        if not self.heard(peer, name):
            return
        store = self.store
        data = element if store.is_buffer(name) else store.get(name)
        update = wire.Update(name, 0, seq, store.stamp(name), data, False, False, self.epoch)
        self._publish(peer, update)

    # -- fields, deletions, snapshots -----------------------------------------------------

    def _set_field(self, peer: bytes, msg: wire.SetField) -> None:
        field, value = msg.field, msg.value
        try:
            if field == "RES":
                change = self.store.reset(msg.name)
            elif field == "PROC":
                change = self.store.process(msg.name)
            else:
                seq, value = self.store.set_field(msg.name, field, value)
        except Rejected as e:
            reason = str(e)
            example = f"{shorten(msg.name)}.{field}: {reason}"
            if self._refusal_log(reason).allow(example, key=(msg.name, field, reason)):
                log.warning("refused %s", example)
            self._reject(peer, msg, reason)
            return
        if field in ACTIONS:
            # The PV as the action left it, to every front-end: emptied (RES, said in the
            # log), or processed (PROC, as a put is, without a log line).
            reset = field == "RES"
            if reset and self.fields_log.allow(f"{shorten(msg.name)}.RES", key=(msg.name, field)):
                log.info("emptied buffer %s", msg.name)
            self._reply_change(peer, msg.req, change, reset=reset)
            if self.fanout:
                self._publish_change(peer, change, reset=reset)
            return
        example = f"{shorten(msg.name)}.{field} = {value!r}"
        if self.fields_log.allow(example, key=(msg.name, field)):
            log.info("set %s", example)
        self._reply(peer, wire.FieldChanged(msg.name, msg.req, seq, field, value, self.epoch))
        if field in PROCESSING:
            self._processing.append((peer, msg.name, field))
        if self.fanout:
            self._publish(peer, wire.FieldChanged(msg.name, 0, seq, field, value, self.epoch))

    def _delete(self, peer: bytes, msg: wire.Delete) -> None:
        try:
            seq = self.store.delete(msg.name)
        except Rejected as e:
            self._reject(peer, msg, str(e))
            return
        log.info("deleted PV %s", msg.name)
        self._reply(peer, wire.Deleted(msg.name, msg.req, seq, epoch=self.epoch))
        if self.fanout:
            self._publish(peer, wire.Deleted(msg.name, 0, seq, epoch=self.epoch))

    def _snapshot(self, peer: bytes, hello: wire.Hello) -> None:
        """Every PV, between a SNAPSHOT_BEGIN and a SNAPSHOT_END, in answer to a HELLO."""
        req = hello.req
        # A snapshot must not show a creation that is not yet durable.
        self._commit()
        store = self.store
        epoch = self.epoch
        self._reply(peer, wire.SnapshotBegin(req, store.seq, epoch))
        n = 0
        for name, stamp, contents, fields in store.snapshot():
            self._reply(peer, wire.Snapshot(name, stamp, contents, fields, epoch))
            n += 1
        self._reply(peer, wire.SnapshotEnd(req, store.seq, self.health.refusing, epoch))
        log.debug("sent a snapshot of %d PVs at seq %d", n, store.seq)


def health_pong(handler: RequestHandler, req: int) -> wire.Pong:
    """A PONG with the shard's health figures."""
    autosave = handler.autosave
    return wire.Pong(
        req,
        handler.store.seq,
        pvs=len(handler.store),
        store_error=handler.health.refusing,
        pid=os.getpid(),
        puts=handler.puts_applied,
        saved_at=float(autosave.saved_at),
        flush=autosave.flush_times.as_dict(),
        store_bytes=autosave.db.size() if autosave.db is not None else None,
        epoch=handler.epoch,
        now=time.time(),
    )
