"""PV fields (``NAME.FIELD``): which exist, their types, validation, and alarms.

The one place that knows the field table.  Stored fields are the ones a
client put; configured defaults (``[fields."glob"]`` in the configuration)
fill in the rest; built-in defaults below that.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from carelay.common.naming import MAX_STRING_CHARS, PvSpec

#: EPICS alarm status codes (alarm.h) that the relay raises.
NO_ALARM = 0
HIHI_ALARM = 3
HIGH_ALARM = 4
LOLO_ALARM = 5
LOW_ALARM = 6
#: Severities (menuAlarmSevr).
SEVERITIES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")
#: Alarm statuses (alarm.h) by number, as CA clients see them named, up to the last the
#: relay gives (UDF).
ALARM_STATUSES = (
    "NO_ALARM",
    "READ",
    "WRITE",
    "HIHI",
    "HIGH",
    "LOLO",
    "LOW",
    "STATE",
    "COS",
    "COMM",
    "TIMEOUT",
    "HWLIMIT",
    "CALC",
    "SCAN",
    "LINK",
    "SOFT",
    "BAD_SUB",
    "UDF",
)
NO_SEVERITY, MINOR, MAJOR, INVALID = range(4)
#: How a record is processed (menuScan), by number; a relay PV is Passive: each put
#: processes it.
SCAN_CHOICES = (
    "Passive",
    "Event",
    "I/O Intr",
    "10 second",
    "5 second",
    "2 second",
    "1 second",
    ".5 second",
    ".2 second",
    ".1 second",
)

MAX_DESC = 40
MAX_EGU = 16
MAX_PREC = 17


class FieldError(ValueError):
    """A field name or value that is not accepted; the message says why."""


@dataclass(frozen=True)
class FieldDef:
    """One field: its CA type ('string', 'double', 'short', 'enum', 'long', 'char'), where it
    applies ('numeric', 'any', 'buffer', 'plain': all but buffers) and whether clients may
    write it."""

    name: str
    kind: str
    applies: str
    writable: bool = True


FIELDS: dict[str, FieldDef] = {
    f.name: f
    for f in (
        FieldDef("DESC", "string", "any"),
        FieldDef("EGU", "string", "numeric"),
        FieldDef("PREC", "short", "numeric"),
        FieldDef("HOPR", "double", "numeric"),
        FieldDef("LOPR", "double", "numeric"),
        FieldDef("DRVH", "double", "numeric"),
        FieldDef("DRVL", "double", "numeric"),
        FieldDef("HIHI", "double", "numeric"),
        FieldDef("HIGH", "double", "numeric"),
        FieldDef("LOW", "double", "numeric"),
        FieldDef("LOLO", "double", "numeric"),
        FieldDef("HHSV", "enum", "numeric"),
        FieldDef("HSV", "enum", "numeric"),
        FieldDef("LSV", "enum", "numeric"),
        FieldDef("LLSV", "enum", "numeric"),
        FieldDef("HYST", "double", "numeric"),
        FieldDef("MDEL", "double", "numeric"),
        FieldDef("ADEL", "double", "numeric"),
        FieldDef("NELM", "long", "any", writable=False),
        FieldDef("NORD", "long", "any", writable=False),
        # The alarm the value is in, as an IOC's records show it.
        FieldDef("SEVR", "enum", "any", writable=False),
        FieldDef("STAT", "enum", "any", writable=False),
        FieldDef("RES", "short", "buffer"),
        # What the record is, as an IOC serves them: tools read them (an archiver takes
        # NAME for an alias when it differs, RTYP for its metadata; alarm and display
        # tools show RTYP).
        FieldDef("NAME", "string", "any", writable=False),
        FieldDef("RTYP", "string", "any", writable=False),
        # How it is processed (Passive: by each put), and whether it has had a value yet
        # (1 while provisional), as a record's SCAN and UDF say.
        FieldDef("SCAN", "enum", "any", writable=False),
        FieldDef("UDF", "char", "any", writable=False),
        # A put of any value processes the PV, as a record's PROC does: its value put again
        # (through the drive limits, as an ao record's processing converts it) and stamped
        # now.  A buffer takes its values only from puts, as a compress record from its
        # input: it has none.
        FieldDef("PROC", "char", "plain"),
    )
}

#: ``FIELD$``: a string field read (and written) as a char array, as an IOC serves it,
#: with the whole text: a DBR_STRING carries 39 characters, a name has up to
#: max_name_length, a DESC 40.
LONG_SUFFIX = "$"
#: The fields served with ``$`` too: the string ones.
LONG_FIELDS = frozenset(n for n, f in FIELDS.items() if f.kind == "string")
#: Every field channel a PV may have: each field, and each string field with ``$``.
FIELD_NAMES = (*FIELDS, *(n + LONG_SUFFIX for n in LONG_FIELDS))

#: The fields a put acts through rather than sets: RES empties a buffer, PROC processes
#: a PV; both read 0.
ACTIONS = frozenset({"RES", "PROC"})
#: Fields held as state (the actions aside, the read-only ones are derived, VAL is the
#: value).
STORED = frozenset(n for n, f in FIELDS.items() if f.writable and n not in ACTIONS)

#: The fields whose change posts a DBE_PROPERTY event, as an IOC's ao record marks them
#: (prop(YES)): what DBR_CTRL carries, and the alarm severities; not DESC, HYST, MDEL, ADEL.
PROPERTY_FIELDS = frozenset(
    {"EGU", "PREC", "HOPR", "LOPR", "DRVH", "DRVL", "HIHI", "HIGH", "LOW", "LOLO"}
    | {"HHSV", "HSV", "LSV", "LLSV"}
)

#: The fields whose put processes an ao or longout record (pp(TRUE)): the drive limits,
#: the alarm limits and their severities; not the display fields, HYST, MDEL, ADEL.
PROCESSING = frozenset(
    {"DRVH", "DRVL", "HIHI", "HIGH", "LOW", "LOLO", "HHSV", "HSV", "LSV", "LLSV"}
)

#: The double fields (limits, hysteresis, deadbands) that a longout record holds as whole
#: numbers (DBF_LONG): an ``i`` scalar's, which behaves as one (see ``record_type``).
WHOLE_FIELDS = frozenset(n for n, f in FIELDS.items() if f.kind == "double")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _longout(spec: PvSpec) -> bool:
    return record_type(spec) == "longout"


def whole(field: str, spec: PvSpec) -> bool:
    """Whether ``spec``'s ``field`` holds a whole number: a double field of an ``i``
    scalar, as a longout's."""
    return field in WHOLE_FIELDS and _longout(spec)


