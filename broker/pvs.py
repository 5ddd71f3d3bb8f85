"""The casPV of a relay PV: a thin pcaspy adapter over its mirror (broker/mirror.py).

``RelayPV`` answers CA reads from the mirror, turns the mirror's decisions (alarm,
deadbands, coalescing) into gdds and events, and sends puts on to the broker.  The
other casPVs live in broker/basepv.py and broker/controlpvs.py; their names are
importable from here too.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from pcaspy import cas

from carelay.broker.basepv import PUT_FAILED, VALUE_MASK, BasePV, DisplayFields, guarded
from carelay.broker.controlpvs import DelPvPV, FieldPV, PvListPV
from carelay.broker.mirror import UDF_ALARM, MirrorView, PvMirror
from carelay.broker.sync import catch_up
from carelay.broker.values import (
    ConversionError,
    ca_units,
    fill_gdd,
    gdd_to_array,
    number_array,
    read_number,
    scalar_number,
    value_gdd,
)
from carelay.common import fields
from carelay.common.naming import PvSpec

if TYPE_CHECKING:
    from carelay.broker.app import Broker

__all__ = [
    "PUT_FAILED",
    "VALUE_MASK",
    "BasePV",
    "DelPvPV",
    "DisplayFields",
    "FieldPV",
    "PvListPV",
    "RelayPV",
    "guarded",
]

log = logging.getLogger(__name__)

#: gddAppType_dbr_ctrl_* for each numeric type letter.
_CTRL_APP = {"f": 34, "i": 33}
#: The DBR_CTRL limits in the order of the gdd's elements 2..9: warning, alarm, control
#: and display limits, lower first.  A read's control limits are HOPR/LOPR (PCAS asks the
#: PV for its display limits alone), and an event must say what a read says.
_CTRL_LIMITS = ("LOW", "HIGH", "LOLO", "HIHI", "LOPR", "HOPR", "LOPR", "HOPR")


class RelayPV(MirrorView, DisplayFields, BasePV):
    """A relay PV: the CA face of ``mirror``, the broker's copy of one shard-held value
    and its fields.

    Provisional (``real`` False) until its first put is applied by the shard:
    undefined value with a UDF alarm.
    """

    def __init__(self, broker: Broker, spec: PvSpec, shard: int) -> None:
        array = spec.count > 1 or spec.kind == "c"
        super().__init__(broker, spec.name, spec.kind, spec.count, array)
        self.spec = spec
        self.shard = shard
        self.mirror = PvMirror(spec, broker.resolver)
        self.creating = False  # a first put is on its way: counted against the limits
        #: The mirror's stamp last converted to EPICS time, and the EPICS time (_timestamp):
        #: none made before the first stamp (a creation burst makes thousands of PVs).
        self._stamp: float | None = None
        self._epics_stamp: cas.epicsTimeStamp | None = None
        self.deleting = False  # a delpv of it is on its way

    # -- changes from the shard, mirrored and posted --------------------------------

    def apply(self, data: np.ndarray, stamp: float, append: bool, reset=False, owned=False) -> None:
        """Mirror a change (see PvMirror.apply) and post it to monitors."""
        self.post(self.mirror.apply(data, stamp, append, reset, owned))
        if self.broker.field_pvs:  # a NAME.NORD monitor may wait (none do on most puts)
            self.broker.post_field(self.name, "NORD")

    def field_changed(self, name: str, value) -> None:
        """Mirror a field change the shard applied: a property event if the field is one
        (fields.PROPERTY_FIELDS), and the alarm checked again."""
        self.mirror.field_changed(name, value)
        self.post(cas.DBE_PROPERTY if name in fields.PROPERTY_FIELDS else 0)
        self.broker.post_field(self.name, name)

    def forget(self) -> None:
        """The PV was deleted: back to provisional with no fields, and tell monitors."""
        self.mirror.forget()
        self.deleting = False
        self.post(VALUE_MASK | cas.DBE_PROPERTY)
        # Monitors of NAME.FIELD see the fields go back to their defaults.
        for field in fields.FIELDS:
            self.broker.post_field(self.name, field)

    def alarm(self) -> tuple[int, int]:
        """(status, severity) as CA shows them now (see ``Mirror.status``)."""
        broker = self.broker
        return self.mirror.status(broker.shard_live(self.shard), broker.store_errors[self.shard])

    def post(self, mask: int) -> None:
        """Post the events of ``mask`` (and DBE_ALARM if the alarm changed) to monitors; a
        large buffer's may wait for ``post_due``, and those past TURN_POST_CAP in one loop
        turn for ``post_held``."""
        mirror = self.mirror
        alarm, severity = self.alarm()
        was = mirror.alarm, mirror.severity
        changed = mirror.alarm_event(alarm, severity)
        if changed and self.broker.field_pvs:  # NAME.SEVR or NAME.STAT monitors may wait
            # Each when it changed, as an IOC's record posts them.
            if severity != was[1]:
                self.broker.post_field(self.name, "SEVR")
            if alarm != was[0]:
                self.broker.post_field(self.name, "STAT")
                if UDF_ALARM in (alarm, was[0]):  # its first value, or none again
                    self.broker.post_field(self.name, "UDF")
        mask |= changed
        if not self.interest or not mask:
            return
        mask = mirror.coalesce(mask)
        if not mask:
            self.broker.post_later(self)
            return
        if self.broker.turn_posts.admit(self, mask):
            self._post_now(mask, alarm, severity)
        else:
            self.broker.health.events_merged += 1

    def post_held(self, mask: int) -> None:
        """The loop's turn ends: post the events of ``mask``, which ``post`` held past
        TURN_POST_CAP, as one event with the latest value, stamp and alarm."""
        mirror = self.mirror
        try:
            if self.interest:
                self._post_now(mask, mirror.alarm, mirror.severity)
        except Exception:
            log.exception("%s (shard %d): posting its held events failed", self.name, self.shard)

    def post_due(self, now: float) -> bool:
        """Send a coalesced buffer event if its interval has passed; True when sent."""
        mask = self.mirror.take_due(now)
        if mask is None:
            return False
        if mask and self.interest:
            self._post_now(mask, *self.alarm())
        return True

    def _post_now(self, mask: int, alarm: int, severity: int) -> None:
        mirror = self.mirror
        gdd = value_gdd(self.spec, mirror.contents())
        gdd.setTimeStamp(self._timestamp())
        gdd.setStatSevr(alarm, severity)
        if mirror.shows_display(mask):
            # Monitors asking for DBR_CTRL/DBR_GR take units and limits from the event.
            gdd = self._ctrl_gdd(gdd)
        self.postEvent(mask, gdd)

    def _ctrl_gdd(self, value: cas.gdd) -> cas.gdd:
        f = self.mirror.eff
        ctrl = cas.gdd.createDD(_CTRL_APP[self.spec.kind])
        ctrl[1].put(ca_units(f.get("EGU", "")))
        for i, key in enumerate(_CTRL_LIMITS):
            ctrl[2 + i].put(float(f.get(key, 0.0)))
        if self.spec.kind == "f":
            ctrl[10].put(int(f.get("PREC", 0)))
            ctrl[11].put(value)
        else:
            ctrl[10].put(value)
        return ctrl

    def _timestamp(self) -> cas.epicsTimeStamp:
        """The stamp as EPICS time, made once per stamp: every read and event of one value
        carries the same one.  No stamp yet: the time now."""
        stamp = self.mirror.stamp
        if stamp != self._stamp:  # a float, never the None of no EPICS time made yet
            if not stamp:
                return cas.epicsTimeStamp()
            self._epics_stamp = cas.epicsTimeStamp.fromPosixTimeStamp(stamp)
            self._stamp = stamp
        return self._epics_stamp

    # -- CA callbacks -----------------------------------------------------------

    @guarded(cas.S_casApp_undefined)
    def getValue(self, value):
        broker = self.broker
        if broker.sync.others:
            catch_up(broker.sync, broker.links[self.shard])
        if broker.requests.in_flight(self):
            # A put of ours is on its way to the shard: answer after it, so that
            # a client reads what it has just written.
            broker.wait_for_answers(self)
        mirror = self.mirror
        if mirror.plain and mirror.real:
            # The commonest read: one number.
            read_number(value, self._ait, mirror.value.item(), self.alarm(), self._timestamp())
            return cas.S_casApp_success
        fill_gdd(self.spec, value, mirror.contents())
        value.setStatSevr(*self.alarm())
        value.setTimeStamp(self._timestamp())
        return cas.S_casApp_success

    def _display(self, name: str):
        return self.mirror.display(name)

    @guarded(PUT_FAILED)
    def write(self, context, value):
        """A put without callback.  A number put to a plain PV in sync with its live shard
        (the commonest put of all) takes the short way to the same outcome as the long one,
        ``BasePV.write``, which every other put takes."""
        if (
            self.plain
            and self.real
            and not self.waiting_put
            and not self.broker.requests.in_flight(self)
        ):
            link = self.broker.links[self.shard]
            if link.live:
                x = scalar_number(value)
                if x is not None:
                    try:
                        data = number_array(self.spec, x)
                    except ConversionError:
                        pass  # the long way refuses it, and says why
                    else:
                        self.broker.write_through(link, self, data, time.time(), None)
                        return cas.S_casApp_success
        return BasePV.write(self, context, value)

    def _accept(self, value):
        try:
            return gdd_to_array(self.spec, value), cas.S_casApp_success
        except ConversionError as e:
            if self.broker.error("convert", f"refused put: {e}", self.name, self.shard):
                log.warning("refused put to %s: %s", self.name, e)
            return None, cas.S_cas_noConvert

    def _forward(self, data, notify) -> bool:
        return self.broker.forward_put(self, data, notify)

    def _shard_of(self, data) -> int:
        return self.shard
