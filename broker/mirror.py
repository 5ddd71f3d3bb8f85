"""The broker's mirror of one relay PV, with no CA server in it.

A ``PvMirror`` holds what the broker serves of a shard-held PV: its value (or ring
buffer), stamp and fields, and decides what each change means for CA monitors: the
alarm status the limits give, the events the MDEL/ADEL deadbands let through, and
when a large buffer's events are coalesced.  The casPV adapter (broker/pvs.py)
turns those decisions into gdds and postEvent calls.  Plain Python and numpy:
never pcaspy, so it is tested without a CA server.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from operator import attrgetter

import numpy as np

from carelay.common import fields
from carelay.common.fields import FieldResolver
from carelay.common.naming import PvSpec
from carelay.common.ring import RingBuffer

#: CA event masks (db_access.h), the values pcaspy's ``cas.DBE_*`` have.
DBE_VALUE = 1
DBE_LOG = 2
DBE_ALARM = 4
DBE_PROPERTY = 8
VALUE_MASK = DBE_VALUE | DBE_LOG
#: Alarm statuses (alarm.h) besides the limit ones in common.fields.
WRITE_ALARM = 2
COMM_ALARM = 9
UDF_ALARM = 17

#: A buffer holding more than this many bytes has its events coalesced (``post_interval``):
#: at most one per BUFFER_POST_INTERVAL, and at most BUFFER_EVENT_RATE bytes a second per
#: monitor, so an 8 MB buffer posts at most every 0.2 s, however fast it is appended to.
COALESCE_BYTES = 64 * 1024
BUFFER_POST_INTERVAL = 0.05
BUFFER_EVENT_RATE = 40e6

ALARM_LIMITS = frozenset({"HIHI", "HIGH", "LOW", "LOLO"})
#: Fields a DBR_CTRL/DBR_GR event carries.
DISPLAY_FIELDS = frozenset(
    {"EGU", "PREC", "HOPR", "LOPR", "DRVH", "DRVL", "HIHI", "HIGH", "LOW", "LOLO"}
)
_NO_LIMIT_ALARM = (fields.NO_ALARM, fields.NO_SEVERITY)


@functools.cache
def zero(dtype: np.dtype) -> np.ndarray:
    """The value of a PV that has none yet: one read-only zero per type, shared."""
    z = np.zeros(1, dtype=dtype)
    z.flags.writeable = False
    return z


def extremes(data: np.ndarray) -> tuple:
    """(largest, smallest) of the numbers in ``data``, which has elements: a NaN among
    them hides no limit.  (NaN, NaN) when every element is NaN, which is in no alarm."""
    if len(data) == 1:
        return data[0], data[0]
    high, low = data.max(), data.min()
    if high != high:  # a NaN: judged by the numbers beside it, if any
        numbers = data[~np.isnan(data)]
        if len(numbers):
            high, low = numbers.max(), numbers.min()
    return high, low


def past_deadband(last: float | None, value: float, deadband: float) -> bool:
    """Whether ``value`` moved more than ``deadband`` from ``last``, the value last posted
    (None: nothing posted yet), as EPICS's recGblCheckDeadband judges it: NaN or an
    infinity against a number, or +inf against -inf, is an infinite change; NaN against
    NaN, or an infinity against the same one, is none.  So a deadband of 0 posts a change
    and a negative one posts every put."""
    if last is None:
        return True
    if math.isfinite(value) and math.isfinite(last):
        return abs(last - value) > deadband
    same = value == last or (math.isnan(value) and math.isnan(last))
    return (0.0 if same else math.inf) > deadband


class PvMirror:
    """One relay PV as the broker mirrors it from its shard.

    Provisional (``real`` False) until its first put is applied: undefined value with a
    UDF alarm.  Slots: the broker holds one per PV, up to ``max_pvs`` of them.
    """

    __slots__ = (
        "spec",
        "resolver",
        "real",
        "stamp",
        "ring",
        "value",
        "numeric",
        "fields",
        "eff",
        "limit_alarm",
        "plain",
        "alarm",
        "severity",
        "pacer",
        "shared",
        "_appended",
        "_mlst",
        "_alst",
        "_limit_moved",
    )

    def __init__(self, spec: PvSpec, resolver: FieldResolver) -> None:
        self.spec = spec
        self.resolver = resolver
        self.real = False
        self.stamp = 0.0
        self.ring = RingBuffer(spec.count, spec.dtype) if spec.is_buffer else None
        self.value = zero(spec.dtype)
        self.numeric = spec.kind in "fi"
        #: Fields clients put (mirrored from the shard), and with defaults filled in.
        self.fields: Mapping = fields.NO_FIELDS
        self.eff: Mapping = fields.NO_FIELDS
        #: (status, severity) that the alarm limits give the value.
        self.limit_alarm = _NO_LIMIT_ALARM
        #: (status, severity) last posted to monitors.
        self.alarm = UDF_ALARM
        self.severity = fields.INVALID
        #: A buffer's last put: the (largest, smallest) of its elements, which the alarm
        #: limits judge (None: no numbers).  Only these two, not the elements: a put can
        #: be as large as the buffer.  A value is judged whole: it is its last put.
        self._appended: tuple | None = None
        #: Spaces the events of a large buffer (None: not a buffer).
        self.pacer = EventPacer(self.ring) if self.ring is not None else None
        #: A buffer another front-end appends to as well: appends interleave, so this
        #: front-end's take the long way (mirrored from the shard's answer, in the
        #: shard's order), not written through.
        self.shared = False
        #: Value last posted with DBE_VALUE, with DBE_LOG (a string's bytes; None: none).
        self._mlst: float | bytes | None = None
        self._alst: float | bytes | None = None
        #: An alarm limit moved since the value was last judged: no hold by HYST then.
        self._limit_moved = False
        #: A numeric scalar with no fields in effect: no clipping or alarm limits, deadbands
        #: of 0; a put of a number takes the short way (RelayPV.write), one compare to post.
        self.plain = False
        self.set_fields(fields.NO_FIELDS)

    # -- what is held -----------------------------------------------------------

    def contents(self) -> np.ndarray:
        """The elements served: none held yet reads as one zero."""
        if not self.real:
            return zero(self.spec.dtype)
        return self.ring.view() if self.ring is not None else self.value

    def length(self) -> int:
        """Elements held (NORD)."""
        if not self.real:
            return 0
        return len(self.ring) if self.ring is not None else len(self.value)

    def display(self, name: str):
        """The value of display field ``name`` (EGU, PREC, HOPR, ...) for DBR_CTRL/DBR_GR."""
        return self.eff.get(name, "" if name == "EGU" else 0)

    def status(self, live: bool, store_fault) -> tuple[int, int]:
        """(alarm status, severity) of the PV, given whether its shard is in sync (``live``)
        and whether the shard cannot write its store (``store_fault``, a full disk say)."""
        if not self.real:
            return UDF_ALARM, fields.INVALID
        if not live:
            return COMM_ALARM, fields.INVALID
        if store_fault:
            return WRITE_ALARM, fields.MAJOR
        return self.limit_alarm

    # -- changes ------------------------------------------------------------------

    def set_fields(self, stored: Mapping) -> None:
        """Take the fields the shard holds; configured defaults fill in the rest."""
        self.fields = dict(stored) if stored else fields.NO_FIELDS
        self.eff = self.resolver.effective(self.spec, self.fields)
        plain = self.numeric and self.spec.count == 1 and self.ring is None and not self.eff
        if self.plain and not plain:
            self._alst = self._mlst  # a plain PV posts DBE_LOG with each DBE_VALUE
        elif plain and not self.plain and self._alst != self._mlst:
            self._mlst = None  # deadbands that parted: the next put posts both
        if plain:
            self.limit_alarm = _NO_LIMIT_ALARM  # no limits in effect
        self.plain = plain

    def settled_put(self, data: np.ndarray) -> np.ndarray | None:
        """``data`` as the shard will apply it to this PV (clipped to DRVL..DRVH), or None
        for a put the shard is to judge (and refuse) itself."""
        n = len(data)
        if not n or (self.ring is None and n > self.spec.count) or data.dtype != self.spec.dtype:
            return None
        if self.shared:
            return None  # another front-end appends too: the shard's order rules
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
    ) -> int:
        """Mirror a change; returns the value events it makes (DBE_VALUE/DBE_LOG, less what
        the deadbands hold back).  ``owned``: ``data`` is this PV's to keep (it is never
        changed in place), so a value needs no copy."""
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
            # Never in alarm; MDEL = ADEL = 0: both events when the value changes, as
            # past_deadband judges it (NaN after NaN is no change).
            self.value = data if owned else np.array(data, copy=True)
            self.real = True
            self.stamp = stamp
            v = data.item()
            last = self._mlst
            if v != last and (v == v or last == last):
                self._mlst = v
                return VALUE_MASK
            return 0
        else:
            self.value = data if owned else np.array(data, copy=True)
            data = self.value  # the same elements: one array per PV, not two
        self.real = True
        self.stamp = stamp
        if reset and not len(data):
            # An emptied buffer has no value to be in alarm.
            self.limit_alarm = _NO_LIMIT_ALARM
        self._check_limits(data)
        return self._value_mask()

    def field_changed(self, name: str, value) -> None:
        """Mirror a field change the shard applied, and judge the last put again (not a
        whole buffer).  A field whose put processes the PV (fields.processes) leaves the
        judging to the put the shard sends right after it, in the same batch
        (RequestHandler.process_after_fields): the alarm it brings is shown at the time of
        that processing, as an IOC's record posts it, not at the last put's."""
        self.set_fields({**self.fields, name: value})
        if name in ALARM_LIMITS:
            self._limit_moved = True
        if not self.real or fields.processes(name, self.spec):
            return
        last = self._last_put()
        if last is not None:
            self._judge(last)

    def forget(self) -> None:
        """The PV was deleted: back to provisional with no fields."""
        self.real = False
        self.value = zero(self.spec.dtype)
        if self.ring is not None:
            self.ring.clear()
        self.stamp = 0.0
        self.set_fields(fields.NO_FIELDS)
        self.limit_alarm = _NO_LIMIT_ALARM
        self._limit_moved = False
        self._appended = None
        self._mlst = self._alst = None

    # -- alarms and deadbands -----------------------------------------------------

    def _check_limits(self, data: np.ndarray) -> None:
        if not (self.numeric and len(data)):
            if self.ring is not None:
                self._appended = None
            return
        if self.ring is not None:
            data = self._appended = extremes(data)
        self._judge(data)

    def _last_put(self) -> np.ndarray | tuple | None:
        """What the alarm limits judge: the last put's elements, or their extremes."""
        if self.ring is not None:
            return self._appended
        return self.value if self.numeric and self.real else None

    def _judge(self, data: np.ndarray | tuple) -> None:
        """Alarm status from the alarm limits, for elements or their (largest, smallest).
        An alarm held by HYST stays held unless a limit moved since the last judging."""
        if self.eff and self.eff.keys() & ALARM_LIMITS:
            ends = extremes(data) if isinstance(data, np.ndarray) else data
            held = fields.NO_ALARM if self._limit_moved else self.limit_alarm[0]
            self.limit_alarm = fields.check_alarm(self.eff, ends, held)
        else:
            self.limit_alarm = _NO_LIMIT_ALARM
        self._limit_moved = False

    def _value_mask(self) -> int:
        """The value events of the put just mirrored, by the EPICS record rules: arrays and
        buffers every put (waveform), strings on change (stringout), numbers past MDEL and
        ADEL (ai/ao)."""
        if self.spec.count != 1 or self.ring is not None or self.spec.kind == "c":
            return VALUE_MASK
        if not self.numeric:
            text = bytes(self.value[0])
            mask = 0 if text == self._mlst else VALUE_MASK
            self._mlst = self._alst = text
            return mask
        v = float(self.value[0])
        mask = 0
        if past_deadband(self._mlst, v, self.eff.get("MDEL", 0.0)):
            mask |= DBE_VALUE
            self._mlst = v
        if past_deadband(self._alst, v, self.eff.get("ADEL", 0.0)):
            mask |= DBE_LOG
            self._alst = v
        return mask

    # -- events ---------------------------------------------------------------------

    def alarm_event(self, alarm: int, severity: int) -> int:
        """DBE_ALARM when (``alarm``, ``severity``) differs from what monitors were last
        told, and it becomes what they are told; else 0."""
        if alarm == self.alarm and severity == self.severity:
            return 0
        self.alarm, self.severity = alarm, severity
        return DBE_ALARM

    def shows_display(self, mask: int) -> bool:
        """Whether an event of ``mask`` carries units and limits (DBR_CTRL/DBR_GR)."""
        return self.numeric and bool(mask & DBE_PROPERTY or self.eff.keys() & DISPLAY_FIELDS)

    def post_interval(self) -> float:
        """The least time between two events of this PV (see EventPacer.interval)."""
        return self.pacer.interval() if self.pacer is not None else 0.0

    def coalesce(self, mask: int, now: float | None = None) -> int:
        """The events to post now for ``mask``: all but for a large buffer (EventPacer)."""
        return mask if self.pacer is None else self.pacer.coalesce(mask, now)

    def take_due(self, now: float) -> int | None:
        """The events ``coalesce`` held back, to post now (see EventPacer.take_due)."""
        return 0 if self.pacer is None else self.pacer.take_due(now)