def to_whole(value: float) -> int:
    """A double field's value as a longout holds it: cut toward zero, as EPICS converts
    a double put to a DBF_LONG field (3.5 and 3.9 to 3, -3.5 to -3), within 32 bits."""
    if value >= _INT32_MAX:
        return _INT32_MAX
    if value <= _INT32_MIN:
        return _INT32_MIN
    return int(value)


#: Each alarm limit, its severity field, the severity once the limit is set, and its status.
_LIMITS = (
    ("HIHI", "HHSV", MAJOR, HIHI_ALARM),
    ("LOLO", "LLSV", MAJOR, LOLO_ALARM),
    ("HIGH", "HSV", MINOR, HIGH_ALARM),
    ("LOW", "LSV", MINOR, LOW_ALARM),
)


def choices(field: str) -> tuple[str, ...]:
    """The labels of an enum field's values, by number."""
    if field == "STAT":
        return ALARM_STATUSES
    return SCAN_CHOICES if field == "SCAN" else SEVERITIES


def field_def(field: str) -> FieldDef | None:
    """The field that channel ``NAME.field`` serves (``DESC`` for ``DESC$``); None for
    no field."""
    if field.endswith(LONG_SUFFIX):
        field = field[: -len(LONG_SUFFIX)]
        return FIELDS[field] if field in LONG_FIELDS else None
    return FIELDS.get(field)


def applies(field: str, spec: PvSpec) -> bool:
    """Whether ``NAME.field`` exists for a PV of ``spec`` (VAL always does)."""
    if field == "VAL":
        return True
    f = field_def(field)
    if f is None:
        return False
    if f.applies == "numeric":
        return spec.kind in "fi"
    if f.applies == "buffer":
        return spec.is_buffer
    if f.applies == "plain":
        return not spec.is_buffer
    return True


