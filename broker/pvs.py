"""The casPV subclasses the broker attaches: relay PVs and the control PVs.

Every callback from the C++ server catches everything: an exception that
escaped through SWIG would abort the broker.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from pcaspy import cas
from pcaspy.alarm import Alarm, Severity

from carelay.broker.values import (
    AIT_TYPES,
    ConversionError,
    dbr_string,
    fill_gdd,
    gdd_to_array,
    number_array,
    scalar_number,
    value_gdd,
)
from carelay.common import fields
from carelay.common.naming import PvSpec
from carelay.common.ring import RingBuffer

if TYPE_CHECKING:
    from carelay.broker.app import Broker

log = logging.getLogger("carelay.broker")

#: CA status for a put the relay could not apply (clients see ECA_PUTFAIL).
PUT_FAILED = cas.S_casApp_noSupport
VALUE_MASK = cas.DBE_VALUE | cas.DBE_LOG
#: A buffer holding more than this many bytes has its events coalesced (``post_interval``):
#: at most one per BUFFER_POST_INTERVAL, and at most BUFFER_EVENT_RATE bytes a second per
#: monitor, so an 8 MB buffer posts at most every 0.2 s, however fast it is appended to.
COALESCE_BYTES = 64 * 1024
BUFFER_POST_INTERVAL = 0.05
BUFFER_EVENT_RATE = 40e6


def guarded(status_on_error):
    """Wrap a casPV callback so nothing escapes into the C++ server."""

    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args):
            try:
                return method(self, *args)
            except Exception:
                log.exception("%s: %s failed", getattr(self, "name", "?"), method.__name__)
                return status_on_error

        return inner

    return wrap


@functools.cache
def _zero(dtype: np.dtype) -> np.ndarray:
    """The value of a PV that has none yet: one read-only zero per type, shared."""
    zero = np.zeros(1, dtype=dtype)
    zero.flags.writeable = False
    return zero


class DisplayFields:
    """The DBR_CTRL/DBR_GR getters of a casPV (units, precision, display and alarm
    limits), each reading the field of its record name through ``_display``."""

    def _display(self, name: str):
        """The value of field ``name`` (EGU, PREC, HOPR, LOPR, HIHI, HIGH, LOW, LOLO)."""
        raise NotImplementedError

    def _put_display(self, gdd, name: str, convert):
        gdd.put(convert(self._display(name)))
        return cas.S_casApp_success

    @guarded(cas.S_casApp_undefined)
    def getUnits(self, units):
        return self._put_display(units, "EGU", str)

    @guarded(cas.S_casApp_undefined)
    def getPrecision(self, prec):
        return self._put_display(prec, "PREC", int)

    @guarded(cas.S_casApp_undefined)
    def getHighLimit(self, limit):
        return self._put_display(limit, "HOPR", float)

    @guarded(cas.S_casApp_undefined)
    def getLowLimit(self, limit):
        return self._put_display(limit, "LOPR", float)

    @guarded(cas.S_casApp_undefined)
    def getHighAlarmLimit(self, limit):
        return self._put_display(limit, "HIHI", float)

    @guarded(cas.S_casApp_undefined)
    def getLowAlarmLimit(self, limit):
        return self._put_display(limit, "LOLO", float)

    @guarded(cas.S_casApp_undefined)
    def getHighWarnLimit(self, limit):
        return self._put_display(limit, "HIGH", float)

    @guarded(cas.S_casApp_undefined)
    def getLowWarnLimit(self, limit):
        return self._put_display(limit, "LOW", float)


class BasePV(cas.casPV):
    """What relay and control PVs share: name, type and interest bookkeeping."""

    def __init__(self, broker: Broker, name: str, kind: str, count: int, array: bool) -> None:
        super().__init__()
        self.broker = broker
        self.name = name
        self._ait = AIT_TYPES[kind]
        self._count = count
        self._array = array
        self.interest = False
        self.attached = False
        #: A put of this PV waits for its shard (Broker.park): later puts go after it.
        self.waiting_put = False
        if broker.access_group:
            self.setAccessSecurityGroup(broker.access_group)

    def getName(self):
        return self.name

    def bestExternalType(self):
        return self._ait

    def maxDimension(self):
        return 1 if self._array else 0

    def maxBound(self, dim):
        return self._count if dim == 0 else 0

    @guarded(cas.S_casApp_noMemory)
    def interestRegister(self):
        self.interest = True
        return cas.S_casApp_success

    @guarded(None)
    def interestDelete(self):
        self.interest = False

    @guarded(None)
    def destroy(self):
        # Called when the last channel to this PV is gone.
        self.attached = False
        self.broker.detached(self)

    # -- puts: subclasses say how a put is read (_accept) and where it goes (_forward) --

    def _accept(self, value) -> tuple[object | None, int]:
        """(payload, status) of a CA put; a payload of None refuses it with that status."""
        raise NotImplementedError

    def _forward(self, payload, notify) -> bool:
        """Send ``payload`` on; ``notify.complete(ok)`` is called when it is applied."""
        raise NotImplementedError

    def _forwarded(self, payload) -> None:
        """Called once ``payload`` went on."""

    def _shard_of(self, payload) -> int | None:
        """The shard that ``payload`` goes to, if one."""
        return None

    def _parked(self, context, payload, notify) -> bool:
        """Whether the put was kept to wait for its shard, which is being restarted
        (Broker.put_waits); it then completes asynchronously, through ``resume``."""
        shard = self._shard_of(payload)
        if shard is None or self.hasAsyncWrite() or not self.broker.put_waits(shard):
            return False
        self.startAsyncWrite(context.ctx)
        self.waiting_put = True
        self.broker.park(self, payload, notify, shard)
        return True

    def resume(self, payload, notify, go: bool) -> None:
        """Send on (``go``) or fail a put kept by ``_parked``."""
        self.waiting_put = False
        try:
            ok = go and self._forward(payload, notify)
            if ok:
                self._forwarded(payload)
        except Exception:
            log.exception("%s: a waiting put failed", self.name)
            ok = False
        # A put with callback completes when its shard answers (notify); any other now.
        if (notify is None or not ok) and self.hasAsyncWrite():
            self.endAsyncWrite(cas.S_casApp_success if ok else PUT_FAILED)

    @guarded(PUT_FAILED)
    def write(self, context, value):
        if self.waiting_put:
            # A put waits for its shard: this one goes after it (the server retries it).
            return cas.S_casApp_postponeAsyncIO
        # The client, for relay:ERRORS; valid only while this callback runs.
        self.broker.put_context = context
        try:
            return self._write(context, value)
        finally:
            self.broker.put_context = None

    def _write(self, context, value):
        payload, status = self._accept(value)
        if payload is None:
            return status
        if self._parked(context, payload, None):
            return cas.S_casApp_asyncCompletion
        if not self._forward(payload, None):
            return PUT_FAILED
        self._forwarded(payload)
        return cas.S_casApp_success

    @guarded(PUT_FAILED)
    def writeNotify(self, context, value):
        if self.hasAsyncWrite():
            # One completion at a time per PV; the server retries this one later.
            return cas.S_casApp_postponeAsyncIO
        self.broker.put_context = context
        try:
            return self._write_notify(context, value)
        finally:
            self.broker.put_context = None

    def _write_notify(self, context, value):
        payload, status = self._accept(value)
        if payload is None:
            return status
        if self._parked(context, payload, self):
            return cas.S_casApp_asyncCompletion
        self.startAsyncWrite(context.ctx)
        if self._forward(payload, self):
            self._forwarded(payload)
        else:
            self.endAsyncWrite(PUT_FAILED)
        return cas.S_casApp_asyncCompletion

    def complete(self, ok: bool) -> None:
        """Finish the put with callback in progress, if any."""
        if self.hasAsyncWrite():
            self.endAsyncWrite(cas.S_casApp_success if ok else PUT_FAILED)


class RelayPV(DisplayFields, BasePV):
    """A relay PV: the broker's mirror of one shard-held value and its fields.

    Provisional (``real`` False) until its first put is applied by the shard:
    undefined value with a UDF alarm.
    """

    def __init__(self, broker: Broker, spec: PvSpec, shard: int) -> None:
        array = spec.count > 1 or spec.kind == "c"
        super().__init__(broker, spec.name, spec.kind, spec.count, array)
        self.spec = spec
        self.shard = shard
        self.real = False
        self.stamp = 0.0
        self.ring = RingBuffer(spec.count, spec.dtype) if spec.is_buffer else None
        self.value = _zero(spec.dtype)
        self.creating = False  # a first put is on its way: counted against the limits
        self.deleting = False  # a delpv of it is on its way
        self.alarm = Alarm.UDF_ALARM
        self.severity = Severity.INVALID_ALARM
        self.numeric = spec.kind in "fi"
        #: Fields clients put (mirrored from the shard), and with defaults filled in.
        self.fields: Mapping = fields.NO_FIELDS
        self.eff: Mapping = fields.NO_FIELDS
        #: (status, severity) that the alarm limits give the value.
        self.limit_alarm = (fields.NO_ALARM, fields.NO_SEVERITY)
        #: A buffer's last put: the (largest, smallest) of its elements, which the alarm
        #: limits judge (None: no numbers).  Only these two, not the elements: a put can
        #: be as large as the buffer.  A value is judged whole: it is its last put.
        self._appended: tuple | None = None
        self._due_mask = 0  # events of a large buffer waiting for its post_interval
        self._last_post = 0.0
        self._mlst: float | None = None  # value last posted with DBE_VALUE
        self._alst: float | None = None  # value last posted with DBE_LOG
        #: A numeric scalar with no fields in effect: no clipping, alarm limits or
        #: deadbands, so a put of a number takes the short way (``write``).
        self.plain = False
        self.set_fields(fields.NO_FIELDS)

    # -- mirror ---------------------------------------------------------------

    def contents(self) -> np.ndarray:
        if not self.real:
            return _zero(self.spec.dtype)
        return self.ring.view() if self.ring is not None else self.value

    def length(self) -> int:
        if not self.real:
            return 0
        return len(self.ring) if self.ring is not None else len(self.value)

    def _status(self) -> tuple[int, int]:
        if not self.real:
            return Alarm.UDF_ALARM, Severity.INVALID_ALARM
        if not self.broker.shard_live(self.shard):
            return Alarm.COMM_ALARM, Severity.INVALID_ALARM
        if self.broker.store_errors[self.shard]:
            # Its shard cannot write the value to its store (a full disk, say).
            return Alarm.WRITE_ALARM, Severity.MAJOR_ALARM
        return self.limit_alarm

    def set_fields(self, stored: Mapping) -> None:
        self.fields = dict(stored) if stored else fields.NO_FIELDS
        self.eff = self.broker.resolver.effective(self.spec, self.fields)
        plain = self.numeric and self.spec.count == 1 and self.ring is None and not self.eff
        if self.plain and not plain and self.real:
            # Puts of a plain PV skip the deadband bookkeeping: each one was posted, so
            # the value last posted is the value.
            self._mlst = self._alst = float(self.value[0])
        if plain:
            self.limit_alarm = (fields.NO_ALARM, fields.NO_SEVERITY)  # no limits in effect
        self.plain = plain

    def _check_limits(self, data: np.ndarray, held: int | None = None) -> None:
        if not (self.numeric and len(data)):
            if self.ring is not None:
                self._appended = None
            return
        if self.ring is not None:
            data = self._appended = _extremes(data)
        self._judge(data, held)

    def _last_put(self) -> np.ndarray | tuple | None:
        """What the alarm limits judge: the last put's elements, or their extremes."""
        if self.ring is not None:
            return self._appended
        return self.value if self.numeric and self.real else None

    def _judge(self, data: np.ndarray | tuple, held: int | None = None) -> None:
        """Alarm status from the alarm limits, for elements or their (largest, smallest)."""
        if self.eff and self.eff.keys() & _ALARM_LIMITS:
            extremes = _extremes(data) if isinstance(data, np.ndarray) else data
            if held is None:
                held = self.limit_alarm[0]
            self.limit_alarm = fields.check_alarm(self.eff, extremes, held)
        else:
            self.limit_alarm = (fields.NO_ALARM, fields.NO_SEVERITY)

    def _value_mask(self) -> int:
        """DBE_VALUE and DBE_LOG, less what the MDEL/ADEL deadbands hold back (scalars)."""
        if not self.numeric or self.spec.count != 1 or self.ring is not None:
            return VALUE_MASK
        v = float(self.value[0])
        mask = 0
        mdel, adel = self.eff.get("MDEL", 0.0), self.eff.get("ADEL", 0.0)
        if mdel <= 0 or self._mlst is None or abs(v - self._mlst) > mdel:
            mask |= cas.DBE_VALUE
            self._mlst = v
        if adel <= 0 or self._alst is None or abs(v - self._alst) > adel:
            mask |= cas.DBE_LOG
            self._alst = v
        return mask

    def settled_put(self, data: np.ndarray) -> np.ndarray | None:
        """``data`` as the shard will apply it to this PV (clipped to DRVL..DRVH), or None
        for a put the shard is to judge (and refuse) itself."""
        n = len(data)
        if not n or (self.ring is None and n > self.spec.count) or data.dtype != self.spec.dtype:
            return None
        if self.numeric and self.eff:
            data = fields.clip_to_drive_limits(self.eff, data)
        return data

    def apply(
        self,
        data: np.ndarray,
        stamp: float,
        append: bool,
        reset: bool = False,
        owned: bool = False,
    ) -> None:
        """Mirror a change and post it to monitors.  ``owned``: ``data`` is this PV's to
        keep (it is never changed in place), so a value needs no copy."""
        if self.ring is not None:
            if reset:
                self.ring.clear()
            if append:
                self.ring.append(data)
                if len(data) > self.spec.count:
                    data = data[-self.spec.count :]  # what the buffer took
            else:
                self.ring.replace(data)
        elif self.plain:
            # A plain scalar: every put posts its value, never in alarm (see ``plain``).
            self.value = data if owned else np.array(data, copy=True)
            self.real = True
            self.stamp = stamp
            self.post(VALUE_MASK)
            self.broker.post_field(self.name, "NORD")
            return
        else:
            self.value = data if owned else np.array(data, copy=True)
            data = self.value  # the same elements: one array per PV, not two
        self.real = True
        self.stamp = stamp
        if reset and not len(data):
            # An emptied buffer has no value to be in alarm.
            self.limit_alarm = (fields.NO_ALARM, fields.NO_SEVERITY)
        self._check_limits(data)
        self.post(self._value_mask())
        self.broker.post_field(self.name, "NORD")

    def field_changed(self, name: str, value) -> None:
        """Mirror a field change the shard applied: property event, alarms re-checked."""
        self.set_fields({**self.fields, name: value})
        last = self._last_put() if self.real else None
        if last is not None:
            # The last put again (not a whole buffer); an alarm held by HYST stays held
            # unless a limit moved.
            held = fields.NO_ALARM if name in _ALARM_LIMITS else self.limit_alarm[0]
            self._judge(last, held)
        self.post(cas.DBE_PROPERTY)
        self.broker.post_field(self.name, name)

    def forget(self) -> None:
        """The PV was deleted: back to provisional with no fields, and tell monitors."""
        self.real = False
        self.deleting = False
        self.value = _zero(self.spec.dtype)
        if self.ring is not None:
            self.ring.clear()
        self.stamp = 0.0
        self.set_fields(fields.NO_FIELDS)
        self.limit_alarm = (fields.NO_ALARM, fields.NO_SEVERITY)
        self._appended = None
        self._mlst = self._alst = None
        self.post(VALUE_MASK | cas.DBE_PROPERTY)
        # Monitors of NAME.FIELD see the fields go back to their defaults.
        for field in fields.FIELDS:
            self.broker.post_field(self.name, field)

    def post(self, mask: int) -> None:
        alarm, severity = self._status()
        if (alarm, severity) != (self.alarm, self.severity):
            mask |= cas.DBE_ALARM
            self.alarm, self.severity = alarm, severity
        if not self.interest or not mask:
            return
        if self.ring is not None and (interval := self.post_interval()):
            # A large buffer: each event carries all of it, so events may be fewer than
            # puts without losing a value.
            now = time.monotonic()
            self._due_mask |= mask
            if now - self._last_post < interval:
                self.broker.post_later(self)
                return
            mask, self._due_mask = self._due_mask, 0
            self._last_post = now
        self._post_now(mask, alarm, severity)

    def post_interval(self) -> float:
        """The least time between two events of this PV: 0 (every put posts) but for a
        buffer of over COALESCE_BYTES.  Its events, each the whole buffer, are spaced so
        that they carry at most BUFFER_EVENT_RATE bytes a second: the broker's work for a
        monitor stays bounded, and a monitor still gets every value unless values are
        appended faster than that."""
        if self.ring is None:
            return 0.0
        nbytes = len(self.ring) * self.spec.dtype.itemsize
        if nbytes <= COALESCE_BYTES:
            return 0.0
        return max(BUFFER_POST_INTERVAL, nbytes / BUFFER_EVENT_RATE)

    def post_due(self, now: float) -> bool:
        """Send a coalesced buffer event if its interval has passed; True when sent."""
        if not self._due_mask:
            return True
        if now - self._last_post < self.post_interval():
            return False
        mask, self._due_mask = self._due_mask, 0
        self._last_post = now
        if self.interest:
            self._post_now(mask, *self._status())
        return True

    def _post_now(self, mask: int, alarm: int, severity: int) -> None:
        gdd = value_gdd(self.spec, self.contents())
        gdd.setTimeStamp(self._timestamp())
        gdd.setStatSevr(alarm, severity)
        if self.numeric and (mask & cas.DBE_PROPERTY or self.eff.keys() & _DISPLAY_FIELDS):
            # Monitors asking for DBR_CTRL/DBR_GR take units and limits from the event.
            gdd = self._ctrl_gdd(gdd)
        self.postEvent(mask, gdd)

    def _ctrl_gdd(self, value: cas.gdd) -> cas.gdd:
        f = self.eff
        ctrl = cas.gdd.createDD(_CTRL_APP[self.spec.kind])
        ctrl[1].put(str(f.get("EGU", "")))
        for i, key in enumerate(("LOW", "HIGH", "LOLO", "HIHI", "LOPR", "HOPR", "DRVL", "DRVH")):
            ctrl[2 + i].put(float(f.get(key, 0.0)))
        if self.spec.kind == "f":
            ctrl[10].put(int(f.get("PREC", 0)))
            ctrl[11].put(value)
        else:
            ctrl[10].put(value)
        return ctrl

    def _timestamp(self) -> cas.epicsTimeStamp:
        if self.stamp:
            return cas.epicsTimeStamp.fromPosixTimeStamp(self.stamp)
        return cas.epicsTimeStamp()

    # -- CA callbacks -----------------------------------------------------------

    @guarded(cas.S_casApp_undefined)
    def getValue(self, value):
        if self.broker.requests.in_flight(self):
            # A put of ours is on its way to the shard: answer after it, so that
            # a client reads what it has just written.
            self.broker.wait_for_answers(self)
        fill_gdd(self.spec, value, self.contents())
        alarm, severity = self._status()
        value.setStatSevr(alarm, severity)
        value.setTimeStamp(self._timestamp())
        return cas.S_casApp_success

    def _display(self, name: str):
        return self.eff.get(name, "" if name == "EGU" else 0)

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
            log.warning("refused put to %s: %s", self.name, e)
            self.broker.error("convert", f"refused put: {e}", self.name, self.shard)
            return None, cas.S_cas_noConvert

    def _forward(self, data, notify) -> bool:
        return self.broker.forward_put(self, data, notify)

    def _shard_of(self, data) -> int:
        return self.shard


