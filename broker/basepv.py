"""What the broker's casPVs share: the callback guard, the DBR_CTRL getters, the monitor
interest, the refusal of puts to read-only PVs and ``BasePV`` (name, type and the put
paths).

Every callback from the C++ server catches everything: an exception that
escaped through SWIG would abort the broker.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from pcaspy import cas

from carelay.broker.access import READ_ONLY_GROUP
from carelay.broker.mirror import VALUE_MASK
from carelay.broker.values import AIT_TYPES, ca_units

if TYPE_CHECKING:
    from carelay.broker.app import Broker
    from carelay.broker.table import Channels

log = logging.getLogger(__name__)

#: CA status for a put the relay could not apply (clients see ECA_PUTFAIL).
PUT_FAILED = cas.S_casApp_noSupport
__all__ = [
    "PUT_FAILED",
    "VALUE_MASK",
    "Attached",
    "BasePV",
    "DisplayFields",
    "MonitorInterest",
    "ReadOnly",
    "guarded",
]


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


def _display_getter(method: str, field: str, convert):
    """The DBR_CTRL getter ``method`` of a casPV: it puts field ``field``, as ``convert``
    makes it, into the gdd it is given."""

    def getter(self, gdd):
        gdd.put(convert(self._display(field)))
        return cas.S_casApp_success

    getter.__name__ = getter.__qualname__ = method
    return guarded(cas.S_casApp_undefined)(getter)


class DisplayFields:
    """The DBR_CTRL/DBR_GR getters of a casPV (units, precision, display and alarm
    limits), each reading the field of its record name through ``_display``."""

    def _display(self, name: str):
        """The value of field ``name`` (EGU, PREC, HOPR, LOPR, HIHI, HIGH, LOW, LOLO)."""
        raise NotImplementedError

    getUnits = _display_getter("getUnits", "EGU", ca_units)
    getPrecision = _display_getter("getPrecision", "PREC", int)
    getHighLimit = _display_getter("getHighLimit", "HOPR", float)
    getLowLimit = _display_getter("getLowLimit", "LOPR", float)
    getHighAlarmLimit = _display_getter("getHighAlarmLimit", "HIHI", float)
    getLowAlarmLimit = _display_getter("getLowAlarmLimit", "LOLO", float)
    getHighWarnLimit = _display_getter("getHighWarnLimit", "HIGH", float)
    getLowWarnLimit = _display_getter("getLowWarnLimit", "LOW", float)


class MonitorInterest:
    """Whether a casPV has monitors (``interest``, set False by its ``__init__``), as the
    server registers them."""

    @guarded(cas.S_casApp_noMemory)
    def interestRegister(self):
        self.interest = True
        return cas.S_casApp_success

    @guarded(None)
    def interestDelete(self):
        self.interest = False


class Attached:
    """``attached``: whether a client holds a channel to this casPV, counted in the
    ``Channels`` that ``_channels`` names (set before ``attached`` is first set)."""

    _channels: Channels
    _attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    @attached.setter
    def attached(self, on: bool) -> None:
        if on != self._attached:
            self._attached = on
            self._channels.count += 1 if on else -1


class ReadOnly:
    """The put callbacks of a casPV that refuses every put."""

    @guarded(cas.S_cas_noWrite)
    def write(self, context, value):
        return cas.S_cas_noWrite

    writeNotify = write


class BasePV(Attached, MonitorInterest, cas.casPV):
    """What relay and control PVs share: name, type and interest bookkeeping."""

    def __init__(
        self, broker: Broker, name: str, kind: str, count: int, array: bool, read_only=False
    ) -> None:
        """``read_only``: no client may write it (the readers of ``access_group`` read it):
        CA tells them so, channel by channel (see broker/access.py)."""
        super().__init__()
        self.broker = broker
        self._channels = broker.table.channels
        self.name = name
        self._ait = AIT_TYPES[kind]
        self._count = count
        self._array = array
        self.interest = False
        self.attached = False
        #: A put of this PV waits for its shard (Broker.park): later puts go after it.
        self.waiting_put = False
        group = READ_ONLY_GROUP if read_only else broker.access_group
        if group:
            self.setAccessSecurityGroup(group)

    def getName(self):
        return self.name

    def bestExternalType(self):
        return self._ait

    def maxDimension(self):
        return 1 if self._array else 0

    def maxBound(self, dim):
        return self._count if dim == 0 else 0

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
        try:
            self.broker.park(self, payload, notify, shard)
        except Exception:
            # Never left in progress: the write fails now.
            log.exception("%s: a put could not wait for its shard", self.name)
            self.waiting_put = False
            self.endAsyncWrite(PUT_FAILED)
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
        """A CA put without callback."""
        if self.waiting_put:
            # A put waits for its shard: this one goes after it (the server retries it).
            return cas.S_casApp_postponeAsyncIO
        return self._put(context, value, None)

    @guarded(PUT_FAILED)
    def writeNotify(self, context, value):
        """A CA put with callback: it completes when the put is applied (``complete``)."""
        if self.hasAsyncWrite():
            # One completion at a time per PV; the server retries this one later.
            return cas.S_casApp_postponeAsyncIO
        return self._put(context, value, self)

    def _put(self, context, value, notify):
        """Accept or refuse a CA put, then park it or send it on; ``notify``: this PV for a
        put with callback, which completes asynchronously, else None."""
        # The client, for relay:ERRORS; valid only while this callback runs.
        self.broker.put_context = context
        try:
            payload, status = self._accept(value)
            if payload is None:
                return status
            if self._parked(context, payload, notify):
                return cas.S_casApp_asyncCompletion
            if notify is None:
                if not self._forward(payload, None):
                    return PUT_FAILED
                self._forwarded(payload)
                return cas.S_casApp_success
            self.startAsyncWrite(context.ctx)
            sent = False
            try:
                sent = self._forward(payload, notify)
                if sent:
                    self._forwarded(payload)
            except Exception:
                # Nothing leaves the write in progress: a put that did not go on fails
                # now; one that did completes when its shard answers (``complete``).
                log.exception("%s: a put with callback failed", self.name)
            if not sent and self.hasAsyncWrite():
                self.endAsyncWrite(PUT_FAILED)
            return cas.S_casApp_asyncCompletion
        finally:
            self.broker.put_context = None

    def complete(self, ok: bool) -> None:
        """Finish the put with callback in progress, if any."""
        if self.hasAsyncWrite():
            self.endAsyncWrite(cas.S_casApp_success if ok else PUT_FAILED)
