"""The PVA face of a relay PV, and of ``pvlist`` and ``delpv``.

``PvaPV`` is what the shared front-end modules (table, sync, requests, forward) know as
a PV: a ``PvMirror`` with the attributes and calls they use.  It turns the mirror's state
into the fields of an NTScalar and shows them on its channel (broker/pva/channels.py),
if a PVA client holds one.  Everything here runs on the front-end's loop thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from carelay.broker.mirror import VALUE_MASK, MirrorView, PvMirror
from carelay.broker.pva import convert
from carelay.common import fields as record_fields
from carelay.common.naming import PvSpec

log = logging.getLogger(__name__)


class PvaPV(MirrorView):
    """A relay PV as the PVA front-end mirrors and serves it."""

    #: Its fields' channels (``NAME.FIELD``) that clients hold, by field: a dict of its
    #: own once one is (PvaFrontEnd._bind_field); the PVs without any share this one.
    field_channels: Mapping[str, PvaField] = MappingProxyType({})

    def __init__(self, front, spec: PvSpec, shard: int) -> None:
        self.front = front
        self.name = spec.name
        self.spec = spec
        self.shard = shard
        self.mirror = PvMirror(spec, front.resolver)
        self.creating = False
        self.deleting = False
        #: A PVA client holds a channel to it.
        self.attached = False
        #: The channel clients see (see channels.Channel), once one asked for it.
        self.channel = None
        #: A put waits for the shard (Requests.park): later puts wait behind it.
        self.waiting_put = False
        #: What the channel's monitors were last shown of the alarm and of the fields in
        #: effect: a post carries those parts only when they changed (``changes``).
        self._shown_alarm: tuple[int, int] | None = None
        self._shown_eff = None

    # -- changes from the shard (or this front-end's own puts) -------------------------

    def apply(self, data: np.ndarray, stamp: float, append: bool, reset=False, owned=False) -> None:
        # Every put is shown, the deadbands (MDEL, ADEL) notwithstanding: pvxs answers a
        # get from what was posted last, so a put held back would be missing from gets.
        self.post(self.mirror.apply(data, stamp, append, reset, owned) or VALUE_MASK)

    def field_changed(self, name: str, value) -> None:
        """A field change: the metadata and the alarm it may bring are shown, not the
        value again (a buffer's monitor would take it for new elements)."""
        self.mirror.field_changed(name, value)
        status = self.status()
        self.mirror.alarm_event(*status)
        if self.field_channels:
            self.show_fields(status)
        if self.channel is not None:
            out = convert.metadata(self.spec, self.mirror.eff)
            out["alarm"] = convert.alarm_of(*status)
            self._shown_alarm, self._shown_eff = status, self.mirror.eff
            self.channel.show(out)

    def forget(self) -> None:
        self.mirror.forget()
        self.deleting = False
        self.post(-1)
        # A field is a field of a PV: its channels close, and a client that searches again
        # finds none until the PV is made again.
        for fpv in list(self.field_channels.values()):
            self.front.drop_channel(fpv.channel)
        if not self.attached and self.channel is not None:
            # No client holds it: the table forgets this PV, so its channel goes too.
            self.front.drop_channel(self.channel)
            self.channel = None

    def post(self, mask: int) -> None:
        """Show the PV's state to PVA monitors when ``mask`` says the value changed, or
        the alarm did (a mask of 0 is an alarm check only)."""
        status = self.status()
        mask |= self.mirror.alarm_event(*status)
        if self.field_channels:
            self.show_fields(status)
        if not mask or self.channel is None:
            return
        # A large buffer's events are spaced as on CA (PvMirror.coalesce): each one
        # carries the whole buffer.
        if not self.mirror.coalesce(mask):
            self.front.post_later(self)
            return
        self.channel.show(self.fields(status) if mask == -1 else self.changes(status))

    def show_fields(self, status: tuple[int, int]) -> None:
        """Show its fields' channels what changed of them (NORD, SEVR, a field put)."""
        for fpv in self.field_channels.values():
            fpv.show(status)

    def post_due(self, now: float) -> bool:
        """Show a held-back buffer event once its interval passed; True when done."""
        mask = self.mirror.take_due(now)
        if mask is None:
            return False
        if mask and self.channel is not None:
            self.channel.show(self.changes(self.status()))
        return True

    def status(self) -> tuple[int, int]:
        f = self.front
        return self.mirror.status(f.links[self.shard].live, f.store_errors[self.shard])

    def fields(self, status: tuple[int, int] | None = None) -> dict:
        """Every field of the PV's NTScalar as it stands."""
        m = self.mirror
        status = status or self.status()
        out = convert.metadata(self.spec, m.eff)
        out["value"] = convert.value_of(self.spec, m.contents())
        out["alarm"] = convert.alarm_of(*status)
        out["timeStamp"] = convert.stamp_of(m.stamp)
        self._shown_alarm, self._shown_eff = status, m.eff
        return out

    def changes(self, status: tuple[int, int]) -> dict:
        """The fields of a post: value and timeStamp, and the alarm and the metadata only
        when they differ from what the channel last showed.  The channel keeps the rest
        (a SharedPV stores the fields a post marks changed), so a put's post builds no
        metadata."""
        m = self.mirror
        out = {
            "value": convert.value_of(self.spec, m.contents()),
            "timeStamp": convert.stamp_of(m.stamp),
        }
        if status != self._shown_alarm:
            out["alarm"] = convert.alarm_of(*status)
            self._shown_alarm = status
        if m.eff is not self._shown_eff:
            out.update(convert.metadata(self.spec, m.eff))
            self._shown_eff = m.eff
        return out

    def resume(self, data, put, go: bool) -> None:
        """Send on (``go``) or fail a PVA put that waited for its restarting shard
        (Requests.unpark); ``put`` completes when the shard has applied it."""
        front = self.front
        self.waiting_put = False
        front.put_context = put
        try:
            sent = go and front.forwarder.put(self, data, put)
        finally:
            front.put_context = None
        if not sent:
            put.reason = put.reason or "put failed: shard unreachable"
            put.complete(False)

    def bind(self, channel) -> None:
        """``channel`` now serves this PV: it opens with its state as it stands."""
        self.channel = channel
        channel.prepare(convert.nt_code(self.spec), self.fields())


class PvaField:
    """``NAME.FIELD`` over PVA, as an IOC's PVA server serves a record's field: the field's
    value (an NTEnum for a menu field), with the PV's alarm and time stamp, shown to
    monitors when the value or the alarm changes.  A put to it is a field put (see
    PvaFrontEnd.on_put).  It lives while a client holds it and its PV exists."""

    def __init__(self, pv: PvaPV, field: str, channel) -> None:
        self.pv = pv
        self.field = field
        self.name = f"{pv.name}.{field}"
        self.code = convert.field_code(field)
        self.attached = False
        #: The channel that serves it, shown changes once it opened (``bind``).
        self.channel = channel
        self.opened = False
        #: What its monitors were last shown: (the field's value, the alarm).
        self._shown: tuple | None = None

    def value(self, status: tuple[int, int]):
        """The field's value now (SEVR and STAT: the alarm PVA clients are shown)."""
        pv, field = self.pv, self.field
        if field in ("SEVR", "STAT"):
            return status[1] if field == "SEVR" else status[0]
        return pv.front.table.field_value(pv.spec, field)

    def fields(self, status: tuple[int, int]) -> dict:
        value = self.value(status)
        self._shown = (value, status)
        return {
            "value": convert.field_value(self.field, value),
            "alarm": convert.alarm_of(*status),
            "timeStamp": convert.stamp_of(self.pv.mirror.stamp),
        }

    def show(self, status: tuple[int, int]) -> None:
        if self.opened and (self.value(status), status) != self._shown:
            self.channel.show(self.fields(status))

    def bind(self, channel) -> None:
        """Its channel opens with the field as it stands (PvaSync.hold)."""
        self.opened = True
        channel.prepare(self.code, self.fields(self.pv.status()))

    @staticmethod
    def refusal(spec: PvSpec, field: str) -> str | None:
        """Why a PV of ``spec`` has no field channel ``NAME.field`` over PVA (None: it has):
        it has each field it has on CA but the ``$`` forms (and VAL: the PV's own)."""
        if field.endswith(record_fields.LONG_SUFFIX):
            return f"no {field} over PVA: a PVA string carries the whole text"
        return record_fields.missing(field, spec)


class PvListPVA:
    """``<prefix>pvlist`` over PVA: the PV names, comma-separated, as one string."""

    code = "s"

    def __init__(self, front, name: str) -> None:
        self.front = front
        self.name = name
        self.dirty = True
        self.attached = False
        self.channel = None

    def fields(self) -> dict:
        self.dirty = False
        return {"value": ",".join(sorted(self.front.table.real_names()))}

    def bind(self, channel) -> None:
        self.channel = channel
        channel.prepare(self.code, self.fields())

    def post_if_changed(self) -> None:
        if self.dirty and self.channel is not None:
            self.channel.show(self.fields())


class DelPvPVA:
    """``<prefix>delpv`` over PVA: put a PV's full name to delete that PV."""

    code = "s"

    def __init__(self, front, name: str) -> None:
        self.front = front
        self.name = name
        self.last = ""
        self.attached = False
        self.channel = None
        self.dirty = False

    def fields(self) -> dict:
        return {"value": self.last}

    def bind(self, channel) -> None:
        self.channel = channel
        channel.prepare(self.code, self.fields())