class EventPacer:
    """Spaces the events of a ring buffer of over COALESCE_BYTES.  Each event carries all
    of the buffer, so events may be fewer than puts without losing a value."""

    __slots__ = ("ring", "itemsize", "_due_mask", "_last_post")

    def __init__(self, ring: RingBuffer) -> None:
        self.ring = ring
        self.itemsize = ring.dtype.itemsize
        self._due_mask = 0  # events waiting for the interval to pass
        self._last_post = 0.0

    def interval(self) -> float:
        """The least time between two events: 0 (every put posts) but for a buffer of
        over COALESCE_BYTES.  Its events, each the whole buffer, are spaced so that they
        carry at most BUFFER_EVENT_RATE bytes a second: the broker's work for a monitor
        stays bounded, and a monitor still gets every value unless values are appended
        faster than that."""
        nbytes = len(self.ring) * self.itemsize
        if nbytes <= COALESCE_BYTES:
            return 0.0
        return max(BUFFER_POST_INTERVAL, nbytes / BUFFER_EVENT_RATE)

    def coalesce(self, mask: int, now: float | None = None) -> int:
        """The events to post now for ``mask``: at most one post per ``interval``; within
        it, 0, and ``mask`` waits for ``take_due``."""
        interval = self.interval()
        if not interval:
            return mask
        if now is None:
            now = time.monotonic()
        self._due_mask |= mask
        if now - self._last_post < interval:
            return 0
        mask, self._due_mask = self._due_mask, 0
        self._last_post = now
        return mask

    def take_due(self, now: float) -> int | None:
        """The events ``coalesce`` held back, to post now (0: none wait), or None while the
        interval since the last post has not passed."""
        if not self._due_mask:
            return 0
        if now - self._last_post < self.interval():
            return None
        mask, self._due_mask = self._due_mask, 0
        self._last_post = now
        return mask


def _mirrored(attribute: str) -> property:
    return property(attrgetter(f"mirror.{attribute}"), doc=f"PvMirror.{attribute}")


class MirrorView:
    """A front-end's PV as the shared modules (table, sync, requests, forward) read it: its
    ``mirror``'s state, read-only (a method of the mirror is called as the PV's own)."""

    real = _mirrored("real")
    value = _mirrored("value")
    stamp = _mirrored("stamp")
    ring = _mirrored("ring")
    eff = _mirrored("eff")
    plain = _mirrored("plain")
    contents = _mirrored("contents")
    length = _mirrored("length")
    settled_put = _mirrored("settled_put")
    set_fields = _mirrored("set_fields")
    post_interval = _mirrored("post_interval")
