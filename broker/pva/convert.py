"""What a relay PV looks like over PV Access, and what a PVA put means for it; no p4p.

The normative type of each PV (``nt_code``), the fields of an NTScalar / NTScalarArray
built from the mirror (value, alarm, timeStamp, display, control, valueAlarm), and the
reverse: the value a client put, checked as a CA put is (``put_array``), and the
metadata it changed, as the record fields it stands for (``field_puts``).  Plain Python
and numpy, so it is tested without a PVA server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from carelay.broker.putrules import (
    ConversionError,
    char_elements,
    number_elements,
    string_elements,
    text_numbers,
)
from carelay.common import fields
from carelay.common.naming import PvSpec

#: Alarm statuses by number, as CA clients see them named.
CA_ALARM_NAMES = fields.ALARM_STATUSES
#: alarm.status of normative types: NO_STATUS, DEVICE, DRIVER, RECORD, ..., UNDEFINED.
_PVA_STATUS = {0: 0, 2: 1, 9: 2, 17: 6}
_RECORD_STATUS = 3

#: The NTScalar metadata a PVA put may change, and the record field each one is.
PUT_FIELDS = {
    "display.units": "EGU",
    "display.precision": "PREC",
    "display.limitHigh": "HOPR",
    "display.limitLow": "LOPR",
    "display.description": "DESC",
    "control.limitLow": "DRVL",
    "control.limitHigh": "DRVH",
    "valueAlarm.highAlarmLimit": "HIHI",
    "valueAlarm.highWarningLimit": "HIGH",
    "valueAlarm.lowWarningLimit": "LOW",
    "valueAlarm.lowAlarmLimit": "LOLO",
    "valueAlarm.highAlarmSeverity": "HHSV",
    "valueAlarm.highWarningSeverity": "HSV",
    "valueAlarm.lowWarningSeverity": "LSV",
    "valueAlarm.lowAlarmSeverity": "LLSV",
    "valueAlarm.hysteresis": "HYST",
}
_INT32 = np.iinfo(np.int32)


#: A PVA put that does not fit the PV: the same refusal, and text, as on CA.
PutRefused = ConversionError


def nt_code(spec: PvSpec) -> str:
    """The p4p type code of ``spec``'s value: ``d``/``i`` scalars, ``ad``/``ai`` arrays and
    buffers, ``s`` for text (a string PV, or a char array holding text)."""
    if spec.is_text:
        return "s"
    code = "d" if spec.kind == "f" else "i"
    return f"a{code}" if spec.count > 1 or spec.is_buffer else code


#: The type of a field channel's value by the field's kind, as an IOC's PVA server gives
#: a record's field of that DBF type (DBF_SHORT a short, DBF_UCHAR an unsigned byte); a
#: menu field is an NTEnum.
_FIELD_CODES = {"string": "s", "double": "d", "short": "h", "long": "i", "char": "B"}
#: The code of a menu field's channel.
ENUM = "enum"


def field_code(field: str) -> str:
    """The type code of ``NAME.field``'s channel: ``field:`` and the p4p code of its
    NTScalar, or ENUM."""
    kind = fields.FIELDS[field].kind
    return ENUM if kind == "enum" else f"field:{_FIELD_CODES[kind]}"


def field_value(field: str, value):
    """The ``value`` of ``NAME.field``'s channel for the field's ``value``."""
    kind = fields.FIELDS[field].kind
    if kind == "enum":
        return {"index": int(value), "choices": list(fields.choices(field))}
    if kind == "string":
        return str(value)
    return float(value) if kind == "double" else int(value)


def field_put(field: str, value):
    """What a put to ``NAME.field``'s channel gives the field: the put's ``value``, an
    enum's index."""
    return value["value.index"] if fields.FIELDS[field].kind == "enum" else value["value"]


def numeric(spec: PvSpec) -> bool:
    return not spec.is_text


def value_of(spec: PvSpec, contents: np.ndarray):
    """The ``value`` field for ``contents`` (the mirror's elements)."""
    if spec.kind == "s":
        return bytes(contents[0]).decode("utf-8", "replace") if len(contents) else ""
    if spec.kind == "c":
        return bytes(contents).split(b"\0", 1)[0].decode("utf-8", "replace")
    if nt_code(spec).startswith("a"):
        return np.array(contents, copy=True)
    return contents[0].item() if len(contents) else 0


def alarm_of(status: int, severity: int) -> dict:
    """The ``alarm`` field for a CA (status, severity): the same severity, the CA name of
    the status as its message."""
    name = CA_ALARM_NAMES[status] if 0 <= status < len(CA_ALARM_NAMES) else str(status)
    pva_status = _PVA_STATUS.get(status, _RECORD_STATUS)
    return {"severity": severity, "status": pva_status, "message": "" if not status else name}


def stamp_of(stamp: float) -> dict:
    """The ``timeStamp`` field for a POSIX time (0: none yet)."""
    seconds, fraction = divmod(stamp, 1.0)
    return {"secondsPastEpoch": int(seconds), "nanoseconds": int(fraction * 1e9)}


def _limit(value: Any, integer: bool):
    x = float(value)
    if not integer:
        return x
    if math.isnan(x):
        return 0
    return int(min(max(x, _INT32.min), _INT32.max))


