"""PvaFrontEnd: the PV Access front-end over the same shards as the CA brokers.

It is one more front-end peer to each shard: its own links (HELLO with its own instance
id, snapshot, then every change in order), and the shared front-end parts the CA broker
uses: the PV table (claims, limits), the requests in flight, the put path (Forwarder)
and the shard sync.  Its PVs are ``PvaPV`` mirrors, served through p4p channels.

Threads.  p4p calls in from its own threads; the links, the table and the mirrors are
the loop thread's alone.  So a channel's handler calls (put, first connect, last
disconnect) are queued on ``inbox``, which wakes the loop through a pipe it polls
beside the shard sockets, and run there.  The name lookup (``test_channel``) must
answer at once: it reads only what a dict lookup or an attribute read gives, and
queues its refusals.  ``make_channel`` hands out a channel only once it is open, and the
loop prepares its opening meanwhile (channels.py says why); ``channel_lock`` guards only
the dict of channels by name, and no p4p call is made while it is held.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time

import zmq

from carelay.broker.errorlog import ErrorLog, KeepsRefusals
from carelay.broker.forward import Forwarder
from carelay.broker.link import link_for, shard_links
from carelay.broker.logbudget import RefusedPuts
from carelay.broker.offloop import OffLoop
from carelay.broker.pva import convert
from carelay.broker.pva.access import NO_READ, PvaAccess
from carelay.broker.pva.inbox import Inbox
from carelay.broker.pva.pvaloop import PvaLoop, PvaSync
from carelay.broker.pva.pvapv import DelPvPVA, PvaField, PvaPV, PvListPVA
from carelay.broker.requests import Requests
from carelay.broker.table import PvTable, counted
from carelay.common import fields
from carelay.common.config import PVA_OPEN_WAIT, PVA_SHARD_QUIET, STARTUP_QUIET, Config
from carelay.common.fields import FieldResolver
from carelay.common.histogram import PUT_BUCKETS, Histogram
from carelay.common.logbudget import shorten
from carelay.common.naming import InvalidPvName

log = logging.getLogger(__name__)

#: What a put that changes the value alone marks changed.
_VALUE_ONLY = frozenset({"value"})
#: How often a new channel's wait for its opening looks at its shard's silence (s).
_OPEN_SLICE = 0.1


def _nothing() -> None:
    pass


def _silent(link) -> bool:
    """Whether ``link``'s shard has said nothing for PVA_SHARD_QUIET (read from a p4p
    thread: one attribute)."""
    return time.monotonic() - link.timers.last_heard > PVA_SHARD_QUIET


class _NoHealthPVs:
    """The ``<prefix>relay:`` health PVs are the CA brokers'; none here."""

    def claims(self, name: str) -> bool:
        return False

    def attached_count(self) -> int:
        return 0


class _ShardFigures:
    """What a shard's PONG says; the PVA front-end keeps no figures of it."""

    def update(self, pong) -> None:
        pass


class Figures(KeepsRefusals):
    """The counts the shared front-end modules keep (see broker/health.py for the CA
    broker's, which also serve its health PVs and /metrics)."""

    def __init__(self, shards: int) -> None:
        self.puts = self.creations = self.deletions = 0
        #: Refusals by kind, and the lines for ERRORS: the status file carries both to
        #: the CA brokers, whose health PVs and /metrics show them (broker/health.py).
        self.refused_by_kind: collections.Counter[str] = collections.Counter()
        self.errors = ErrorLog()
        self.started = time.time()
        self.put_refusals = RefusedPuts(log)
        self.put_callback = Histogram(PUT_BUCKETS)
        self.shards = [_ShardFigures() for _ in range(shards)]

    def shard_restarted(self, k: int) -> None:
        """A new process of shard ``k`` is in sync: the CA brokers count restarts."""

    def count_refusal(self, kind: str) -> None:
        """A refusal counted only."""
        self.refused_by_kind[kind] += 1

    @property
    def refusals(self) -> int:
        return sum(self.refused_by_kind.values())

    def status(self) -> dict:
        """What the status file says of them: each ERRORS line with its number (the CA
        brokers take those they have not), and the counts by kind."""
        return {"errors": self.errors.entries(), "refusals": dict(self.refused_by_kind)}


