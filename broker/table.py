"""PvTable: the PVs the broker serves, which names it claims, and the limits on them.

A name that follows the naming rule is claimed (pvExistTest) unless its shard is not in
sync yet or a new PV of its kind would pass ``max_pvs`` or ``max_bytes``; it is made a
provisional PV on attach (pvAttach) and real on its first applied put.  Creations in
flight count against the limits too, so that a burst of first puts cannot pass them.
Provisional PVs (a client holds a name that exists in no shard, or a field of one) cost
memory too, and a client can hold any number of names: at most ``max_pvs`` of them at
once, checked at the search and again at the attach, which a burst of searches passes.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterable

from carelay.broker.mirror import UDF_ALARM
from carelay.broker.refusals import RefusalLog, client_address
from carelay.common import fields
from carelay.common.config import VALUE_COPIES
from carelay.common.fields import split_field
from carelay.common.logbudget import shorten
from carelay.common.naming import InvalidPvName
from carelay.common.sharding import shard_for

log = logging.getLogger(__name__)

#: Names whose parse (spec and shard) is remembered: a creation asks for it three times
#: (search, attach, the new PV), and a client creates its PVs in bursts of searches
#: followed by as many attaches.  Bounded: at most this many names of at most
#: max_name_length characters.
SPEC_CACHE = 4096


class Channels:
    """How many casPVs of a set have CA channels, kept as each one's ``attached`` changes:
    the health sample reads it instead of walking every PV."""

    def __init__(self) -> None:
        self.count = 0


class PvTable:
    """The relay PVs and their field PVs by name, and what they count against the limits."""

    def __init__(self, broker, make_pv=None, make_field_pv=None) -> None:
        """``make_pv(broker, spec, shard)`` and ``make_field_pv(broker, spec, field)`` make
        the front-end's PV objects (the CA broker's RelayPV and FieldPV)."""
        self.broker = broker
        self.make_pv = make_pv
        self.make_field_pv = make_field_pv
        self.config = config = broker.config
        self.pvs: dict = {}
        self.field_pvs: dict = {}
        #: The field PVs of names that existed in no shard when they were attached.
        self.loose_fields: set[str] = set()
        #: Each shard's real PVs by name, in the order they became real: what a resync or
        #: an alarm change of one shard walks, not every PV of the relay.
        self.real_by_shard: list[dict] = [{} for _ in range(config.shards)]
        self.n_bytes = 0  # what the real PVs' values may take, at full capacity (charge)
        # Creations sent to a shard and not yet answered count against the limits
        # too: a burst of first puts must not take the relay past them.
        self.n_creating = 0
        self.bytes_creating = 0
        self.byte_limit = config.byte_limit
        #: The front-ends that create PVs: the CA brokers and the PVA front-end.
        self.doors = config.front_ends
        self.refusals = RefusalLog()
        #: How many of the relay, field and control PVs have CA channels.
        self.channels = Channels()
        #: PVs let go of during a CA callback: kept alive until the server is done with it.
        self.graveyard: list = []
        #: Shards not in sync whose unanswered searches were logged (once each); None
        #: stands for every shard (the control PVs, before the relay is ready).
        self.unserved: set[int | None] = set()
        self.spec_and_shard = functools.lru_cache(maxsize=SPEC_CACHE)(self._spec_and_shard)

    def _spec_and_shard(self, base: str):
        """``(spec, shard)`` of the PV name ``base``; InvalidPvName if the rule refuses it
        (not remembered: a refused name is parsed again)."""
        return self.config.pv_spec(base), shard_for(base, self.config.shards)

    @property
    def n_real(self) -> int:
        return sum(map(len, self.real_by_shard))

    def real_names(self) -> Iterable[str]:
        return itertools.chain.from_iterable(self.real_by_shard)

    def refuse(self, name: str, why: str, kind: str = "name", addr=None) -> None:
        """A name refused: counted each time (REFUSE_RATE shows a client that keeps
        searching for it), logged and entered in ERRORS once while remembered, and only
        within the log's budget, so that a client's bad names never push everyone else's
        entries out of ERRORS.  ``addr``: the caNetAddr of the search, read only for a
        name not refused yet."""
        address = None if addr is None or name in self.refusals else client_address(addr)
        if self.refusals.refuse(name, why, address):
            client = (address, None) if address else None
            self.broker.error(
                kind, f"refused PV name: {shorten(why)}", shorten(name), client=client
            )
        else:
            self.broker.health.count_refusal(kind)

    def refuse_undecodable(self, raw: bytes) -> None:
        """A client sent a name that is not UTF-8: pcaspy's SWIG layer could not decode
        it (and goes on with it decoded as Latin-1, which the rule refuses as not ASCII).
        Logged as its own refusal; the Latin-1 name is then known, so once."""
        name = raw.decode("latin-1")
        if name.startswith(self.config.prefix):
            self.refuse(name, "not UTF-8")

    def attached_count(self) -> int:
        """PVs with CA channels (PCAS does not tell the channels of each), counted as
        each one's ``attached`` changes: a walk of 20,000 PVs took about 1 ms."""
        return self.channels.count + self.broker.health_pvs.attached_count()

    def claims(self, name: str, addr=None) -> bool:
        """Whether this relay serves ``name`` or ``name.FIELD`` (pvExistTest; ``addr``: the
        searching client's caNetAddr, which a refusal names).

        A name of a shard not in sync gets no answer: a stored PV must not be served as
        a new, undefined one.  CA clients search again and find it once the shard is in
        sync.  The control PVs, which span every shard, wait for them all at start."""
        if name in self.pvs or name in self.field_pvs:
            return True
        b = self.broker
        if b.health_pvs.claims(name):
            return True
        if name in b.controls:
            if not b.ready:
                self._not_in_sync(name, None)
            return b.ready
        if not name.startswith(self.config.prefix):
            return False
        base, field = split_field(name)
        try:
            spec, shard = self.spec_and_shard(base)
        except InvalidPvName as e:
            self.refuse(name, str(e), addr=addr)
            return False
        why = None if field is None else fields.missing(field, spec)
        if why is not None:
            self.refuse(name, why, addr=addr)
            return False
        base_pv = self.pvs.get(base)
        if base_pv is None and not b.links[shard].live:
            self._not_in_sync(name, shard)
            return False
        if not counted(base_pv):
            # A new provisional PV, or a field of one: the name itself is not held.
            why = self.refusal(spec)
            if why is not None:
                self.refuse(name, why, "limit", addr)
                return False
        return True

    def _not_in_sync(self, name: str, shard: int | None) -> None:
        """Log, once per shard until it is in sync, that a search went unanswered."""
        if shard in self.unserved:
            return
        self.unserved.add(shard)
        which = "every shard" if shard is None else f"shard {shard}"
        log.info("search for %s not answered: %s not in sync yet", shorten(name), which)

    def attach(self, name: str):
        """The PV for ``name``, made provisional if new (pvAttach); None if not served."""
        b = self.broker
        pv = self.pvs.get(name) or self.field_pvs.get(name)
        if pv is None and b.health_pvs.claims(name):
            return b.health_pvs.attach(name)
        if pv is None:
            if not self.claims(name):
                return None
            pv = b.controls.get(name)
        if pv is None:
            base, field = split_field(name)
            value = field is None or field == "VAL"
            base_pv = self.pvs.get(base)
            if value and base_pv is not None:
                pv = base_pv
            else:
                # A new provisional PV, or a field of a name that exists in no shard.
                provisional = value or not counted(base_pv)
                if provisional and (why := self.provisional_full()):
                    self.refuse(name, why, "limit")
                    return None
                if value:
                    pv = self.new_pv(base)
                else:
                    spec = self.spec_and_shard(base)[0]
                    pv = self.field_pvs[name] = self.make_field_pv(b, spec, field)
                    if provisional:
                        self.loose_fields.add(name)
        pv.attached = True
        base = split_field(name)[0]
        if base not in b.controls:
            b.sync.follow(base)
        return pv

    def new_pv(self, name: str):
        """A provisional PV for ``name``; InvalidPvName if the rule refuses it."""
        pv = self.make_pv(self.broker, *self.spec_and_shard(name))
        self.pvs[name] = pv
        return pv

    def detached(self, pv) -> None:
        """The last channel to ``pv`` went away: a provisional or field PV is forgotten,
        and a PV no channel holds (nor one of its fields) is no longer followed."""
        base = split_field(pv.name)[0]
        if base in self.broker.sync.followed and not self._held(base, pv):
            self.broker.sync.unfollow(base)
        if self.field_pvs.get(pv.name) is pv:
            del self.field_pvs[pv.name]
            self.loose_fields.discard(pv.name)
        elif getattr(pv, "real", True) or self.pvs.get(pv.name) is not pv:
            return
        else:
            del self.pvs[pv.name]
        # Keep the object alive until the server is done with this callback.
        self.graveyard.append(pv)

    def _held(self, base: str, gone) -> bool:
        """Whether a channel holds PV ``base`` or a field of it, but for ``gone``."""
        pv = self.pvs.get(base)
        if pv is not None and pv is not gone and pv.attached:
            return True
        prefix = base + "."
        return any(n.startswith(prefix) and f is not gone for n, f in self.field_pvs.items())

    def forget(self, name: str) -> None:
        """PV ``name`` is gone from its shard: provisional while a client holds it."""
        pv = self.pvs.get(name)
        if pv is None or not pv.real:
            return
        self.set_real(pv, False)
        pv.forget()
        if not pv.attached:
            del self.pvs[name]
            self.graveyard.append(pv)

    def field_value(self, spec, field: str):
        """The current value of ``spec.name``'s ``field`` (stored, configured or built-in)."""
        pv = self.pvs.get(spec.name)
        if field == "NELM":
            return spec.count
        if field == "NORD":
            return pv.length() if pv is not None else 0
        if field in fields.ACTIONS:
            return 0
        if field in ("SEVR", "STAT"):
            status, severity = self.alarm(spec)
            return severity if field == "SEVR" else status
        if field == "NAME":
            return spec.name
        if field == "RTYP":
            return fields.record_type(spec)
        if field == "SCAN":
            return 0  # Passive
        if field == "UDF":
            return 0 if pv is not None and pv.real else 1
        eff = pv.eff if pv is not None else self.broker.resolver.effective(spec, {})
        return fields.get(eff, field)

    def alarm(self, spec) -> tuple[int, int]:
        """(status, severity) of ``spec.name`` as CA shows it: the alarm that every field
        of it carries too, as an IOC record's fields carry the record's."""
        pv = self.pvs.get(spec.name)
        if pv is None:
            return UDF_ALARM, fields.INVALID
        return pv.alarm()

    def post_field(self, name: str, field: str) -> None:
        """Post ``name.field`` (and ``name.field$`` of a string field) to its monitors."""
        if self.field_pvs:
            channel = f"{name}.{field}"
            fpv = self.field_pvs.get(channel)
            if fpv is not None:
                fpv.post()
            if field in fields.LONG_FIELDS:
                fpv = self.field_pvs.get(channel + fields.LONG_SUFFIX)
                if fpv is not None:
                    fpv.post()

    # -- the limits -----------------------------------------------------------------

    def set_real(self, pv, real: bool) -> None:
        if real:
            self.reserve(pv, False)
        if pv.real != real:
            if real:
                self.real_by_shard[pv.shard][pv.name] = pv
            else:
                self.real_by_shard[pv.shard].pop(pv.name, None)
            self.n_bytes += charge(pv.spec) if real else -charge(pv.spec)
            self.broker.pvlist.dirty = True
            self._fields_follow(pv.name, not (real or pv.creating))

    def reserve(self, pv, creating: bool) -> None:
        """Count (or stop counting) ``pv`` as a creation in flight."""
        if pv.creating != creating:
            pv.creating = creating
            self.n_creating += 1 if creating else -1
            self.bytes_creating += charge(pv.spec) if creating else -charge(pv.spec)
            self._fields_follow(pv.name, not (pv.real or creating))

    def _fields_follow(self, base: str, loose: bool) -> None:
        """The field PVs clients hold of PV ``base`` are provisional PVs (``loose``)
        exactly while it does not count itself: a field held of a PV that is then deleted
        is one again."""
        if not self.field_pvs:
            return
        for field in fields.FIELD_NAMES:
            name = f"{base}.{field}"
            if name in self.field_pvs:
                if loose:
                    self.loose_fields.add(name)
                else:
                    self.loose_fields.discard(name)

    def over_limits(self, spec, creation: bool = False) -> str | None:
        """Why a new PV of ``spec`` may not be created, or None.  ``creation``: it is
        about to be; then the creations this front-end has in flight also keep to its
        share of what is left (``over_share``)."""
        c = self.config
        if self.n_real + self.n_creating >= c.max_pvs:
            return f"max_pvs ({c.max_pvs}) reached"
        if charge(spec) > self.bytes_left():
            held = self.ca_buffer_bytes()
            why = f"; CA buffers hold {held} bytes of it" if held else ""
            return f"max_bytes ({self.byte_limit}) would be exceeded{why}"
        return self.over_share(spec) if creation else None

    def over_share(self, spec) -> str | None:
        """Why this front-end may not send one more creation now, or None.

        Each front-end checks the limits against the PVs it has seen, and another's
        creations on their way to a shard are not among them: two brokers creating at
        once each took all that was left (74 PVs were made with max_pvs 40).  So with
        several front-ends, each keeps its creations in flight to its share of what is
        left, 1/``doors`` of it; one creation may always go when it has none in flight
        (a client that creates one PV at a time is never refused short of the limits).
        Together they can still pass a limit by a few: one creation each, and what
        another made that this one has not taken from its shard yet."""
        doors = self.doors
        if doors == 1 or not self.n_creating:
            return None
        c = self.config
        pvs_left = c.max_pvs - self.n_real
        if (self.n_creating + 1) * doors > pvs_left:
            return (
                f"max_pvs ({c.max_pvs}) nearly reached: {doors} front-ends share the "
                f"{pvs_left} PVs left, and this one is creating {self.n_creating}"
            )
        bytes_left = self.bytes_left() + self.bytes_creating  # but for this one's creations
        if (self.bytes_creating + charge(spec)) * doors > bytes_left:
            return (
                f"max_bytes ({self.byte_limit}) nearly reached: {doors} front-ends share "
                f"the {bytes_left} bytes left, and this one is creating PVs of "
                f"{self.bytes_creating} bytes"
            )
        return None

    @property
    def n_provisional(self) -> int:
        """Provisional PVs held: the PVs neither real nor being created, and the field
        PVs of names that neither exist in a shard nor are being created."""
        held = len(self.pvs) - self.n_real - self.n_creating
        return max(0, held) + len(self.loose_fields)

    def refusal(self, spec, provisional: bool = True) -> str | None:
        """Why a name not held yet is not served, or None: a new PV of ``spec`` would
        pass the limits, or (``provisional``: serving the name makes a provisional PV)
        max_pvs of those are held."""
        return self.over_limits(spec) or (self.provisional_full() if provisional else None)

    def provisional_full(self) -> str | None:
        """Why no more provisional PVs may be made now, or None."""
        if self.n_provisional >= self.config.max_pvs:
            return f"max_pvs ({self.config.max_pvs}) provisional PVs held"
        return None

    def bytes_left(self) -> int:
        """What ``max_bytes`` has left for new PVs: the charge of the PVs that exist and of
        those being created is taken, and so are the large CA buffers PCAS holds."""
        return self.byte_limit - self.n_bytes - self.ca_buffer_bytes() - self.bytes_creating

    def ca_buffer_bytes(self) -> int:
        """The large CA buffers PCAS holds for the circuits (see broker/cabuffers.py): this
        front-end's, and those the relay's other CA brokers said they hold."""
        circuits = self.broker.circuits
        own = circuits.buffers.pinned_bytes if circuits is not None else 0
        return own + self.broker.other_ca_buffer_bytes


def counted(pv) -> bool:
    """Whether ``pv`` (or None) exists in its shard or is being created: it counts
    against max_pvs, and is no provisional PV."""
    return pv is not None and (pv.real or pv.creating)


def charge(spec) -> int:
    """What a PV of ``spec`` counts against ``max_bytes``: its values at full capacity, in
    every copy the relay's processes hold."""
    return spec.count * spec.dtype.itemsize * VALUE_COPIES
