"""The broker process: a pcaspy CA server whose PVs mirror the shards.

One thread does everything: it alternates short ``cas.process`` slices with
polls of the shard sockets, so every pcaspy call stays on the thread that
runs process() (pcaspy is not thread safe).  Plain puts are forwarded
without waiting; a put with callback completes when its shard answers.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import zmq

from carelay.broker.cabuffers import watch_free_list
from carelay.broker.circuits import (
    CircuitMonitor,
    Limits,
    client_limit,
    fit_fd_limit,
    open_fds,
)
from carelay.broker.cstreams import own_stderr
from carelay.broker.health import Health
from carelay.broker.link import LinkState, ShardLink
from carelay.broker.listening import listening_tcp_ports
from carelay.broker.refusals import RefusalLog, client_address, shorten
from carelay.common import exits, fields
from carelay.common.config import (
    EXPIRY_MARGIN,
    HEALTH_INTERVAL,
    PUT_RECONNECT_GRACE,
    PUT_TIMEOUT,
    READ_SYNC_TIMEOUT,
    STARTUP_GRACE,
    STARTUP_QUIET,
    STATUS_INTERVAL,
    VALUE_COPIES,
    Config,
)
from carelay.common.fields import FieldResolver, split_field
from carelay.common.keys import BROKER_CERT, SHARD_CERT, KeysError, load_keys
from carelay.common.lifecycle import (
    StopFlag,
    bound_malloc,
    die_with_parent,
    return_freed_memory,
    write_status,
)
from carelay.common.naming import InvalidPvName
from carelay.common.protocol import (
    BATCH_MAX,
    Message,
    Op,
    WriteRun,
)
from carelay.common.runlock import run_token
from carelay.common.sharding import shard_for

log = logging.getLogger("carelay.broker")

#: process() slice while nothing waits on a shard but puts are queued for one (seconds).
_IDLE_SLICE = 0.005
#: process() slice while nothing is queued or due either: an idle relay wakes up about
#: ten times a second (CA traffic still ends a slice at once).
_QUIET_SLICE = 0.1
#: How long to poll the shards for answers while requests are in flight (ms).
_BUSY_POLL_MS = 1
#: How often heartbeats, timeouts, link changes and coalesced posts are looked at (s).
_TICK = 0.01
#: How long a stopping broker lets ZeroMQ send its last puts to the shards (ms).
_STOP_LINGER = 1000
#: Answers that say a request was applied.
_APPLIED = frozenset({Op.ACK, Op.UPDATE, Op.FIELD, Op.DELETED})


class Pending:
    """A request sent to a shard and waiting for its answer."""

    __slots__ = ("pv", "name", "shard", "deadline", "notify", "client")

    def __init__(self, pv, name, shard, deadline, notify, client=None) -> None:
        self.pv = pv
        self.name = name
        self.shard = shard
        self.deadline = deadline
        self.notify = notify
        #: (host, user) of the client that waits for the answer, for ``relay:ERRORS``.
        self.client = client


class Parked:
    """A put that waits for its shard to be back (PUT_RECONNECT_GRACE)."""

    __slots__ = ("pv", "payload", "notify", "shard", "deadline")

    def __init__(self, pv, payload, notify, shard, deadline) -> None:
        self.pv = pv
        self.payload = payload
        self.notify = notify
        self.shard = shard
        self.deadline = deadline


class Broker:
    """The PV table, the shard links and the loop that joins them to CA."""

    def __init__(
        self, config: Config, cas_module, ctx: zmq.Context | None = None, token: str | None = None
    ) -> None:
        from carelay.broker.healthpvs import HealthPVs
        from carelay.broker.pvs import DelPvPV, PvListPV

        self.config = config
        #: Presented in every HELLO: a shard serves only the brokers of its own relay.
        self.token = token
        #: This broker process, in every HELLO: a shard fences its earlier connections.
        self.instance = secrets.token_hex(8)
        self.cas = cas_module
        self.ctx = ctx or zmq.Context.instance()
        curve = None
        if config.keys_dir is not None:
            public, secret = load_keys(config.keys_dir, BROKER_CERT)
            if secret is None:
                raise KeysError(f"{config.keys_dir / (BROKER_CERT + '.key_secret')} is missing")
            curve = (public, secret, load_keys(config.keys_dir, SHARD_CERT)[0])
        self.links = [
            ShardLink(self.ctx, k, config.shard_endpoint(k), curve) for k in range(config.shards)
        ]
        #: Per shard, why its store cannot be written ("" while it can), as its PONGs say:
        #: its PVs carry a WRITE alarm, and puts with callback to them (which it refuses)
        #: take the round trip.
        self.store_errors = [""] * config.shards
        self.resolver = FieldResolver(config.prefix, config.fields)
        self.access_group = config.access_group if config.access_security else None
        self.pvs: dict = {}
        self.field_pvs: dict = {}
        self._due_posts: set = set()
        self.n_real = 0
        self.n_bytes = 0  # what the real PVs' values may take, at full capacity (charge)
        # Creations sent to a shard and not yet answered count against the limits
        # too: a burst of first puts must not take the relay past them.
        self.n_creating = 0
        self.bytes_creating = 0
        self.byte_limit = config.byte_limit
        self._req = itertools.count(1)
        self._snapshots: dict[int, dict] = {}
        self.refusals = RefusalLog()
        self._graveyard: list = []
        self._poller = zmq.Poller()
        self._polled: tuple = ()
        self.pvlist = PvListPV(self, config.pvlist_name, config.pvlist_count)
        self.delpv = DelPvPV(self, config.delpv_name, config.max_name_length)
        self.controls = {self.pvlist.name: self.pvlist, self.delpv.name: self.delpv}
        self.ready = False
        #: Until ready, or STARTUP_QUIET after the start, shards in sync are DEBUG news:
        #: the ready line says it for all of them.
        self._quiet_until: float | None = time.monotonic() + STARTUP_QUIET
        self.ca_port: int | None = None
        #: The TCP ports the CA server listens on (see run_broker).
        self.ca_ports: list[int] = []
        self.status_path = config.run_dir / "broker.json"
        #: A link changed state: the status file is written at the next tick.
        self.status_due = False
        #: Puts waiting for their shard to be back, in arrival order.
        self._parked: list[Parked] = []
        #: Shards not in sync whose unanswered searches were logged (once each).
        self._unserved: set[int] = set()
        #: SIGHUP asked for the access security file to be read again.
        self.reload_due = False
        #: The relay's own health: figures, ``<prefix>relay:`` PVs (served at once, even
        #: before the shards are in sync) and what /metrics reads.
        self.health = Health(config.shards, _version())
        self.health_pvs = HealthPVs(config.prefix, config.shards, config.autosave_period)
        self.startup_grace = STARTUP_GRACE
        #: The CA context of the put being handled (BasePV.write), for whom an error names.
        self.put_context = None
        #: Bounds and reaps the CA circuits (see run_broker); None: not watched.
        self.circuits = None
        #: Puts that access security refused, as the CA streams show them (see
        #: run_broker); None: not followed.
        self.denied_puts = None

    # -- the PV table -----------------------------------------------------------

    def real_names(self) -> Iterable[str]:
        return (name for name, pv in self.pvs.items() if pv.real)

    def shard_live(self, index: int) -> bool:
        return self.links[index].usable

    def _refuse(self, name: str, why: str, kind: str = "name", addr=None) -> None:
        """``addr``: the caNetAddr of the search, read only for a name not refused yet."""
        address = None if addr is None or name in self.refusals else client_address(addr)
        if self.refusals.refuse(name, why, address):
            client = (address, None) if address else None
            self.error(kind, f"refused PV name: {shorten(why)}", shorten(name), client=client)

    def refuse_undecodable(self, raw: bytes) -> None:
        """A client sent a name that is not UTF-8: pcaspy's SWIG layer could not decode
        it (and goes on with it decoded as Latin-1, which the rule refuses as not ASCII).
        Logged as its own refusal; the Latin-1 name is then known, so once."""
        name = raw.decode("latin-1")
        if name.startswith(self.config.prefix):
            self._refuse(name, "not UTF-8")

    def client(self) -> tuple[str, str] | None:
        """(host, user) of the CA client whose put is being handled, if one is."""
        ctx = self.put_context
        if ctx is None:
            return None
        try:
            host, user = str(ctx.host), str(ctx.user)
        except Exception:
            return None
        if self.config.access_security is not None and self.config.access_by_ip:
            from carelay.broker.access import token_address

            # PCAS holds the token of the client's address (see access.py), not a name.
            host = token_address(host) or host
        return host, user

    def error(
        self, kind: str, reason: str, pv: str | None = None, shard: int | None = None, client=None
    ) -> None:
        """A refusal or failure, for ``relay:LAST_ERROR``/``ERRORS`` and /metrics: it names
        the client of the put being handled unless ``client`` is given."""
        self.health.refused(kind, reason, pv, shard, client or self.client())

    def access_denied(self, name: str, user: str, address: str, notify: bool) -> None:
        """A put that PCAS refused for want of write access: one log line and one entry."""
        from carelay.broker.access import ACCESS_DENIED

        pv = self.pvs.get(split_field(name)[0])
        shard = None if pv is None else pv.shard
        log.warning(
            "refused %s to %s%s from %s@%s: %s",
            "put with callback" if notify else "put",
            shorten(name),
            "" if shard is None else f" (shard {shard})",
            user or "?",
            address or "?",
            ACCESS_DENIED,
        )
        self.error("access", ACCESS_DENIED, shorten(name), shard, (address, user or "?"))

    def attached_count(self) -> int:
        """PVs with CA channels (PCAS does not tell the channels of each)."""
        n = sum(1 for pv in self.pvs.values() if pv.attached)
        n += sum(1 for pv in self.field_pvs.values() if pv.attached)
        n += sum(1 for pv in self.controls.values() if pv.attached)
        return n + self.health_pvs.attached_count()

    def claims(self, name: str, addr=None) -> bool:
        """Whether this relay serves ``name`` or ``name.FIELD`` (pvExistTest; ``addr``: the
        searching client's caNetAddr, which a refusal names).

        A name of a shard not in sync gets no answer: a stored PV must not be served as
        a new, undefined one.  CA clients search again and find it once the shard is in
        sync.  The control PVs, which span every shard, wait for them all at start."""
        if name in self.pvs or name in self.field_pvs:
            return True
        if self.health_pvs.claims(name):
            return True
        if name in self.controls:
            if not self.ready:
                self._not_in_sync(name, None)
            return self.ready
        if not name.startswith(self.config.prefix):
            return False
        base, field = split_field(name)
        c = self.config
        try:
            spec = c.pv_spec(base)
        except InvalidPvName as e:
            self._refuse(name, str(e), addr=addr)
            return False
        if field is not None and not fields.applies(field, spec):
            why = "unknown field" if field not in fields.FIELDS else "no such field for its type"
            self._refuse(name, f"{why} {field}", addr=addr)
            return False
        base_pv = self.pvs.get(base)
        if base_pv is None:
            shard = shard_for(base, c.shards)
            if not self.links[shard].live:
                self._not_in_sync(name, shard)
                return False
        if base_pv is None or not (base_pv.real or base_pv.creating):
            why = self._over_limits(spec)
            if why is not None:
                self._refuse(name, why, "limit", addr)
                return False
        return True

    def _not_in_sync(self, name: str, shard: int | None) -> None:
        """Log, once per shard until it is in sync, that a search went unanswered."""
        if shard in self._unserved:
            return
        self._unserved.add(shard)
        which = "every shard" if shard is None else f"shard {shard}"
        log.info("search for %s not answered: %s not in sync yet", shorten(name), which)

    def attach(self, name: str):
        """The PV for ``name``, made provisional if new (pvAttach); None if not served."""
        pv = self.pvs.get(name) or self.field_pvs.get(name)
        if pv is None and self.health_pvs.claims(name):
            return self.health_pvs.attach(name)
        if pv is None:
            if not self.claims(name):
                return None
            pv = self.controls.get(name)
        if pv is None:
            base, field = split_field(name)
            if field is None or field == "VAL":
                pv = self.pvs.get(base) or self._new_pv(base)
            else:
                from carelay.broker.pvs import FieldPV

                pv = self.field_pvs[name] = FieldPV(self, self.config.pv_spec(base), field)
        pv.attached = True
        return pv

    def _new_pv(self, name: str):
        from carelay.broker.pvs import RelayPV

        pv = RelayPV(self, self.config.pv_spec(name), shard_for(name, self.config.shards))
        self.pvs[name] = pv
        return pv

    def detached(self, pv) -> None:
        """The last channel to ``pv`` went away: a provisional or field PV is forgotten."""
        if self.field_pvs.get(pv.name) is pv:
            del self.field_pvs[pv.name]
        elif getattr(pv, "real", True) or self.pvs.get(pv.name) is not pv:
            return
        else:
            del self.pvs[pv.name]
        # Keep the object alive until the server is done with this callback.
        self._graveyard.append(pv)

    # -- fields -------------------------------------------------------------------

    def field_value(self, spec, field: str):
        """The current value of ``spec.name``'s ``field`` (stored, configured or built-in)."""
        pv = self.pvs.get(spec.name)
        if field == "NELM":
            return spec.count
        if field == "NORD":
            return pv.length() if pv is not None else 0
        if field == "RES":
            return 0
        eff = pv.eff if pv is not None else self.resolver.effective(spec, {})
        return fields.get(eff, field)

    def post_later(self, pv) -> None:
        """``pv`` has a coalesced event waiting (see RelayPV.post)."""
        self._due_posts.add(pv)

    def _post_due(self, now: float) -> None:
        for pv in list(self._due_posts):
            if pv.post_due(now):
                self._due_posts.discard(pv)

    def post_field(self, name: str, field: str) -> None:
        if self.field_pvs:
            fpv = self.field_pvs.get(f"{name}.{field}")
            if fpv is not None:
                fpv.post()

    def forward_field(self, name: str, field: str, raw, notify) -> bool:
        """Send a field change of PV ``name`` to its shard; False if it cannot be made."""
        pv = self.pvs.get(name)
        if pv is None or not pv.real:
            log.warning("put to %s.%s failed: %s does not exist yet", name, field, name)
            self.error("provisional", f"field put to .{field}: the PV has had no put yet", name)
            return False
        if field == "RES":
            if not raw:
                if notify is not None:
                    notify.complete(True)
                return True
            value = 1
        else:
            try:
                value = fields.validate(field, raw)
            except fields.FieldError as e:
                log.warning("refused put to %s.%s: %s", name, field, e)
                self.error("field", f"refused put to .{field}: {e}", name, pv.shard)
                return False
        msg = Message(Op.SET_FIELD, name, info={"field": field, "value": value})
        # Pending on the PV until answered: value puts meanwhile take the round trip, so
        # that the shard, not the mirror, applies the new field (DRVH, DRVL) to them.
        if not self._request(pv.shard, msg, pv, notify):
            log.warning("put to %s.%s failed: shard %d unreachable", name, field, pv.shard)
            self.error("shard_down", f"put to .{field} failed: shard unreachable", name, pv.shard)
            return False
        pv.pending += 1
        return True

    def _set_real(self, pv, real: bool) -> None:
        if real:
            self._reserve(pv, False)
        if pv.real != real:
            self.n_real += 1 if real else -1
            self.n_bytes += _charge(pv.spec) if real else -_charge(pv.spec)
            self.pvlist.dirty = True

    def _reserve(self, pv, creating: bool) -> None:
        """Count (or stop counting) ``pv`` as a creation in flight."""
        if pv.creating != creating:
            pv.creating = creating
            self.n_creating += 1 if creating else -1
            self.bytes_creating += _charge(pv.spec) if creating else -_charge(pv.spec)

    def _over_limits(self, spec) -> str | None:
        """Why a new PV of ``spec`` may not be created, or None."""
        c = self.config
        if self.n_real + self.n_creating >= c.max_pvs:
            return f"max_pvs ({c.max_pvs}) reached"
        if _charge(spec) > self.bytes_left():
            held = self.ca_buffer_bytes()
            why = f"; CA buffers hold {held} bytes of it" if held else ""
            return f"max_bytes ({self.byte_limit}) would be exceeded{why}"
        return None

    def bytes_left(self) -> int:
        """What ``max_bytes`` has left for new PVs: the charge of the PVs that exist and of
        those being created is taken, and so are the large CA buffers PCAS holds."""
        return self.byte_limit - self.n_bytes - self.ca_buffer_bytes() - self.bytes_creating

    def ca_buffer_bytes(self) -> int:
        """The large CA buffers PCAS holds for the circuits (see broker/cabuffers.py)."""
        return self.circuits.buffers.pinned_bytes if self.circuits is not None else 0

    # -- requests to shards -------------------------------------------------------

    def forward_put(self, pv, data, notify) -> bool:
        """Send a put of ``data`` to ``pv``'s shard; False if it cannot go now."""
        link = self.links[pv.shard]
        if not link.usable:
            log.warning("put to %s failed: shard %d unreachable", pv.name, pv.shard)
            self.error("shard_down", "put failed: shard unreachable", pv.name, pv.shard)
            return False
        stamp = time.time()
        # While the shard's store cannot be written, a put with callback takes the round
        # trip: the shard refuses it (or applies it, if its store has just healed), and
        # the mirror never shows a refused value.
        faulted = notify is not None and self.store_errors[pv.shard]
        if link.live and pv.real and not pv.pending and not faulted:
            data = pv.settled_put(data)
            if data is not None:
                return self.write_through(link, pv, data, stamp, notify)
        if not (pv.real or pv.creating):
            why = self._over_limits(pv.spec)
            if why is not None:
                self._refuse(pv.name, why, "limit")
                return False
        msg = Message(Op.PUT, pv.name, stamp=stamp, data=data)
        if notify is not None:
            msg.info = {"callback": 1}  # refused by a shard whose store cannot be written
        if not self._request(pv.shard, msg, pv, notify):
            log.warning("put to %s failed: shard %d not accepting", pv.name, pv.shard)
            self.error("shard_down", "put failed: shard not accepting", pv.name, pv.shard)
            return False
        self.health.puts += 1
        pv.pending += 1
        if not pv.real:
            self._reserve(pv, True)
        return True

    def write_through(self, link: ShardLink, pv, data, stamp: float, notify) -> bool:
        """A put to a PV in sync with its live shard: applied to the mirror and posted now,
        and sent on as a WRITE that the shard answers only for a put with callback (or to
        refuse it, with the PV as it holds it).  No round trip before the monitors."""
        self.health.puts += 1
        if notify is None:
            link.write(pv.name, 0, stamp, data)
        else:
            req, expires = self._expect(link, None, pv.name, notify)
            link.write(pv.name, req, stamp, data, expires)
        pv.apply(data, stamp, append=pv.ring is not None, owned=True)
        return True

    def forward_delete(self, name: str, notify) -> bool:
        pv = self.pvs.get(name)
        if pv is None or not pv.real:
            log.warning("delpv %s failed: no such PV", name)
            self.error("no_such_pv", "delpv failed: no such PV", name)
            return False
        # Counted as pending on the PV: puts wait for the answer (round trip), not the
        # mirror, until the deletion is settled.
        if not self._request(pv.shard, Message(Op.DELETE, name), pv, notify):
            log.warning("delpv %s failed: shard %d unreachable", name, pv.shard)
            self.error("shard_down", "delpv failed: shard unreachable", name, pv.shard)
            return False
        pv.pending += 1
        pv.deleting = True
        return True

    def _request(self, shard: int, msg: Message, pv=None, notify=None) -> bool:
        """Number ``msg``, send it to ``shard`` and wait for its answer (put, delete or field
        change); False when the shard cannot take it now."""
        link = self.links[shard]
        if not link.usable or link.sock is None:
            return False
        msg.req, expires = self._expect(link, pv, msg.name, notify)
        msg.info["expires"] = expires
        # Queued, and sent with the others of this process() slice in batches (run).
        # Never flushed here: a failure must not complete a put inside its own write().
        link.queue(msg)
        return True

    def _expect(self, link: ShardLink, pv, name: str, notify) -> tuple[int, float]:
        """A new request number, whose answer ``link`` now waits for, and the request's
        expiry.  The broker fails the request at its deadline (PUT_TIMEOUT); the expiry, in
        wall-clock time, comes EXPIRY_MARGIN earlier, and a shard that the request reaches
        later drops it: a put reported failed is never applied later.

        What the margin cannot cover: a shard that applied the request in time but
        answers only past the deadline (stopped between applying and answering, or a
        commit slower than the margin) has it reported failed though applied; and a
        shard whose clock runs behind the broker's by more than the margin."""
        req = next(self._req)
        deadline = time.monotonic() + PUT_TIMEOUT
        client = self.client() if notify is not None else None
        link.pending[req] = Pending(pv, name, link.index, deadline, notify, client)
        return req, time.time() + (PUT_TIMEOUT - EXPIRY_MARGIN)

    def _flush(self, link: ShardLink) -> None:
        """Send ``link``'s queued requests; the ones that cannot go fail now."""
        failed = link.flush()
        if not failed:
            return
        msgs = [m for msg in failed for m in (msg.messages() if type(msg) is WriteRun else [msg])]
        log.warning(
            "shard %d not accepting; failing %d requests (%s, ...)",
            link.index,
            len(msgs),
            msgs[0].name,
        )
        why = f"shard not accepting; failed {len(msgs)} requests"
        self.error("shard_down", why, msgs[0].name, link.index)
        for msg in msgs:
            if msg.op is Op.WRITE:
                # The mirror shows puts the shard will never see: the link goes down
                # (COMM alarm) at the next tick and the reconnect resyncs the mirror.
                link.lost_writes = True
            self._finish(link, msg.req, False)

    def _send_request(self, link: ShardLink, op: Op, info: dict | None = None) -> bool:
        """A HELLO or PING, numbered like the puts so that its answer orders them."""
        self._flush(link)
        req = next(self._req)
        return link.send(Message(op, req=req, info=info or {}))

    def _finish(self, link: ShardLink, req: int, ok: bool) -> None:
        p = link.pending.pop(req, None)
        if p is None:
            p = link.orphans.pop(req, None)
            if p is None:
                return
        if p.pv is not None:
            p.pv.pending = max(0, p.pv.pending - 1)
            if not p.pv.pending:
                self._reserve(p.pv, False)
        if p.notify is not None:
            self.health.put_callback.observe(time.monotonic() - (p.deadline - PUT_TIMEOUT))
            p.notify.complete(ok)

    def _answered(self, link: ShardLink, req: int) -> None:
        """The shard answered request ``req``.  It answers in order, so every request to it
        numbered below ``req`` and still unanswered was lost (a shard that restarted):
        those fail now rather than at their timeout, and never succeed falsely."""
        if not req:
            return
        while link.pending:
            first = next(iter(link.pending))
            if first >= req:
                break
            p = link.pending[first]
            log.warning("shard %d lost the request for %s; failing it", link.index, p.name)
            self.error("shard_down", "the shard lost the request", p.name, link.index, p.client)
            self._finish(link, first, False)

    def wait_for_pending(self, pv) -> None:
        """Serve ``pv``'s shard until its puts in flight are answered (bounded)."""
        link = self.links[pv.shard]
        self._flush(link)
        deadline = time.monotonic() + READ_SYNC_TIMEOUT
        while pv.pending and link.sock is not None and link.usable:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("read of %s answered before the shard confirmed a put", pv.name)
                return
            if link.sock.poll(timeout=min(left * 1000, 50)):
                self._drain(link)

    def wait_for_list_changes(self) -> None:
        """Serve the shards until the creations and deletions in flight are answered
        (bounded), so that a read of pvlist shows them."""
        deadline = time.monotonic() + READ_SYNC_TIMEOUT
        while True:
            shards = {
                pv.shard
                for pv in self.pvs.values()
                if pv.pending and (pv.creating or pv.deleting) and self.links[pv.shard].usable
            }
            if not shards:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("read of pvlist answered before shards %s confirmed it", shards)
                return
            for k in shards:
                self._flush(self.links[k])
            self._poll_shards(min(left * 1000, 50))

    # -- puts that wait for their shard ----------------------------------------------

    def put_waits(self, shard: int) -> bool:
        """Whether a put for ``shard`` is to wait for it: its link is down, and went down
        less than PUT_RECONNECT_GRACE ago (a shard being restarted)."""
        link = self.links[shard]
        return (
            not link.usable
            and link.ever_synced
            and time.monotonic() < link.down_since + PUT_RECONNECT_GRACE
        )

    def park(self, pv, payload, notify, shard: int) -> None:
        """Keep a put for ``shard`` until the shard is back or the grace is over; the PV
        has started an asynchronous write, which ``pv.resume`` ends."""
        link = self.links[shard]
        self._parked.append(
            Parked(pv, payload, notify, shard, link.down_since + PUT_RECONNECT_GRACE)
        )

    def _unpark(self, now: float) -> None:
        """Send on the parked puts whose shard is back; fail those whose grace is over."""
        waiting = []
        for p in self._parked:
            if self.links[p.shard].usable:
                p.pv.resume(p.payload, p.notify, True)
            elif now >= p.deadline:
                log.warning(
                    "put to %s failed: shard %d unreachable for %.1f s",
                    p.pv.name,
                    p.shard,
                    PUT_RECONNECT_GRACE,
                )
                why = f"put failed: shard unreachable for {PUT_RECONNECT_GRACE:.1f} s"
                self.error("shard_down", why, p.pv.name, p.shard)
                p.pv.resume(p.payload, p.notify, False)
            else:
                waiting.append(p)
        self._parked = waiting

    # -- answers from shards -----------------------------------------------------

    def _drain(self, link: ShardLink, limit: int = 2000) -> int:
        n = 0
        while n < limit:
            msgs = link.recv()
            if msgs is None:
                break
            n += len(msgs)
            for msg in msgs:
                self._handle(link, msg)
        return n

    def _handle(self, link: ShardLink, msg: Message) -> None:
        op = msg.op
        self._answered(link, msg.req)
        if link.live and msg.epoch != link.epoch:
            log.warning("shard %d restarted; resyncing", link.index)
            self._hello(link)
        if op is Op.UPDATE:
            pv = self.pvs.get(msg.name)
            if pv is None:
                try:
                    pv = self._new_pv(msg.name)
                except InvalidPvName as e:
                    log.warning(
                        "shard %d updated %s, which is not served: %s", link.index, msg.name, e
                    )
                    self._finish(link, msg.req, False)
                    return
            self._set_real(pv, True)
            pv.apply(
                msg.data, msg.stamp, append=pv.ring is not None, reset=bool(msg.info.get("reset"))
            )
            link.seq = msg.seq
            if msg.info.get("created"):
                self.health.creations += 1
                log.debug("created PV %s (shard %d)", msg.name, link.index)
            self._finish(link, msg.req, True)
        elif op is Op.ACK:
            link.seq = msg.seq
            self._finish(link, msg.req, True)
        elif op is Op.FIELD:
            pv = self.pvs.get(msg.name)
            field = msg.info.get("field")
            if pv is not None and isinstance(field, str) and field in fields.STORED:
                pv.field_changed(field, msg.info.get("value"))
            link.seq = msg.seq
            self._finish(link, msg.req, True)
        elif op is Op.REJECT:
            log.warning("shard %d refused %s: %s", link.index, msg.name, msg.reason)
            self._shard_refused(link, msg)
            self._finish(link, msg.req, False)
        elif op is Op.DELETED:
            self._forget(msg.name)
            link.seq = msg.seq
            if not msg.info.get("restate"):
                self.health.deletions += 1
            log.debug("deleted PV %s (shard %d)", msg.name, link.index)
            self._finish(link, msg.req, True)
        elif op is Op.PONG:
            link.pvs = msg.info.get("pvs", link.pvs)
            self.health.shards[link.index].update(msg.info)
            self._store_state(link, msg.info.get("store_error", ""))
        elif op is Op.SNAPSHOT_BEGIN:
            self._snapshots[link.index] = {}
        elif op is Op.SNAPSHOT:
            snap = self._snapshots.get(link.index)
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
            log.warning("shard %d: unexpected %s dropped", link.index, op.name)

    def _shard_refused(self, link: ShardLink, msg: Message) -> None:
        """A REJECT: for ``relay:ERRORS``, with the client that waited for it if one did."""
        waiting = link.pending.get(msg.req) or link.orphans.get(msg.req) if msg.req else None
        client = waiting.client if waiting is not None else None
        self.error("shard_refused", f"shard refused: {msg.reason}", msg.name, link.index, client)

    def _forget(self, name: str) -> None:
        pv = self.pvs.get(name)
        if pv is None or not pv.real:
            return
        self._set_real(pv, False)
        pv.forget()
        if not pv.attached:
            del self.pvs[name]
            self._graveyard.append(pv)

    def _resync(self, link: ShardLink, end: Message) -> None:
        snap = self._snapshots.pop(link.index, None)
        if snap is None:
            return
        c = self.config
        for name, pv in list(self.pvs.items()):
            if pv.shard == link.index and pv.real and name not in snap:
                self._forget(name)
        for name, (data, stamp, stored) in snap.items():
            pv = self.pvs.get(name)
            if pv is None:
                try:
                    pv = self._new_pv(name)
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
                    c.shards,
                )
            self._set_real(pv, True)
            pv.set_fields({k: v for k, v in stored.items() if k in fields.STORED})
            pv.apply(data, stamp, append=False, owned=True)  # the snapshot's own copy
        if link.ever_synced and end.epoch != link.epoch:
            self.health.restarts[link.index].append(time.monotonic())  # a new process
        if link.orphans and link.ever_synced and end.epoch != link.epoch:
            # A new shard process: what the old one had not applied died with it.
            log.warning(
                "shard %d restarted; failing %d requests sent before", link.index, len(link.orphans)
            )
            for req in list(link.orphans):
                self._finish(link, req, False)
        link.synced(end.epoch, end.seq, len(snap))
        self.status_due = True  # `carelay status` learns of the link at once, not in 1 s
        self._store_state(link, end.info.get("store_error", ""))
        self._unserved.discard(link.index)
        log.debug("shard %d in sync at seq %d", link.index, end.seq)
        level = logging.DEBUG if self._quiet_until is not None else logging.INFO
        log.log(level, "shard %d in sync: %d PVs", link.index, len(snap))

    def _hello(self, link: ShardLink) -> None:
        info = {"broker": self.instance}
        if self.token is not None:
            info["token"] = self.token
        if self._send_request(link, Op.HELLO, info):
            link.hello_sent()

    def _store_state(self, link: ShardLink, error) -> None:
        """Take what shard ``link`` says of its store; its PVs' alarms follow a change."""
        error = error if isinstance(error, str) else "store error"
        if error == self.store_errors[link.index]:
            return
        self.store_errors[link.index] = error
        if error:
            log.warning("shard %d: %s; puts with callback to its PVs fail", link.index, error)
        else:
            log.warning("shard %d can write its store again", link.index)
        for pv in self.pvs.values():
            if pv.shard == link.index and pv.real:
                pv.post(0)  # alarm change only: WRITE/MAJOR, or back

    def _link_down(self, link: ShardLink, gone: bool = False) -> None:
        """``gone``: the shard process closed the connection (see ShardLink.local), so
        what it has not answered it never applies: those requests fail now."""
        self.status_due = True
        self.store_errors[link.index] = ""  # unknown until it answers again: COMM alarm
        link.down_since = time.monotonic()
        if gone:
            for waiting in (link.pending, link.orphans):
                for req in list(waiting):
                    self._finish(link, req, False)
        # The requests in flight may still reach the shard (a shard that was stopped, a
        # connection that delivers late).  They become orphans: answered on their old
        # socket, which the link keeps (parked) for them, or failed at their deadline, when
        # the shard drops them if they come; never failed before the shard is sure to drop
        # them.  Their PVs are free for new requests at once: the reconnect's snapshot
        # shows whatever the orphans did.
        for p in link.pending.values():
            if p.pv is not None:
                self._reserve(p.pv, False)
                p.pv = None
        link.orphans.update(link.pending)
        link.pending.clear()
        self._snapshots.pop(link.index, None)
        for pv in self.pvs.values():
            if pv.shard == link.index and pv.real:
                pv.pending = 0
                pv.post(0)  # alarm change only: COMM/INVALID

    # -- the loop ------------------------------------------------------------------

    def _timers(self, now: float) -> None:
        for link in self.links:
            was_usable = link.usable
            gone = False
            if link.lost_writes:
                link.went_down("puts could not be sent")
                action = "down"
            elif link.disconnected():
                if link.local:
                    self._drain(link)  # what the shard answered before it closed
                    gone = True
                link.went_down("disconnected", park=not gone)
                action = "down"
            else:
                action = link.tick(now)
            if action == "hello":
                self._hello(link)
            elif action == "ping":
                self._send_request(link, Op.PING)
            elif action == "down" and was_usable:
                self._link_down(link, gone)
            # Requests are kept in sending order with one timeout, so the
            # expired ones are at the front.
            for waiting in (link.orphans, link.pending):
                while waiting:
                    req, p = next(iter(waiting.items()))
                    if p.deadline >= now:
                        break
                    log.warning(
                        "no answer from shard %d for %s; failing the request", p.shard, p.name
                    )
                    why = "no answer from the shard in time"
                    self.error("shard_down", why, p.name, p.shard, p.client)
                    self._finish(link, req, False)
            if link.parked and not link.orphans:
                link.close_parked()

    def _poll_shards(self, timeout_ms: float) -> int:
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
            n += self._drain(link) if sock is link.sock else self._drain_parked(link, sock)
        return n

    def _drain_parked(self, link: ShardLink, sock) -> int:
        """Answers to orphans, on a socket of an earlier connection: each completes its
        request.  Nothing else there counts: the reconnect's snapshot shows the shard."""
        n = 0
        while (msgs := link.recv_from(sock)) is not None:
            n += len(msgs)
            for msg in msgs:
                if msg.req in link.orphans:
                    ok = msg.op in _APPLIED
                    if not ok:
                        log.warning("shard %d refused %s: %s", link.index, msg.name, msg.reason)
                        self._shard_refused(link, msg)
                    self._finish(link, msg.req, ok)
        return n

    def _write_status(self) -> None:
        self.status_due = False
        write_status(
            self.status_path,
            {
                "role": "broker",
                "pvs": self.n_real,
                "ready": self.ready,
                "ca_port": self.ca_port,
                "shards": [
                    {"index": link.index, "state": link.state.value, "pvs": link.pvs}
                    for link in self.links
                ],
            },
        )

    def _became_ready(self) -> None:
        """Every shard is in sync: say so, with the CA port the server really listens on
        (PCAS takes another one when the configured port is taken)."""
        self.ready = True
        self._quiet_until = None
        self._unserved.discard(None)
        ports = self.ca_ports
        configured = os.environ.get("EPICS_CAS_SERVER_PORT") or os.environ.get(
            "EPICS_CA_SERVER_PORT", "5064"
        )
        if not ports:
            ports = [int(configured)] if configured.isdigit() else []
        self.ca_port = ports[0] if ports else None
        if ports and str(self.ca_port) != configured:
            log.warning("CA port %s is taken; serving on %s", configured, self.ca_port)
        # Status says so before the log does: who reads "ready:" may ask it at once.
        self._write_status()
        log.info(
            "ready: %d PVs, %d shards, prefix %s, control PVs %s %s, data directory %s, "
            "interfaces %s, CA port %s",
            self.n_real,
            len(self.links),
            self.config.prefix,
            self.config.pvlist_name,
            self.config.delpv_name,
            self.config.data_dir.resolve(),
            os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "").strip() or "all",
            ", ".join(map(str, ports)) or "unknown",
        )

    def _not_ready_yet(self) -> None:
        """Start-up takes long: say which shards it waits for, and from now on each one
        that gets in sync."""
        self._quiet_until = None
        synced = [f"shard {link.index} in sync" for link in self.links if link.live]
        waiting = [f"shard {link.index}" for link in self.links if not link.live]
        log.info(
            "not ready after %g s: %s; waiting for %s",
            STARTUP_QUIET,
            ", ".join(synced) or "no shard in sync",
            ", ".join(waiting),
        )

    def _update_health(self, now: float) -> None:
        """Take the health figures and set the health PVs (posting only what changed)."""
        snap = self.health.sample(self, now)
        self.health_pvs.update(snap, self.health.errors)

    def run(self, stop: StopFlag) -> None:
        next_status = next_tick = next_health = 0.0
        handled = 0
        while not stop.stopping:
            # While answers are due, do not sleep in CA's select(): poll the
            # shards briefly instead, so replies are handled as they come.
            waiting = any(link.pending or link.state is LinkState.SYNCING for link in self.links)
            # After answers were handled, CA has completions and events to send:
            # no sleep in select() before they go.
            if waiting or handled:
                delay = 0.0
            elif self._due_posts or any(link.outbox for link in self.links):
                delay = _IDLE_SLICE
            else:
                delay = _QUIET_SLICE
            self.cas.process(delay)
            if self.circuits is not None:
                self._watch_circuits()
            for link in self.links:
                # What waits for an answer goes at once; plain puts, which the mirror
                # already shows, go in batches of BATCH_MAX or at the next tick.
                if link.urgent or link.queued >= BATCH_MAX:
                    self._flush(link)
            handled = self._poll_shards(_BUSY_POLL_MS if waiting else 0)
            now = time.monotonic()
            if self._parked:
                self._unpark(now)
            self._graveyard.clear()
            if now < next_tick:
                continue
            # Every _TICK, not every turn: a turn may carry only a few puts.
            next_tick = now + _TICK
            self._flush_queued()
            self._timers(now)
            self.refusals.tick()
            if self.denied_puts is not None:
                self.denied_puts.tick()
            if self.reload_due:
                self.reload_access()
            self.pvlist.post_if_changed()
            if self._due_posts:
                self._post_due(now)
            if not self.ready and all(link.live for link in self.links):
                self._became_ready()
            elif self._quiet_until is not None and now >= self._quiet_until:
                self._not_ready_yet()
            if now >= next_status or self.status_due:
                self._write_status()
                next_status = now + STATUS_INTERVAL
                return_freed_memory()
            if now >= next_health:
                self._update_health(now)
                next_health = now + HEALTH_INTERVAL
        # A clean stop: the puts still queued go to the shards, which stop after us.
        self._flush_queued()
        for p in self._parked:
            p.pv.resume(p.payload, p.notify, False)
        self._parked.clear()

    def reload_access(self) -> None:
        """Read the access security file again (SIGHUP, ``carelay reload-acf``): its rules,
        and the addresses of its HAGs' host names.  An invalid file leaves the rules in
        force."""
        from carelay.broker.access import load_rules

        self.reload_due = False
        c = self.config
        if c.access_security is None:
            log.warning("access security not reloaded: none is configured")
            return
        problem = undefined_access_group(c.access_security, c.access_group)
        if problem is None and not load_rules(
            self.cas, c.access_security, c.access_by_ip, c.run_dir
        ):
            problem = f"access security file {c.access_security} is invalid"
        if problem is not None:
            log.error("access security not reloaded, the rules in force stay: %s", problem)
            return
        log.info("access security reloaded from %s", c.access_security)

    def _watch_circuits(self) -> None:
        """Right after each process() slice, so that a circuit over max_clients is closed
        before PCAS reads from it; a failure is logged, never fatal."""
        try:
            self.circuits.poll()
        except Exception:
            log.exception("watching the CA circuits failed; they go unwatched")
            self.circuits = None

    def _flush_queued(self) -> None:
        """Send whatever is queued for each shard."""
        for link in self.links:
            if link.outbox:
                self._flush(link)