def _extremes(data: np.ndarray) -> tuple:
    """(largest, smallest) of ``data``, which has elements."""
    return (data[0], data[0]) if len(data) == 1 else (data.max(), data.min())


_ALARM_LIMITS = frozenset({"HIHI", "HIGH", "LOW", "LOLO"})
_DISPLAY_FIELDS = frozenset(
    {"EGU", "PREC", "HOPR", "LOPR", "DRVH", "DRVL", "HIHI", "HIGH", "LOW", "LOLO"}
)
#: gddAppType_dbr_ctrl_* for each numeric type letter.
_CTRL_APP = {"f": 34, "i": 33}
_FIELD_AIT = {
    "string": cas.aitEnumString,
    "double": cas.aitEnumFloat64,
    "short": cas.aitEnumInt16,
    "long": cas.aitEnumInt32,
    "enum": cas.aitEnumEnum16,
}


class FieldPV(BasePV):
    """``NAME.FIELD``: one field of a relay PV, read and written through CA."""

    def __init__(self, broker: Broker, spec: PvSpec, field: str) -> None:
        super().__init__(broker, f"{spec.name}.{field}", "f", 1, False)
        self.base = spec
        self.field = field
        self.fdef = fields.FIELDS[field]
        self._ait = _FIELD_AIT[self.fdef.kind]

    def current(self):
        return self.broker.field_value(self.base, self.field)

    def _fill(self, gdd) -> None:
        if gdd.primitiveType() == cas.aitEnumInvalid:
            gdd.setPrimType(self._ait)
        v = self.current()
        gdd.put(str(v) if self.fdef.kind == "string" else v)
        gdd.setStatSevr(Alarm.NO_ALARM, Severity.NO_ALARM)
        gdd.setTimeStamp(cas.epicsTimeStamp())

    @guarded(cas.S_casApp_undefined)
    def getValue(self, value):
        pv = self.broker.pvs.get(self.base.name)
        if pv is not None and self.broker.requests.in_flight(pv):
            # A field change (or put) is on its way to the shard: answer after it, so that
            # a client reads what it has just written (EPICS caput reads right after).
            self.broker.wait_for_answers(pv)
        self._fill(value)
        return cas.S_casApp_success

    @guarded(cas.S_casApp_undefined)
    def getEnums(self, enums):
        if self.fdef.kind == "enum":
            enums.put(list(fields.SEVERITIES))
        return cas.S_casApp_success

    def post(self) -> None:
        if self.interest:
            gdd = cas.gdd(16, self._ait)
            self._fill(gdd)
            self.postEvent(VALUE_MASK, gdd)

    def _raw(self, value):
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
            log.warning("refused put to %s: %s", self.name, e)
            self.broker.error("convert", f"refused put: {e}", self.name)
            return None, PUT_FAILED

    def _forward(self, raw, notify) -> bool:
        return self.broker.forward_field(self.base.name, self.field, raw, notify)

    def _shard_of(self, raw) -> int | None:
        pv = self.broker.pvs.get(self.base.name)
        return pv.shard if pv is not None and pv.real else None


class PvListPV(BasePV):
    """``<prefix>pvlist``: every PV name, comma-separated, as a char array."""

    def __init__(self, broker: Broker, name: str, count: int) -> None:
        super().__init__(broker, name, "c", count, True)
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

    @guarded(cas.S_cas_noWrite)
    def write(self, context, value):
        return cas.S_cas_noWrite

    writeNotify = write


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
