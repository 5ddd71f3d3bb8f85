"""Forwarder: what CA clients put, sent on to the shards.

A value put to a PV in sync with its live shard is written through: mirrored and posted
at once, and sent on as a WRITE (answered only for a put with callback).  Any other put,
a field change and a deletion are requests: numbered, queued for the PV's shard, and
held in flight on the PV until the shard answers (see Requests).
"""

from __future__ import annotations

import logging
import time

from carelay.broker.link import ShardLink
from carelay.common import fields
from carelay.common.logbudget import shorten
from carelay.common.messages import Delete, Put, SetField

log = logging.getLogger(__name__)


class _Again:
    """A request that a shard refused unapplied (Requests.repark) and that holds no
    asynchronous write of its PV: a field change or deletion, or a put without callback
    (its client, told nothing by CA, counts on it).  In the place of a parked put's PV:
    sent again when its shard is back (``resume``), or failed."""

    __slots__ = ("name", "send", "waiting_put")

    def __init__(self, name: str, send) -> None:
        self.name = name
        self.send = send
        self.waiting_put = False

    def resume(self, payload, notify, go: bool) -> None:
        if not (go and self.send()) and notify is not None:
            notify.complete(False)


class Forwarder:
    """Sends puts, field changes and deletions to the shards."""

    def __init__(self, broker) -> None:
        self.broker = broker
        # Read for every put: held here rather than looked up through the broker.
        self.links = broker.links
        self.store_errors = broker.store_errors
        self.table = broker.table
        self.requests = broker.requests
        self.health = broker.health

    def put(self, pv, data, notify) -> bool:
        """Send a put of ``data`` to ``pv``'s shard; False if it cannot go now."""
        link = self.links[pv.shard]
        if not link.usable:
            if self.broker.error("shard_down", "put failed: shard unreachable", pv.name, pv.shard):
                log.warning("put to %s failed: shard %d unreachable", shorten(pv.name), pv.shard)
            return False
        stamp = time.time()
        # While the shard's store cannot be written, a put with callback takes the round
        # trip: the shard refuses it (or applies it, if its store has just healed), and
        # the mirror never shows a refused value.
        faulted = notify is not None and self.store_errors[pv.shard]
        if link.live and pv.real and not self.requests.in_flight(pv) and not faulted:
            settled = pv.settled_put(data)
            if settled is not None:
                return self.write_through(link, pv, settled, stamp, notify)
        if not (pv.real or pv.creating):
            why = self.table.over_limits(pv.spec, creation=True)
            if why is not None:
                self.table.refuse(pv.name, why, "limit")
                return False
        # ``callback``: refused by a shard whose store cannot be written.
        put = dict(stamp=stamp, data=data, callback=notify is not None)
        # A put with callback goes again as the PV's own parked put, which completes its
        # asynchronous write; one without, in the PV's place (it holds none).
        retry = (pv, data) if notify is not None else (_Again(pv.name, self._again(pv, data)), None)
        if not self._request(pv.shard, pv, notify, Put, pv.name, put, counted=True, retry=retry):
            why = "put failed: shard not accepting"
            if self.broker.error("shard_down", why, pv.name, pv.shard):
                log.warning("put to %s failed: shard %d not accepting", shorten(pv.name), pv.shard)
            return False
        if not pv.real:
            self.table.reserve(pv, True)
        return True

    def write_through(self, link: ShardLink, pv, data, stamp: float, notify) -> bool:
        """A put to a PV in sync with its live shard: applied to the mirror and posted now,
        and sent on as a WRITE that the shard answers only for a put with callback (or to
        refuse it, with the PV as it holds it).  No round trip before the monitors.
        Counted in the puts now, or, with a callback, once the shard has applied it."""
        if notify is None:
            self.health.puts += 1
            link.queue_write(pv.name, 0, stamp, data)
        else:
            client = self.broker.client()
            req, expires = self.requests.expect(
                link.index, None, pv.name, notify, client, put=True, retry=(pv, data)
            )
            link.queue_write(pv.name, req, stamp, data, expires)
        pv.apply(data, stamp, append=pv.ring is not None, owned=True)
        return True

    def field(self, name: str, field: str, raw, notify) -> bool:
        """Send a field change of PV ``name`` to its shard; False if it cannot be made."""
        pv = self.table.pvs.get(name)
        if pv is None or not pv.real:
            why = f"field put to .{field}: the PV has had no put yet"
            if self.broker.error("provisional", why, name):
                logged = shorten(name)
                log.warning("put to %s.%s failed: %s does not exist yet", logged, field, logged)
            return False
        if field == "RES":
            if not raw:
                if notify is not None:
                    notify.complete(True)
                return True
            value = 1
        elif field == "PROC":
            value = 1  # any value processes, as on a record
        else:
            try:
                value = fields.validate(field, raw)
            except fields.FieldError as e:
                if self.broker.error("field", f"refused put to .{field}: {e}", name, pv.shard):
                    log.warning("refused put to %s.%s: %s", shorten(name), field, e)
                return False
        # In flight on the PV until answered: value puts meanwhile take the round trip, so
        # that the shard, not the mirror, applies the new field (DRVH, DRVL) to them.
        change = dict(field=field, value=value)
        again = (_Again(name, lambda: self.field(name, field, raw, notify)), None)
        if not self._request(pv.shard, pv, notify, SetField, name, change, retry=again):
            why = f"put to .{field} failed: shard unreachable"
            if self.broker.error("shard_down", why, name, pv.shard):
                log.warning(
                    "put to %s.%s failed: shard %d unreachable", shorten(name), field, pv.shard
                )
            return False
        return True

    def delete(self, name: str, notify) -> bool:
        pv = self.table.pvs.get(name)
        if pv is None or not pv.real:
            if self.broker.error("no_such_pv", "delpv failed: no such PV", name):
                log.warning("delpv %s failed: no such PV", shorten(name))
            return False
        # In flight on the PV: puts wait for the answer (round trip), not the mirror,
        # until the deletion is settled.
        again = (_Again(name, lambda: self.delete(name, notify)), None)
        if not self._request(pv.shard, pv, notify, Delete, name, {}, retry=again):
            if self.broker.error("shard_down", "delpv failed: shard unreachable", name, pv.shard):
                log.warning("delpv %s failed: shard %d unreachable", shorten(name), pv.shard)
            return False
        pv.deleting = True
        return True

    def _again(self, pv, data):
        """How a put without callback of ``data`` to ``pv`` is sent again: to the PV that
        the table holds by that name then (a provisional one may have been made anew)."""
        return lambda: self.put(self.table.pvs.get(pv.name, pv), data, None)

    def _request(
        self,
        shard: int,
        pv,
        notify,
        kind: type,
        name: str,
        fields: dict,
        counted: bool = False,
        retry=None,
    ) -> bool:
        """Number a request of ``kind`` (Put, Delete or SetField) to PV ``name`` with
        ``fields``, queue it for ``shard`` and wait for its answer; False when the shard
        cannot take it now.  ``counted``: a put, counted in the puts once applied;
        ``retry``: what it sends again if refused unapplied (Requests.repark)."""
        link = self.links[shard]
        if not link.usable or link.sock is None:
            return False
        client = self.broker.client() if notify is not None else None
        req, expires = self.requests.expect(
            shard, pv, name, notify, client, put=counted, retry=retry
        )
        msg = kind(name=name, req=req, expires=expires, **fields)
        # Queued, and sent with the others of this process() slice in batches (the loop).
        # Never sent here: a failure must not complete a put inside its own write().
        link.queue(msg)
        return True