def missing(field: str, spec: PvSpec) -> str | None:
    """Why a PV of ``spec`` has no ``NAME.field`` (None: it has), as a refusal says it."""
    if applies(field, spec):
        return None
    if field_def(field) is None:
        return f"unknown field {field}"
    return f"no such field for its type {field}"


def record_type(spec: PvSpec) -> str:
    """RTYP: the EPICS record type a PV of ``spec`` behaves as.  A scalar takes puts and
    clips them to DRVL..DRVH (ao, longout), a string is a stringout, an array or char
    text a waveform (NELM, NORD), a buffer a compress record in circular mode (RES)."""
    if spec.is_buffer:
        return "compress"
    if spec.kind == "s":
        return "stringout"
    if spec.count > 1 or spec.kind == "c":
        return "waveform"
    return "ao" if spec.kind == "f" else "longout"


def processes(field: str, spec: PvSpec) -> bool:
    """Whether a put to ``field`` processes a PV of ``spec``, as it does an ao or longout
    record (a scalar): its value is put again, through the drive limits, and stamped then
    (see ShardStore.process).  A waveform or compress record has no such fields; the
    relay's arrays and buffers that hold them are not processed by them."""
    return field in PROCESSING and record_type(spec) in ("ao", "longout")


def long_size(field: str, spec: PvSpec) -> int:
    """Elements of the char array ``NAME.field$`` (``field`` a string field): its
    longest text and a terminator, as an IOC sizes it."""
    if field == "NAME":
        return len(spec.name.encode()) + 1
    if field == "DESC":
        return MAX_DESC + 1
    if field == "EGU":
        return MAX_EGU + 1
    return MAX_STRING_CHARS


def split_field(fullname: str) -> tuple[str, str | None]:
    """``("NAME", "EGU")`` for ``NAME.EGU``; ``(fullname, None)`` without a dot."""
    base, dot, field = fullname.partition(".")
    return (base, field) if dot else (fullname, None)