def check_access_security(path) -> str | None:
    """Why the access security file at ``path`` does not load, or None if it does.

    Loaded in a child process, so that ``carelay up`` can refuse a bad file before
    it starts anything: EPICS prints its complaints on the C streams, where the
    child's output catches them.
    """
    code = "import sys; from pcaspy import cas; sys.exit(cas.asInitFile(sys.argv[1], '') != 0)"
    r = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )
    if r.returncode == 0:
        return None
    return " ".join((r.stderr + r.stdout).split()) or f"exit status {r.returncode}"


#: ``ASG(name)`` or ``ASG("name")`` in an access security file.
_ASG = re.compile(r'\bASG\s*\(\s*(?:"([^"]*)"|([^\s")]+))\s*\)')


def access_groups(text: str) -> set[str]:
    """The groups (ASG) that the access security file ``text`` defines; comments, from
    ``#`` to the end of a line, do not count."""
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return {quoted or bare for quoted, bare in _ASG.findall(text)}


def undefined_access_group(path, group: str) -> str | None:
    """Why the valid access security file at ``path`` cannot govern the relay's PVs,
    which all join ``group``; None if it defines the group.

    EPICS puts a member of an undefined group into DEFAULT, and an undefined DEFAULT
    allows nothing: a relay would quietly run on other rules than the site wrote."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    if group in access_groups(text):
        return None
    if group == "DEFAULT":
        return f"{path} defines no ASG(DEFAULT): every client would be denied everything"
    return f"{path} defines no ASG({group}): the relay's PVs would get the rules of ASG(DEFAULT)"


def run_broker(config: Config) -> int:
    """Entry point of ``carelay broker``."""
    die_with_parent()
    own_stderr()
    bound_malloc()
    stop = StopFlag()
    # Until the broker can act on it (below), a reload has nothing to do: it loads anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Before PCAS exists: no circuit it accepts may reach FD_SETSIZE (see circuits.py).
    fd_limit = fit_fd_limit()
    # libca/PCAS read this when the server is made: large arrays need it.
    os.environ["EPICS_CA_MAX_ARRAY_BYTES"] = str(config.ca_max_array_bytes)
    from pcaspy import cas

    from carelay.broker.casserver import RelayServer

    config.run_dir.mkdir(parents=True, exist_ok=True)
    followed = False
    if config.access_security is not None:
        # Every relay PV joins access_group; pcaspy's channels then check each
        # read and write (and so each creation, which is a write) against the file.
        from pcaspy import _cas

        from carelay.broker import access

        # The CA streams are followed for the rewrite of access by address, and to see
        # the puts that PCAS refuses by itself.
        followed = True
        try:
            access.install(_cas.__file__, config.access_by_ip)
        except (OSError, RuntimeError, ValueError, struct.error) as e:
            if config.access_by_ip:
                log.error(
                    "broker cannot start: access_by_ip cannot be enforced with this pcaspy "
                    "(%s); set access_by_ip = false to match claimed host names",
                    e,
                )
                return exits.REFUSED
            log.warning("puts refused by access security will not be recorded: %s", e)
            followed = False
        if not access.load_rules(cas, config.access_security, config.access_by_ip, config.run_dir):
            log.error(
                "broker cannot start: access security file %s is invalid", config.access_security
            )
            return exits.REFUSED
        problem = undefined_access_group(config.access_security, config.access_group)
        if problem is not None:
            log.error("broker cannot start: access_group: %s", problem)
            return exits.REFUSED
        cas.asCaStart()
        log.info(
            "access security from %s, group %s, HAGs by %s",
            config.access_security,
            config.access_group,
            "peer address" if config.access_by_ip else "claimed host name",
        )
    try:
        broker = Broker(config, cas, token=run_token(config))
    except KeysError as e:
        log.error("broker cannot start: %s", e)
        return exits.CANNOT_START
    sys.excepthook = _undecodable_names(broker, sys.excepthook)
    if followed:
        from carelay.broker.access import DeniedPuts, watch_denied

        broker.denied_puts = DeniedPuts(
            broker.access_denied, lambda: broker.health.count_refusal("access")
        )
        watch_denied(broker.denied_puts.denied)

    def reload_asked(_signum, _frame) -> None:
        broker.reload_due = True

    signal.signal(signal.SIGHUP, reload_asked)
    # Before the server is made: PCAS makes its list of large CA buffers with it.
    free_list = watch_free_list(config.ca_max_array_bytes)
    server = RelayServer(broker)
    # Read now, while the CA server's are the only listening sockets of this process.
    broker.ca_ports = listening_tcp_ports()
    metrics = None
    if config.metrics_port is not None:
        from carelay.broker.metrics import serve_metrics

        try:
            metrics = serve_metrics(broker.health, config.metrics_address, config.metrics_port)
        except OSError as e:
            # CA goes on: the relay's PVs matter more than its metrics.
            log.error(
                "cannot serve metrics on %s:%d: %s; the relay runs without /metrics",
                config.metrics_address,
                config.metrics_port,
                e.strerror or e,
            )
    broker.circuits = _circuit_monitor(config, broker.ca_ports, fd_limit)
    broker.circuits.buffers.watch(free_list)
    log.debug("started (pid %d)", os.getpid())
    try:
        broker.run(stop)
    finally:
        if broker.circuits is not None:
            broker.circuits.close()
        for link in broker.links:
            link.close(linger=_STOP_LINGER)
            link.close_parked()
        broker.status_path.unlink(missing_ok=True)
        if metrics is not None:
            metrics.shutdown()
        del server
    log.info("stopped")
    return exits.OK


def _undecodable_names(broker: Broker, previous):
    """An excepthook that turns pcaspy's report of a name it cannot decode into a refusal.

    SWIG converts a searched name to str before any relay code runs; on bytes that are
    not UTF-8 it prints the UnicodeDecodeError through sys.excepthook, with no traceback
    (no Python frame raised it), and goes on.  Anything else goes to ``previous``."""

    def hook(kind, exc, tb) -> None:
        if tb is None and issubclass(kind, UnicodeDecodeError) and isinstance(exc.object, bytes):
            try:
                broker.refuse_undecodable(exc.object)
            except Exception:
                log.exception("cannot log a name that is not UTF-8")
            return
        previous(kind, exc, tb)

    return hook


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("carelay")
    except PackageNotFoundError:
        return "unknown"


def _circuit_monitor(config: Config, ports: list[int], fd_limit: int) -> CircuitMonitor:
    max_clients = client_limit(config.max_clients, fd_limit, open_fds(), config.memory_client_limit)
    if config.max_clients is not None and max_clients < config.max_clients:
        log.warning(
            "max_clients %d does not fit in %d descriptors; at most %d CA circuits",
            config.max_clients,
            fd_limit,
            max_clients,
        )
    log.info(
        "CA circuits: at most %d (max_clients), each pinning up to %d bytes of CA buffers "
        "(%d MiB in all); closed after %g s of silence (client_idle_timeout)",
        max_clients,
        config.circuit_bytes,
        max_clients * config.circuit_bytes >> 20,
        config.client_idle_timeout,
    )
    limits = Limits(max_clients, config.client_idle_timeout)
    return CircuitMonitor(ports, limits, fd_limit, array_bytes=config.ca_max_array_bytes)


def _charge(spec) -> int:
    """What a PV of ``spec`` counts against ``max_bytes``: its values at full capacity, in
    every copy the relay's processes hold."""
    return spec.count * spec.dtype.itemsize * VALUE_COPIES
