"""The relay's health PVs, ``<prefix>relay:...``, served like an IOC's iocStats PVs.

Read-only casPVs that hold one value each, with DESC, EGU, PREC and alarm limits
(served as DBR_CTRL and as ``NAME.DESC``, ``NAME.EGU``, ... fields).  The broker's
loop sets them once every HEALTH_INTERVAL from ``Health.snapshot``; a PV posts an
event only when its value or alarm changed.  Every callback catches everything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from pcaspy import cas

from carelay.broker.access import PUBLIC_GROUP
from carelay.broker.basepv import (
    VALUE_MASK,
    Attached,
    DisplayFields,
    MonitorInterest,
    ReadOnly,
    guarded,
)
from carelay.broker.health import SHARD_SEVERITY, SHARD_STATES, STATE_ALARM, uptime_text
from carelay.broker.table import Channels
from carelay.broker.values import fill_gdd, value_gdd
from carelay.common import fields
from carelay.common.config import (
    CLOCK_OFFSET_HIGH,
    ERROR_LINE_MAX,
    ERRORS_KEPT,
    FD_FREE_LOLO,
    FD_FREE_LOW,
    FLUSH_AGE_HIGH_PERIODS,
    FLUSH_AGE_HIHI_PERIODS,
    MAX_BYTES_HIGH,
    MAX_BYTES_HIHI,
)
from carelay.common.naming import PvSpec

#: The part of a health PV's name after the prefix.
HEALTH_PART = "relay:"
_AIT = {
    "i": cas.aitEnumInt32,
    "f": cas.aitEnumFloat64,
    "s": cas.aitEnumString,
    "e": cas.aitEnumEnum16,
    "c": cas.aitEnumUint8,
}
#: The record type each kind of health PV reads as (its RTYP): it takes no puts.
_RTYP = {"i": "longin", "f": "ai", "s": "stringin", "e": "mbbi", "c": "waveform"}
#: Fields a health PV serves as ``NAME.FIELD`` (from its Meta, NAME and RTYP from what it
#: is), and their CA type; and ``NAME$``, its name as a char array (see fields.py).
_FIELDS = {
    "NAME": cas.aitEnumString,
    "NAME" + fields.LONG_SUFFIX: cas.aitEnumUint8,
    "RTYP": cas.aitEnumString,
    "DESC": cas.aitEnumString,
    "EGU": cas.aitEnumString,
    "PREC": cas.aitEnumInt16,
    "HOPR": cas.aitEnumFloat64,
    "LOPR": cas.aitEnumFloat64,
    "HIHI": cas.aitEnumFloat64,
    "HIGH": cas.aitEnumFloat64,
    "LOW": cas.aitEnumFloat64,
    "LOLO": cas.aitEnumFloat64,
}


@dataclass(frozen=True)
class Meta:
    """What a health PV is: type ('i' long, 'f' double, 's' string, 'e' enum, 'c' char
    array), element count, DESC, EGU, PREC, display range and alarm limits."""

    kind: str
    desc: str
    egu: str = ""
    count: int = 1
    prec: int = 0
    hopr: float = 0.0
    lopr: float = 0.0
    limits: dict = field(default_factory=dict)  # HIHI/HIGH/LOW/LOLO, HHSV/HSV/LSV/LLSV

    def field_value(self, name: str):
        if name == "DESC":
            return self.desc
        if name == "EGU":
            return self.egu
        if name == "PREC":
            return self.prec
        if name == "HOPR":
            return self.hopr
        if name == "LOPR":
            return self.lopr
        return float(self.limits.get(name, 0.0))


class _ReadOnlyPV(Attached, ReadOnly, cas.casPV):
    """What a health PV and its fields share: a name, whether a client attached (counted
    in ``channels``), and no puts."""

    def __init__(self, name: str, channels: Channels) -> None:
        super().__init__()
        # Every client reads it, none writes, and CA tells them so (broker/access.py).
        self.setAccessSecurityGroup(PUBLIC_GROUP)
        self.name = name
        self._channels = channels
        self.attached = False

    def getName(self):
        return self.name

    @guarded(None)
    def destroy(self):
        self.attached = False


class HealthPV(DisplayFields, MonitorInterest, _ReadOnlyPV):
    """One health PV: a value, its alarm, and the time it last changed."""

    def __init__(self, name: str, meta: Meta, channels: Channels) -> None:
        super().__init__(name, channels)
        self.meta = meta
        self.interest = False
        self.value = "" if meta.kind in "sc" else 0
        self.alarm = fields.NO_ALARM
        self.severity = fields.NO_SEVERITY
        self.stamp = time.time()
        if meta.kind == "c":
            self._spec = PvSpec(name, "c", meta.count)

    def set(self, value, alarm: int | None = None, severity: int | None = None) -> None:
        """Take a new value; its alarm is ``alarm``/``severity`` or what the limits say.
        Monitors get an event only when value or alarm changed."""
        if alarm is None:
            if self.meta.limits and self.meta.kind in "if":
                alarm, severity = fields.check_alarm(self.meta.limits, (value,), self.alarm)
            else:
                alarm, severity = fields.NO_ALARM, fields.NO_SEVERITY
        mask = 0
        if value != self.value:
            mask |= VALUE_MASK
        if (alarm, severity) != (self.alarm, self.severity):
            mask |= cas.DBE_ALARM
        if not mask:
            return
        self.value, self.alarm, self.severity = value, alarm, severity
        self.stamp = time.time()
        if self.interest:
            gdd = self._gdd()
            self.postEvent(mask, gdd)

    def _chars(self) -> np.ndarray:
        data = self.value.encode("utf-8", "replace")[: self.meta.count - 1]
        return np.frombuffer(data + b"\0", dtype=np.uint8)

    def _fill(self, gdd) -> None:
        kind = self.meta.kind
        if kind == "c":
            fill_gdd(self._spec, gdd, self._chars())
        else:
            if gdd.primitiveType() == cas.aitEnumInvalid:
                gdd.setPrimType(_AIT[kind])
            gdd.put(self.value if kind != "s" else str(self.value)[:39])
        gdd.setStatSevr(self.alarm, self.severity)
        gdd.setTimeStamp(cas.epicsTimeStamp.fromPosixTimeStamp(self.stamp))

    def _gdd(self):
        if self.meta.kind == "c":
            gdd = value_gdd(self._spec, self._chars())
            gdd.setStatSevr(self.alarm, self.severity)
            gdd.setTimeStamp(cas.epicsTimeStamp.fromPosixTimeStamp(self.stamp))
            return gdd
        gdd = cas.gdd(16, _AIT[self.meta.kind])
        self._fill(gdd)
        return gdd

    def bestExternalType(self):
        return _AIT[self.meta.kind]

    def maxDimension(self):
        return 1 if self.meta.kind == "c" else 0

    def maxBound(self, dim):
        return self.meta.count if dim == 0 else 0

    @guarded(cas.S_casApp_undefined)
    def getValue(self, value):
        self._fill(value)
        return cas.S_casApp_success

    @guarded(cas.S_casApp_undefined)
    def getEnums(self, enums):
        if self.meta.kind == "e":
            enums.put(list(SHARD_STATES))
        return cas.S_casApp_success

    def _display(self, name: str):
        return self.meta.field_value(name)


class HealthFieldPV(_ReadOnlyPV):
    """``<health PV>.DESC`` and the like: a constant of its Meta."""

    def __init__(self, name: str, meta: Meta, field_name: str, channels: Channels) -> None:
        super().__init__(name, channels)
        self._ait = _FIELDS[field_name]
        base = name.partition(".")[0]
        #: NAME$: the name as a char array, terminator included.
        self._chars = None
        if field_name == "NAME" + fields.LONG_SUFFIX:
            text = base.encode() + b"\0"
            self._chars = PvSpec(name, "c", len(text))
            self._value = np.frombuffer(text, dtype=np.uint8)
        elif field_name == "NAME":
            self._value = base
        elif field_name == "RTYP":
            self._value = _RTYP[meta.kind]
        else:
            self._value = meta.field_value(field_name)

    def bestExternalType(self):
        return self._ait

    def maxDimension(self):
        return 1 if self._chars else 0

    def maxBound(self, dim):
        return self._chars.count if self._chars and dim == 0 else 0

    @guarded(cas.S_casApp_undefined)
    def getValue(self, value):
        if self._chars:
            fill_gdd(self._chars, value, self._value)
        else:
            if value.primitiveType() == cas.aitEnumInvalid:
                value.setPrimType(self._ait)
            value.put(self._value)
        value.setStatSevr(fields.NO_ALARM, fields.NO_SEVERITY)
        value.setTimeStamp(cas.epicsTimeStamp())
        return cas.S_casApp_success


def _limits(high=None, hihi=None, low=None, lolo=None) -> dict:
    out = {}
    for name, sev_name, sev, v in (
        ("HIHI", "HHSV", fields.MAJOR, hihi),
        ("HIGH", "HSV", fields.MINOR, high),
        ("LOW", "LSV", fields.MINOR, low),
        ("LOLO", "LLSV", fields.MAJOR, lolo),
    ):
        if v is not None:
            out[name] = float(v)
            out[sev_name] = sev
    return out


def relay_metas(shards: int, autosave_period: float) -> dict[str, Meta]:
    """Every health PV, by its name after ``<prefix>relay:``."""
    errors_count = ERRORS_KEPT * (ERROR_LINE_MAX + 1)
    metas = {
        "HEARTBEAT": Meta("i", "Counts up once a second"),
        "UPTIME": Meta("s", "Time since the broker started"),
        "STARTTOD": Meta("s", "When the broker started"),
        "VERSION": Meta("s", "carelay version"),
        "PV_CNT": Meta("i", "Real PVs"),
        "PROVISIONAL_CNT": Meta("i", "Provisional PVs"),
        "CA_CLNT_CNT": Meta("i", "CA circuits"),
        "CA_CONN_CNT": Meta("i", "PVs with CA channels"),
        "MEM_USED": Meta("f", "Memory of all relay processes", "byte"),
        "MAX_BYTES_USED": Meta(
            "f",
            "Share of max_bytes in use",
            "%",
            prec=1,
            hopr=100.0,
            limits=_limits(high=MAX_BYTES_HIGH, hihi=MAX_BYTES_HIHI),
        ),
        "CPU_LOAD": Meta("f", "CPU of all relay processes", "%", prec=1, hopr=100.0),
        "FD_FREE": Meta(
            "i",
            "Free file descriptors",
            hopr=1024,
            limits=_limits(low=FD_FREE_LOW, lolo=FD_FREE_LOLO),
        ),
        "BROKER": Meta("i", "Which CA broker this is ([[ca]])"),
        "BROKER_CNT": Meta("i", "CA brokers of the relay"),
        "BROKER_UP_CNT": Meta("i", "CA brokers serving"),
        "PVA_UP": Meta("i", "PVA front-end serving (pva = true)"),
        "LAST_ERROR": Meta("c", "Last refusal or failure", count=ERROR_LINE_MAX + 1),
        "ERRORS": Meta("c", "Last refusals and failures", count=errors_count),
    }
    for what in ("PUT", "CREATE", "REFUSE"):
        desc = {"PUT": "Accepted puts", "CREATE": "Creations", "REFUSE": "Refusals"}[what]
        metas[f"{what}_RATE"] = Meta("f", f"{desc} per second, last 1 s", "Hz", prec=1)
        metas[f"{what}_RATE_10S"] = Meta("f", f"{desc} per second, last 10 s", "Hz", prec=1)
    for k in range(shards):
        metas[f"shard{k}:STATE"] = Meta("e", f"State of shard {k}")
        metas[f"shard{k}:PV_CNT"] = Meta("i", f"PVs on shard {k}")
        metas[f"shard{k}:STORE_BYTES"] = Meta("f", f"Store size of shard {k}", "byte")
        metas[f"shard{k}:FLUSH_AGE"] = Meta(
            "f",
            f"Since shard {k} last saved all",
            "s",
            prec=1,
            limits=_limits(
                high=FLUSH_AGE_HIGH_PERIODS * autosave_period,
                hihi=FLUSH_AGE_HIHI_PERIODS * autosave_period,
            ),
        )
        metas[f"shard{k}:PUT_RATE"] = Meta("f", f"Puts applied by shard {k}", "Hz", prec=1)
        metas[f"shard{k}:RESTART_CNT"] = Meta("i", f"New processes of shard {k} seen")
        metas[f"shard{k}:CLOCK_OFFSET"] = Meta(
            "f",
            f"Shard {k}'s clock ahead of this one",
            "s",
            prec=3,
            limits=_limits(high=CLOCK_OFFSET_HIGH, low=-CLOCK_OFFSET_HIGH),
        )
    return metas


class HealthPVs:
    """The broker's health PVs, by full name, and their update from a snapshot."""

    def __init__(self, prefix: str, shards: int, autosave_period: float) -> None:
        self.base = prefix + HEALTH_PART
        #: How many of them have CA channels.
        self.channels = Channels()
        self.pvs = {
            self.base + part: HealthPV(self.base + part, meta, self.channels)
            for part, meta in relay_metas(shards, autosave_period).items()
        }
        self.field_pvs: dict[str, HealthFieldPV] = {}

    def claims(self, name: str) -> bool:
        if name in self.pvs:
            return True
        base, dot, fld = name.partition(".")
        return bool(dot) and base in self.pvs and fld in _FIELDS

    def attach(self, name: str):
        pv = self.pvs.get(name)
        if pv is None:
            pv = self.field_pvs.get(name)
        if pv is None and self.claims(name):
            base, _, fld = name.partition(".")
            meta = self.pvs[base].meta
            pv = self.field_pvs[name] = HealthFieldPV(name, meta, fld, self.channels)
        if pv is not None:
            pv.attached = True
        return pv

    def attached_count(self) -> int:
        return self.channels.count

    def update(self, snap: dict, errors) -> None:
        """Set every PV from ``snap`` (Health.snapshot) and ``errors`` (its ErrorLog)."""
        b, pvs = self.base, self.pvs
        pvs[b + "HEARTBEAT"].set(snap["heartbeat"])
        pvs[b + "UPTIME"].set(uptime_text(snap["uptime"]))
        pvs[b + "STARTTOD"].set(time.strftime("%m/%d/%Y %H:%M:%S", time.localtime(snap["started"])))
        pvs[b + "VERSION"].set(snap["version"])
        pvs[b + "PV_CNT"].set(snap["pvs"])
        pvs[b + "PROVISIONAL_CNT"].set(snap["provisional"])
        pvs[b + "CA_CLNT_CNT"].set(snap["circuits"])
        pvs[b + "CA_CONN_CNT"].set(snap["channels"])
        for what in ("PUT", "CREATE", "REFUSE"):
            key = what.lower() + "_rate"
            one, ten = snap[key]
            pvs[f"{b}{what}_RATE"].set(round(one, 3))
            pvs[f"{b}{what}_RATE_10S"].set(round(ten, 3))
        pvs[b + "MEM_USED"].set(snap["mem_used"])
        pvs[b + "MAX_BYTES_USED"].set(round(snap["max_bytes_used"], 3))
        pvs[b + "CPU_LOAD"].set(round(snap["cpu_load"], 1))
        pvs[b + "FD_FREE"].set(snap["fd_free"])
        self._brokers(snap["brokers"])
        self._pva(snap.get("pva"))
        pvs[b + "LAST_ERROR"].set(errors.last)
        pvs[b + "ERRORS"].set(errors.text())
        for s in snap["shards"]:
            k = s["index"]
            state = s["state"]
            severity = SHARD_SEVERITY[state]
            alarm = STATE_ALARM if severity else fields.NO_ALARM
            pvs[f"{b}shard{k}:STATE"].set(SHARD_STATES.index(state), alarm, severity)
            pvs[f"{b}shard{k}:PV_CNT"].set(s["pvs"])
            pvs[f"{b}shard{k}:STORE_BYTES"].set(s["store_bytes"])
            pvs[f"{b}shard{k}:FLUSH_AGE"].set(round(s["flush_age"], 1))
            pvs[f"{b}shard{k}:PUT_RATE"].set(round(s["put_rate"], 3))
            pvs[f"{b}shard{k}:RESTART_CNT"].set(s["restarts"])
            pvs[f"{b}shard{k}:CLOCK_OFFSET"].set(round(s["clock_offset"], 3))

    def _brokers(self, brokers: list[dict]) -> None:
        """Which broker this is, how many there are, and how many serve: a MINOR LOW
        alarm while one that can be told from here (see PeerBrokers) does not."""
        if not brokers:
            return
        b, pvs = self.base, self.pvs
        up = sum(1 for x in brokers if x["up"])
        pvs[b + "BROKER"].set(next(x["index"] for x in brokers if x["self"]))
        pvs[b + "BROKER_CNT"].set(len(brokers))
        short = any(x["known"] and not x["up"] for x in brokers)
        alarm = fields.LOW_ALARM if short else fields.NO_ALARM
        pvs[b + "BROKER_UP_CNT"].set(up, alarm, fields.MINOR if short else fields.NO_SEVERITY)

    def _pva(self, pva: dict | None) -> None:
        """1 while the PVA front-end serves; a MAJOR STATE alarm while it does not, where
        that can be told from here.  0 with no alarm: no PVA front-end configured."""
        pv = self.pvs[self.base + "PVA_UP"]
        if pva is None:
            pv.set(0)
        elif pva["up"] or not pva["known"]:
            pv.set(int(pva["up"]))
        else:
            pv.set(0, STATE_ALARM, fields.MAJOR)