class PeerClient:
    """(host, user) of a PVA client, with the put it made: a refusal names the client
    and gives the put its reason.

    Unpacked as the CA brokers' (host, user) tuples are.  The two are read from the put's
    operation only when a refusal names them: each is a call into p4p, and most puts are
    never refused."""

    __slots__ = ("_op", "_who", "put")

    def __init__(self, op) -> None:
        self._op = op
        self._who: tuple[str, str] | None = None
        self.put: PvaPut | None = None

    def _read(self) -> tuple[str, str]:
        if self._who is None:
            try:
                self._who = (str(self._op.peer()), str(self._op.account()))
            except Exception:
                self._who = ("?", "?")
        return self._who

    def __iter__(self):
        return iter(self._read())


class PvaPut:
    """One PVA put in progress: done when each of its parts (a value, field changes) is
    applied by the shard, failed with the first reason one of them was refused for."""

    def __init__(self, op, client: PeerClient, before_done=None, defer=None) -> None:
        self.op = op
        #: Called before the client is told: what the put changed is shown first.
        self.before_done = before_done
        #: Takes the put once its last part was answered, to finish it after the rest of
        #: what came with that answer is shown (PvaFrontEnd.finish_answered); None: at once.
        self.defer = defer
        self.client = client
        client.put = self
        self.parts = 0
        self.reason = ""
        self.failed = False
        self.done = False

    def complete(self, ok: bool) -> None:
        """A part ended (Requests.finish calls this)."""
        self.parts -= 1
        self.failed = self.failed or not ok
        if self.parts <= 0 and self.defer is not None:
            self.defer(self)
        else:
            self.finish_if_done()

    def finish_if_done(self) -> None:
        if self.parts > 0 or self.done:
            return
        self.done = True
        if self.before_done is not None:
            self.before_done()
        try:
            if self.failed:
                self.op.done(error=self.reason or "put failed")
            else:
                self.op.done()
        finally:
            # The client named the put for its refusals; told now, it needs it no more.
            # The two refer to each other: left so, each put (and its p4p operation)
            # waited for the garbage collector, whose passes then took tens of ms at once
            # on the loop.
            self.client.put = None


def _part(put: PvaPut, sent: bool) -> None:
    """One part of ``put`` went on (``sent``: it completes later) or failed now."""
    if sent:
        put.parts += 1
    else:
        put.failed = True


