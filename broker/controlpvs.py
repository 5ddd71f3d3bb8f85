"""The casPVs beside a relay PV's value: its fields (``NAME.FIELD``), ``<prefix>pvlist``
and ``<prefix>delpv``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from pcaspy import cas
from pcaspy.alarm import Alarm, Severity

from carelay.broker.basepv import PUT_FAILED, VALUE_MASK, BasePV, ReadOnly, guarded
from carelay.broker.sync import catch_up
from carelay.broker.values import ConversionError, dbr_string, fill_gdd, gdd_to_array, value_gdd
from carelay.common import fields
from carelay.common.naming import PvSpec

if TYPE_CHECKING:
    from carelay.broker.app import Broker

log = logging.getLogger(__name__)

_FIELD_AIT = {
    "string": cas.aitEnumString,
    "double": cas.aitEnumFloat64,
    "short": cas.aitEnumInt16,
    "long": cas.aitEnumInt32,
    "enum": cas.aitEnumEnum16,
    "char": cas.aitEnumUint8,
}


class FieldPV(BasePV):
    """``NAME.FIELD``: one field of a relay PV, read and written through CA."""

    def __init__(self, broker: Broker, spec: PvSpec, field: str) -> None:
        fdef = fields.field_def(field)
        name = f"{spec.name}.{field}"
        #: ``DESC$`` and the like: the text as a char array (see fields.LONG_SUFFIX).
        self.chars = None
        if field.endswith(fields.LONG_SUFFIX):
            field = fdef.name
            self.chars = PvSpec(name, "c", fields.long_size(field, spec))
        kind, count = ("c", self.chars.count) if self.chars else ("f", 1)
        super().__init__(broker, name, kind, count, bool(self.chars), not fdef.writable)
        self.base = spec
        self.field = field
        self.fdef = fdef
        if not self.chars:
            # A longout's limits are whole numbers, and CA serves them as DBR_LONG.
            self._ait = _FIELD_AIT["long" if fields.whole(field, spec) else fdef.kind]

    def current(self):
        return self.broker.field_value(self.base, self.field)

    def _fill(self, gdd) -> None:
        v = self.current()
        if self.chars:
            text = str(v).encode()[: self.chars.count - 1] + b"\0"
            fill_gdd(self.chars, gdd, np.frombuffer(text, dtype=np.uint8))
        else:
            if gdd.primitiveType() == cas.aitEnumInvalid:
                gdd.setPrimType(self._ait)
            gdd.put(str(v) if self.fdef.kind == "string" else v)
        # The PV's alarm, as each field of an IOC record carries the record's.
        gdd.setStatSevr(*self.broker.table.alarm(self.base))
        gdd.setTimeStamp(cas.epicsTimeStamp())

    @guarded(cas.S_casApp_undefined)
    def getValue(self, value):
        broker = self.broker
        if broker.sync.others:
            catch_up(broker.sync, broker.links[broker.table.spec_and_shard(self.base.name)[1]])
        pv = broker.pvs.get(self.base.name)
        if pv is not None and self.broker.requests.in_flight(pv):
            # A field change (or put) is on its way to the shard: answer after it, so that
            # a client reads what it has just written (EPICS caput reads right after).
            self.broker.wait_for_answers(pv)
        self._fill(value)
        return cas.S_casApp_success

    @guarded(cas.S_casApp_undefined)
    def getEnums(self, enums):
        if self.fdef.kind == "enum":
            enums.put(list(fields.choices(self.field)))
        return cas.S_casApp_success

    def post(self) -> None:
        if self.interest:
            gdd = cas.gdd(16, self._ait)
            self._fill(gdd)
            self.postEvent(VALUE_MASK, gdd)

    def _raw(self, value):
        if self.chars:
            # The text up to its terminator; fields.validate checks it.
            return gdd_to_array(self.chars, value).tobytes().split(b"\0", 1)[0]
        if value.primitiveType() in (cas.aitEnumString, cas.aitEnumFixedString):
            return dbr_string(value)
        if not value.isScalar():
            return value.get()[0]
        number = value.getConvertNumeric()
        return int(number) if self.fdef.kind in ("short", "long", "enum") else number

    def _accept(self, value):
        if not self.fdef.writable:
            self.broker.error("field", f"refused put: {self.field} is read-only", self.name)
            return None, cas.S_cas_noWrite
        try:
            return self._raw(value), cas.S_casApp_success
        except ConversionError as e:
            # Like every refusal of a field put: a field value not accepted.
            if self.broker.error("field", f"refused put: {e}", self.name):
                log.warning("refused put to %s: %s", self.name, e)
            return None, PUT_FAILED

    def _forward(self, raw, notify) -> bool:
        return self.broker.forward_field(self.base.name, self.field, raw, notify)

    def _shard_of(self, raw) -> int | None:
        pv = self.broker.pvs.get(self.base.name)
        return pv.shard if pv is not None and pv.real else None


class PvListPV(ReadOnly, BasePV):
    """``<prefix>pvlist``: every PV name, comma-separated, as a char array."""

    def __init__(self, broker: Broker, name: str, count: int) -> None:
        super().__init__(broker, name, "c", count, True, read_only=True)
        self.spec = PvSpec(name, "c", count)
        self._text = b""
        self.dirty = True

    def _contents(self) -> np.ndarray:
        if self.dirty:
            self._text = ",".join(sorted(self.broker.real_names())).encode()[: self._count]
            self.dirty = False
        return np.frombuffer(self._text or b"\0", dtype=np.uint8)

    @guarded(cas.S_casApp_undefined)
    def getValue(self, value):
        # Creations and deletions on their way are shown: a read right after them sees them.
        self.broker.wait_for_list_changes()
        fill_gdd(self.spec, value, self._contents())
        value.setStatSevr(Alarm.NO_ALARM, Severity.NO_ALARM)
        value.setTimeStamp(cas.epicsTimeStamp())
        return cas.S_casApp_success

    def post_if_changed(self) -> None:
        if self.dirty and self.interest:
            gdd = value_gdd(self.spec, self._contents())
            gdd.setTimeStamp(cas.epicsTimeStamp())
            gdd.setStatSevr(Alarm.NO_ALARM, Severity.NO_ALARM)
            self.postEvent(VALUE_MASK, gdd)


class DelPvPV(BasePV):
    """``<prefix>delpv``: put a full PV name to delete that PV."""

    def __init__(self, broker: Broker, name: str, count: int) -> None:
        super().__init__(broker, name, "c", count, True)
        self.spec = PvSpec(name, "c", count)
        self.last = b""

    @guarded(cas.S_casApp_undefined)
    def getValue(self, value):
        fill_gdd(self.spec, value, np.frombuffer(self.last or b"\0", dtype=np.uint8))
        value.setStatSevr(Alarm.NO_ALARM, Severity.NO_ALARM)
        value.setTimeStamp(cas.epicsTimeStamp())
        return cas.S_casApp_success

    def _target(self, value) -> str | None:
        try:
            raw = gdd_to_array(self.spec, value).tobytes()
        except ConversionError:
            return None
        return raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()

    def _accept(self, value):
        name = self._target(value)
        if name is None:
            self.broker.error("convert", "refused put: not a PV name", self.name)
        return name, PUT_FAILED

    def _forward(self, name, notify) -> bool:
        return self.broker.forward_delete(name, notify)

    def _shard_of(self, name) -> int | None:
        pv = self.broker.pvs.get(name) if name else None
        return pv.shard if pv is not None and pv.real else None

    def _forwarded(self, name) -> None:
        self.last = name.encode()