def validate(field: str, value: Any) -> Any:
    """The stored form of ``value`` for ``field``, or FieldError."""
    f = FIELDS.get(field)
    if f is None or field not in STORED:
        raise FieldError(f"{field} is not a writable field")
    if f.kind == "string":
        # A field travels to its shard, and is stored there, as UTF-8 text: other bytes
        # (which PCAS hands over surrogate-escaped) are refused, not changed.
        try:
            if isinstance(value, bytes):
                value = value.split(b"\0", 1)[0].decode("utf-8")
            if not isinstance(value, str):
                raise FieldError(f"{field} takes text")
            size = len(value.encode("utf-8"))
        except UnicodeError:
            raise FieldError(f"{field} takes UTF-8 text") from None
        limit = MAX_DESC if field == "DESC" else MAX_EGU
        if size > limit:
            raise FieldError(f"{field} holds at most {limit} characters")
        return value
    if f.kind == "enum":
        if isinstance(value, str):
            text = value.strip().upper()
            if text in SEVERITIES:
                return SEVERITIES.index(text)
            if text == "MAJOR_ALARM" or text == "MINOR_ALARM" or text == "INVALID_ALARM":
                return SEVERITIES.index(text[: -len("_ALARM")])
            raise FieldError(f"{field} takes one of {', '.join(SEVERITIES)}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not math.isfinite(value))
            or value != int(value)
        ):
            raise FieldError(f"{field} takes one of {', '.join(SEVERITIES)}")
        if not 0 <= int(value) < len(SEVERITIES):
            raise FieldError(f"{field} takes a severity from 0 to {len(SEVERITIES) - 1}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(f"{field} takes a number")
    if f.kind == "short":
        finite = not isinstance(value, float) or math.isfinite(value)
        if not finite or value != int(value) or not 0 <= value <= MAX_PREC:
            raise FieldError(f"{field} takes a whole number from 0 to {MAX_PREC}")
        return int(value)
    try:
        value = float(value)
    except OverflowError:
        raise FieldError(f"{field} takes a number a double holds") from None
    if math.isnan(value):
        raise FieldError(f"{field} takes a number, not NaN")
    return value


def validate_defaults(raw: Any) -> dict[str, dict[str, Any]]:
    """Check the ``[fields."glob"]`` tables of a configuration; FieldError names the problem."""
    if not isinstance(raw, dict):
        raise FieldError("must be a table of glob patterns")
    out: dict[str, dict[str, Any]] = {}
    for glob, table in raw.items():
        if not isinstance(table, dict):
            raise FieldError(f'"{glob}" must be a table of FIELD = value')
        out[glob] = {}
        for field, value in table.items():
            try:
                out[glob][field] = validate(field, value)
            except FieldError as e:
                raise FieldError(f'"{glob}".{field}: {e}') from None
    return out


#: The fields of a PV that has none, shared by all of them (a PV costs no dict for it).
NO_FIELDS: Mapping[str, Any] = MappingProxyType({})


class FieldResolver:
    """Effective fields of a PV: stored ones, then configured defaults, then built-ins."""

    def __init__(self, prefix: str, defaults: Mapping[str, Mapping[str, Any]]) -> None:
        self._prefix = prefix
        self._defaults = defaults
        self._cache: dict[str, dict[str, Any]] = {}

    def configured(self, name: str) -> Mapping[str, Any]:
        """Configured defaults for ``name`` (globs match the part after the prefix; later
        tables win).  Read-only."""
        if not self._defaults:
            return NO_FIELDS
        hit = self._cache.get(name)
        if hit is None:
            rest = name[len(self._prefix) :] if name.startswith(self._prefix) else name
            found: dict[str, Any] = {}
            for glob, table in self._defaults.items():
                if fnmatch.fnmatchcase(rest, glob):
                    found.update(table)
            hit = found or NO_FIELDS
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[name] = hit
        return hit

    def effective(self, spec: PvSpec, stored: Mapping[str, Any]) -> Mapping[str, Any]:
        """Read-only.  Most PVs have no fields at all: they share one empty mapping."""
        configured = self.configured(spec.name)
        if not configured and not stored:
            return NO_FIELDS
        fields = {k: v for k, v in configured.items() if applies(k, spec)}
        fields.update(stored)
        if _longout(spec):
            # A longout's limits are whole numbers: a put or a default of 3.5 acts as 3.
            for k in WHOLE_FIELDS & fields.keys():
                fields[k] = to_whole(fields[k])
        return fields


def get(fields: Mapping[str, Any], field: str) -> Any:
    """A field's value with its built-in default."""
    if field in fields:
        return fields[field]
    for limit, sev, default, _ in _LIMITS:
        if field == sev:
            return default if limit in fields else NO_SEVERITY
    f = FIELDS[field]
    return "" if f.kind == "string" else 0


def check_alarm(fields: Mapping[str, Any], values, last_status: int) -> tuple[int, int]:
    """(status, severity) that the alarm limits give ``values``, as an ai/ao record does,
    with hysteresis: an alarm raised at a limit holds while the value is within HYST of
    it, HYST away included.  NaN is in no alarm."""
    if not fields.keys() & {"HIHI", "HIGH", "LOW", "LOLO"}:
        return NO_ALARM, NO_SEVERITY
    hyst = float(fields.get("HYST", 0.0))
    best = (NO_ALARM, NO_SEVERITY)
    for v in values:
        v = float(v)
        if math.isnan(v):
            continue
        for limit, sev_field, _, status in _LIMITS:
            if limit not in fields:
                continue
            severity = get(fields, sev_field)
            if severity == NO_SEVERITY:
                continue
            bound = float(fields[limit])
            held = last_status == status
            if status in (HIHI_ALARM, HIGH_ALARM):
                hit = v >= bound or (held and v >= bound - hyst)
            else:
                hit = v <= bound or (held and v <= bound + hyst)
            if hit:
                if severity > best[1]:
                    best = (status, severity)
                break
    return best


def clip_to_drive_limits(fields: Mapping[str, Any], values):
    """Values clipped to DRVL..DRVH when DRVH > DRVL (as an ao record does), else as given."""
    if "DRVH" not in fields and "DRVL" not in fields:
        return values
    high, low = float(fields.get("DRVH", 0.0)), float(fields.get("DRVL", 0.0))
    if high <= low:
        return values
    import numpy as np

    return np.clip(values, low, high).astype(values.dtype)