class PvaFrontEnd:
    """The PVA front-end's state and what the shared front-end modules ask of it."""

    def __init__(self, config: Config, ctx: zmq.Context | None = None, token: str | None = None):
        self.config = config
        self.token = token
        self.instance = secrets.token_hex(8)
        self.ctx = ctx or zmq.Context.instance()
        self.links = shard_links(self.ctx, config)
        self.store_errors = [""] * config.shards
        self.resolver = FieldResolver(config.prefix, config.fields)
        self.health = Figures(config.shards)
        self.health_pvs = _NoHealthPVs()
        self.circuits = None
        #: The large CA buffers the relay's CA brokers hold, as their status files say: this
        #: front-end holds none, but they count against max_bytes (PvaLoop refreshes it).
        self.other_ca_buffer_bytes = 0
        self.pvlist = PvListPVA(self, config.pvlist_name)
        self.delpv = DelPvPVA(self, config.delpv_name)
        self.controls = {self.pvlist.name: self.pvlist, self.delpv.name: self.delpv}
        self.table = PvTable(self, make_pv=PvaPV)
        self.pvs = self.table.pvs
        self.requests = Requests(self.links, self.table, self.health, self.error)
        self.inbox = Inbox()
        self.sync = PvaSync(self)
        self.loop = PvaLoop(self)
        self.forwarder = Forwarder(self)
        self.ready = False
        self.quiet_until: float | None = time.monotonic() + STARTUP_QUIET
        self.status_due = False
        self.status_path = config.run_dir / "pva.json"
        self.pva_port: int | None = None
        #: The addresses the PVA server listens on ("": all).
        self.interfaces = ""
        #: The put being handled, whose client a refusal names.
        self.put_context: PvaPut | None = None
        #: Puts whose shards answered them, finished once the loop has handled all that
        #: came with the answers (``finish_answered``).
        self.answered: collections.deque[PvaPut] = collections.deque()
        #: The channels handed out, by name (see the module docstring).
        self.channels: dict = {}
        #: The field channels (``NAME.FIELD``) by name: each is its PV's too.
        self.field_pvs: dict[str, PvaField] = {}
        #: How many of ``channels`` are field channels (at most max_pvs).
        self.field_channels = 0
        self.channel_lock = threading.Lock()
        #: Makes a Channel (channels.Channel, given by main: this module needs no p4p).
        self.make_channel_object = None
        #: Makes the channel a client without read access gets (channels.denied).
        self.make_denied_object = None
        #: Frees, off the loop, the p4p operations it let go (channels.sweep).
        self.sweep_operations = _nothing
        #: The access security rules (an ACF configured); SIGHUP sets ``reload_due``.
        self.access = PvaAccess(config)
        self.reload_due = False
        #: Where it is read again (see broker/offloop.py).
        self.acf_reload = OffLoop("acf-reload")

    # -- what the shared modules ask --------------------------------------------------

    def client(self):
        put = self.put_context
        return put.client if put is not None else None

    def error(self, kind, reason, pv=None, shard=None, client=None) -> bool:
        """A refusal or failure: counted, and the reason the PVA put it ends is told;
        whether it may be logged (see RefusedPuts)."""
        who = client if client is not None else self.client()
        put = getattr(who, "put", None)
        if put is not None and not put.reason:
            put.reason = reason
        return self.health.refused(kind, reason, pv, shard, who)

    def finish_answered(self) -> None:
        """Tell the clients of the puts their shards answered: after every message that
        came with the answers was handled, so that what a put brought about (a value
        clipped to a drive limit it moved, which its shard sends after the answer) is shown
        before its client can read."""
        answered = self.answered
        while answered:
            answered.popleft().finish_if_done()

    def post_later(self, pv) -> None:
        """``pv`` has a coalesced event waiting (see PvaPV.post)."""
        self.loop.due_posts.add(pv)

    # -- p4p's threads: the name lookup ----------------------------------------------------

    def test_channel(self, name: str) -> bool | None:
        """Whether ``name`` is served (None: not now, ask again).  Runs on a p4p thread:
        reads only, and queues a refusal for the loop to log."""
        if name in self.controls:
            return True if self.ready else None
        if not name.startswith(self.config.prefix):
            return False
        if "." in name:
            base, field = fields.split_field(name)
            if field == "VAL":
                return self.test_channel(base)  # the PV's own channel (make_channel)
            return self._test_field(name, base, field)
        try:
            spec = self.config.pv_spec(name)
        except InvalidPvName as e:
            self.inbox.push(self.table.refuse, name, str(e))
            return False
        link = link_for(self.links, name)
        if not link.live or _silent(link):
            return None
        pv = self.table.pvs.get(name)
        if not counted(pv):
            # A provisional PV held already makes no new one.
            why = self.table.refusal(spec, provisional=pv is None)
            if why is not None:
                self.inbox.push(self.table.refuse, name, why, "limit")
                return None
        elif pv.real and name not in self.sync.followed:
            self.inbox.push(self.sync.searched, name)  # its channel is likely to follow
        return True

    def _test_field(self, name: str, base: str, field: str) -> bool | None:
        """Whether ``name``, field ``field`` of ``base``, is served: a field of a PV that
        exists (a field of one not made yet is not: a put to it could not be made either),
        which a PV of its type has.  Runs on a p4p thread, as ``test_channel``."""
        try:
            spec = self.config.pv_spec(base)
        except InvalidPvName:
            return False  # no PV: nothing to log but a search for a name no one serves
        why = PvaField.refusal(spec, field)
        if why is not None:
            self.inbox.push(self.table.refuse, name, why)
            return False
        link = link_for(self.links, base)
        if not link.live or _silent(link):
            return None
        pv = self.table.pvs.get(base)
        if pv is None or not pv.real:
            return False
        if self._fields_full(name):
            return None
        return True

    def _fields_full(self, name: str) -> bool:
        """Whether field channel ``name`` is refused for now (and the refusal queued):
        each costs memory while held, so a client that opens every field of every PV must
        not take the front-end's; as many as the PVs may be, at most.  A p4p thread:
        exact under ``channel_lock`` (``make_channel``), a first look without it."""
        limit = self.config.max_pvs
        if self.field_channels < limit or name in self.channels:
            return False
        self.inbox.push(self.table.refuse, name, f"max_pvs ({limit}) field channels held", "limit")
        return True

    def make_channel(self, name: str, peer: str = ""):
        """The channel of ``name``, open (see channels.py), or None: not now, and the
        client searches again; for a ``peer`` without read access, one of its own that
        never opens.  Runs on a p4p thread."""
        if not self.access.may_read(peer):
            self.inbox.push(self._refused_read, name, peer)
            return self.make_denied_object()
        base, field = fields.split_field(name)
        if field == "VAL":
            # NAME.VAL is NAME, as an IOC serves a record's value: the same channel, one
            # SharedPV under both names.
            name, field = base, None
        with self.channel_lock:
            channel = self.channels.get(name)
            if channel is None:
                # The searches of many fields at once all found room: the count is exact here.
                if field is not None and self._fields_full(name):
                    return None
                channel = self.channels[name] = self.make_channel_object(self, name)
                if field is not None:
                    self.field_channels += 1
                self.inbox.push(self._bind, channel)
        if self._opens(channel):
            return channel
        if not channel.decided:  # else the loop closed it, and logged a refusal if one
            log.warning("PVA channel %s not opened: refused for now", shorten(name))
        self.inbox.push(self.drop_channel, channel)
        return None

    def _opens(self, channel) -> bool:
        """Whether ``channel`` opens: prepared by the loop within PVA_OPEN_WAIT, and its
        shard not silent meanwhile (a hung shard; this thread serves no client while it
        waits).  Runs on a p4p thread."""
        name = channel.name
        link = None if name in self.controls else link_for(self.links, name)
        deadline = time.monotonic() + PVA_OPEN_WAIT
        while not channel.opening(_OPEN_SLICE):
            if channel.decided:  # prepared since that look, or closed
                return channel.opening(0)
            if time.monotonic() >= deadline or (link is not None and _silent(link)):
                return False
        return True

    # -- the loop thread: channels -------------------------------------------------------

    def _refused_read(self, name: str, peer: str) -> None:
        self.health.refused("access", NO_READ, name)
        self.access.refused_read(name, peer)

    def _bind(self, channel) -> None:
        name = channel.name
        if self.channels.get(name) is not channel:
            return
        if "." in name:
            self._bind_field(channel)
            return
        target = self.controls.get(name) or self.table.pvs.get(name)
        if target is None:
            if not self.table.claims(name):
                self.drop_channel(channel)
                return
            target = self.table.new_pv(name)
        if isinstance(target, PvaPV):
            # Opened with the PV as its shard holds it, and its later changes are shown
            # before another front-end's put to it completes (see PvaSync.hold).
            self.sync.hold(target, channel)
            return
        target.bind(channel)

    def _bind_field(self, channel) -> None:
        """A field channel opens as its PV's own does (PvaSync.hold): with the field as
        the shard holds it, and what other front-ends change of it (NORD, SEVR, the field)
        shown before their puts with callback complete."""
        base, field = fields.split_field(channel.name)
        pv = self.table.pvs.get(base)
        if pv is None or not pv.real:  # deleted since the search
            self.drop_channel(channel)
            return
        if not pv.field_channels:
            pv.field_channels = {}
        fpv = pv.field_channels[field] = PvaField(pv, field, channel)
        self.field_pvs[channel.name] = fpv
        self.sync.hold(pv, channel, fpv)

    def reinstall_rules(self, rules) -> None:
        """The rules ``PvaAccess.reread`` gave are in force from now (None: not reloaded),
        and each open channel is checked under them."""
        if self.access.install(rules):
            self.recheck_channels()

    def recheck_channels(self) -> None:
        """New access rules: every open channel is closed.  Its clients reconnect, and
        ``make_channel`` checks their read access under the new rules (a channel is the
        PV's, shared by its clients: it cannot be taken from one alone)."""
        with self.channel_lock:
            channels = list(self.channels.values())
        for channel in channels:
            self.drop_channel(channel)
        if channels:
            log.info(
                "closed %d PVA channels: their clients reconnect under the new rules", len(channels)
            )

    def drop_channel(self, channel) -> None:
        """Close ``channel`` and forget it: the next client of its name gets a new one."""
        with self.channel_lock:
            if dropped := self.channels.get(channel.name) is channel:
                del self.channels[channel.name]
                if "." in channel.name:
                    self.field_channels -= 1
        fpv = self.field_pvs.get(channel.name)
        if fpv is not None and fpv.channel is channel:
            self._drop_field(fpv, channel)
        elif dropped and channel.name not in self.controls and "." not in channel.name:
            self.sync.let_go(channel.name, channel)
            # A provisional PV made for this channel, which no client holds (its opening
            # was given up): it goes too, or it keeps a place of max_pvs for good.
            pv = self.table.pvs.get(channel.name)
            if pv is not None and not pv.real and not pv.attached:
                pv.channel = None
                self.table.detached(pv)
        channel.shut()

    def _drop_field(self, fpv: PvaField, channel) -> None:
        """A field channel is gone (PvaSync.let_go: its PV too, if nothing else holds it)."""
        del self.field_pvs[fpv.name]
        fpv.opened = False
        pv = fpv.pv
        if pv.field_channels.get(fpv.field) is fpv:
            del pv.field_channels[fpv.field]
        self.sync.let_go(pv.name, channel)

    def _target(self, channel):
        name = channel.name
        return self.controls.get(name) or self.table.pvs.get(name) or self.field_pvs.get(name)

    def on_first_connect(self, channel) -> None:
        if self.channels.get(channel.name) is not channel:
            channel.shut()  # attached after it closed: sent back (see channels.py)
            return
        target = self._target(channel)
        if target is not None:
            target.attached = True

    def on_last_disconnect(self, channel) -> None:
        target = self._target(channel)
        if target is None or target.channel is not channel:
            return
        target.attached = False
        if isinstance(target, PvaField):
            self.drop_channel(channel)
        elif isinstance(target, PvaPV):
            # Nobody holds it: its channel goes, and the shard's wait on its puts for this
            # front-end (PvaSync); a provisional PV goes too, as on CA.
            if not target.real:
                self.table.detached(target)
            target.channel = None
            self.drop_channel(channel)

    # -- the loop thread: puts --------------------------------------------------------------

    def on_put(self, channel, op) -> None:
        target = self._target(channel)
        if target is None or target.channel is not channel:
            op.done(error="no such PV")
            return
        shard = getattr(target, "shard", None)
        denied = self.access.check_put(channel.name, shard, op)
        if denied is not None:
            # A put, a field change, a creation or a delete: each a write.
            self.health.refused("access", denied, channel.name, shard)
            op.done(error=denied)
            return
        put = PvaPut(op, PeerClient(op), self.pvlist.post_if_changed, self.answered.append)
        self.put_context = put
        try:
            if target is self.pvlist:
                put.failed, put.reason = True, "pvlist is read-only"
            elif target is self.delpv:
                self._delete(put, op.value())
            elif isinstance(target, PvaField):
                self._put_field(put, target, op.value())
            else:
                self._put(put, target, op.value())
        finally:
            self.put_context = None
        put.finish_if_done()

    def _put(self, put: PvaPut, pv: PvaPV, value) -> None:
        """The value and the metadata a PVA put changed, each checked before any goes: a
        put the client is told failed changes nothing."""
        changed = value.changedSet()
        # Most puts bring a value alone: no metadata to look for.
        changes = () if changed == _VALUE_ONLY else convert.field_puts(changed, value.__getitem__)
        data = None
        try:
            if changed != _VALUE_ONLY:
                convert.check_put_paths(changed)
            if "value" in changed:
                data = convert.put_array(pv.spec, value["value"])
            for field, raw in changes:
                if not fields.applies(field, pv.spec):
                    raise convert.PutRefused(f"refused put to .{field}: {pv.name} has none")
                try:
                    fields.validate(field, raw)
                except fields.FieldError as e:
                    raise convert.PutRefused(f"refused put to .{field}: {e}") from None
        except convert.PutRefused as e:
            why = str(e) if str(e).startswith("refused") else f"refused put: {e}"
            if self.error("convert", why, pv.name, pv.shard):
                log.warning("refused PVA put to %s (shard %d): %s", shorten(pv.name), pv.shard, e)
            put.failed = True
            return
        for field, raw in changes:
            _part(put, self.forwarder.field(pv.name, field, raw, put))
            if put.failed:
                return
        if data is None:
            return
        if not changes and (pv.waiting_put or self.requests.put_waits(pv.shard)):
            # Its shard is being restarted: the put waits for it, and later ones after it,
            # as on CA (PvaPV.resume).
            pv.waiting_put = True
            self.requests.park(pv, data, put, pv.shard, put.client)
            put.parts += 1
            return
        _part(put, self.forwarder.put(pv, data, put))

    def _put_field(self, put: PvaPut, fpv: PvaField, value) -> None:
        """A put to ``NAME.FIELD``: the field put a CA client makes, checked and refused
        with the same reasons (a read-only field, a value out of range)."""
        if not value.changedSet() & {"value", "value.index"}:
            put.failed, put.reason = True, "refused put: the put changes no value"
            return
        raw = convert.field_put(fpv.field, value)
        _part(put, self.forwarder.field(fpv.pv.name, fpv.field, raw, put))

    def _delete(self, put: PvaPut, value) -> None:
        name = str(value["value"]).strip()
        sent = self.forwarder.delete(name, put)
        if sent:
            self.delpv.last = name
            if self.delpv.channel is not None:  # its gets read the name, as CA's do
                self.delpv.channel.show(self.delpv.fields())
        _part(put, sent)