def metadata(spec: PvSpec, eff: Mapping) -> dict:
    """``display``, ``control`` and ``valueAlarm`` from the fields in effect."""
    g = fields.get
    desc = str(g(eff, "DESC") or "")
    if not numeric(spec):
        return {"display": {"description": desc, "units": ""}}
    integer = spec.kind == "i"
    limits = {name: _limit(g(eff, name), integer) for name in fields.FIELDS if _is_limit(name)}
    return {
        "display": {
            "units": str(g(eff, "EGU") or ""),
            "precision": int(g(eff, "PREC") or 0),
            "limitHigh": limits["HOPR"],
            "limitLow": limits["LOPR"],
            "description": desc,
        },
        "control": {"limitLow": limits["DRVL"], "limitHigh": limits["DRVH"]},
        "valueAlarm": {
            "active": bool(eff.keys() & {"HIHI", "HIGH", "LOW", "LOLO"}),
            "highAlarmLimit": limits["HIHI"],
            "highWarningLimit": limits["HIGH"],
            "lowWarningLimit": limits["LOW"],
            "lowAlarmLimit": limits["LOLO"],
            "highAlarmSeverity": int(g(eff, "HHSV") or 0),
            "highWarningSeverity": int(g(eff, "HSV") or 0),
            "lowWarningSeverity": int(g(eff, "LSV") or 0),
            "lowAlarmSeverity": int(g(eff, "LLSV") or 0),
            "hysteresis": float(g(eff, "HYST") or 0.0),
        },
    }


def _is_limit(name: str) -> bool:
    return name in ("HOPR", "LOPR", "DRVH", "DRVL", "HIHI", "HIGH", "LOW", "LOLO")


#: What a PVA put may mark changed besides ``value`` and PUT_FIELDS, and the relay
#: leaves as it is: the alarm and the time stamp, which the relay sets itself (an IOC's
#: PVA server takes neither from a put either).
_SET_BY_THE_RELAY = ("alarm", "timeStamp")


def check_put_paths(changed: set[str]) -> None:
    """PutRefused for a put that marks a field it cannot change (``valueAlarm.active``,
    ``control.minStep``, ``display.form``, a whole structure), or that changes nothing:
    such a put would complete having done nothing of what it asked."""
    fixed = sorted(
        path
        for path in changed
        if path != "value"
        and path not in PUT_FIELDS
        and path.split(".", 1)[0] not in _SET_BY_THE_RELAY
    )
    if fixed:
        raise PutRefused(
            f"cannot put {', '.join(fixed)}: a put changes the value, display.units, "
            "display.precision, display.limitLow/High, display.description, "
            "control.limitLow/High and valueAlarm's limits, severities and hysteresis"
        )
    if "value" not in changed and not changed & PUT_FIELDS.keys():
        raise PutRefused("the put changes nothing: give a value or a field that can be put")


def field_puts(changed: set[str], read) -> list[tuple[str, Any]]:
    """(record field, value) for each metadata field a PVA put changed; ``read(path)``
    reads a field of the put."""
    return [(PUT_FIELDS[path], read(path)) for path in sorted(changed) if path in PUT_FIELDS]


def put_array(spec: PvSpec, value) -> np.ndarray:
    """The elements of a PVA put as an array of the PV's dtype; PutRefused says why not.
    The rules of a CA put (broker/putrules.py), and the counts the shard would refuse."""
    kind = spec.kind
    if kind == "f" and type(value) is float:
        return np.array((value,))  # the common case, a number to a float PV: float64
    if kind == "s":
        return string_elements(spec, _text(value).encode("utf-8", "replace"))
    if kind == "c":
        raw = value if isinstance(value, bytes) else _text(value).encode("utf-8", "replace")
        if not raw and not spec.is_buffer:
            raw = b"\0"  # empty text, as CA sends it: a char array cleared
        return char_elements(spec, raw)
    numbers = np.atleast_1d(np.asarray(value)).ravel()
    if spec.is_buffer and len(numbers) > spec.count:
        # Of a buffer's put, its last count elements stay: those before are not looked at
        # (ten million of them took the loop seconds, every other PVA client waiting).
        numbers = numbers[-spec.count :]
    if numbers.dtype.kind in "USO":
        numbers = np.array(text_numbers(str(t) for t in numbers), dtype=np.float64)
    if numbers.dtype.kind not in "biuf":
        raise PutRefused(f"cannot convert {numbers.dtype} to a number")
    numbers = numbers.astype(np.float64)
    # What the shard would refuse, refused before any part of the put goes (front.py).
    if not len(numbers):
        raise PutRefused("a put needs at least one element")
    if not spec.is_buffer and len(numbers) > spec.count:
        raise PutRefused(f"{len(numbers)} elements for a PV of {spec.count}")
    return number_elements(spec, numbers)


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.ndim == 1:
        return bytes(int(x) & 0xFF for x in value).split(b"\0", 1)[0].decode("utf-8", "replace")
    if isinstance(value, np.ndarray | list | tuple):
        return str(value[0]) if len(value) else ""
    return repr(float(value)) if isinstance(value, float) else str(value)
