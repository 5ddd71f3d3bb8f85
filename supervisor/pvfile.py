"""The export format of ``carelay export`` and ``carelay import``: JSON Lines, one PV a line.

    {"name": "P:temp_f1", "type": "f", "count": 1, "stamp": 1795904681.9,
     "fields": {"EGU": "degC"}, "value": [21.5]}
    {"name": "P:log_C20", "type": "C", "count": 20, "stamp": 1795904682.0,
     "fields": {}, "text": "ok\\n"}

(each PV on one line: wrapped here to fit).

Why JSON Lines: one PV per line makes a diff of two exports a list of the PVs that
changed, ``grep`` finds one, and the standard library reads and writes it.  Every
line is exact: a float is written as its shortest text that reads back to the same
bits (NaN, infinities and NaN payloads as ``"nan"``, ``"inf"``, ``"-inf"``,
``"nan:7ff8000000000001"``), a ``c``/``C``/``s`` value as ``"text"`` when its bytes are
UTF-8 and as ``"hex"`` otherwise, a buffer oldest first, and fields as stored.  The
``type`` and ``count`` repeat what the name says, for whoever reads the file; a line
where they disagree is refused.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from carelay.common.fields import FIELDS, STORED, FieldError, applies, validate
from carelay.common.naming import DTYPES, MAX_STRING_CHARS, PvSpec, split_type

_CANONICAL_NAN = 0x7FF8000000000000
_INT32 = np.iinfo(np.int32)

#: The stamps EPICS time carries, in seconds since 1970: from its epoch (1990-01-01) to
#: the last second its unsigned 32-bit seconds field counts (2126-02-06), this end
#: excluded.  A stamp of 0 is a PV never put.
EPICS_EPOCH = 631152000
EPICS_TIME_END = EPICS_EPOCH + 2**32


class RecordError(ValueError):
    """A line that is not a PV this format can carry; the message says why."""


@dataclass
class PvRecord:
    """One PV of an export: its full name, type letter, count, time of its last put,
    stored fields, and value (a buffer oldest first)."""

    name: str
    type_code: str
    count: int
    stamp: float
    fields: dict[str, Any]
    value: np.ndarray

    @property
    def base(self) -> str:
        """The name without its ``_<type><count>``."""
        return self.name[: -len(f"_{self.type_code}{self.count}")]


class _Beyond:
    """A JSON number literal beyond a double (``1e400``), which ``float()`` would read as
    an infinity: kept as its text, so that each place that takes a number refuses it as
    it refuses a whole number beyond a double.  Export writes real infinities as text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _parse_float(text: str) -> float | _Beyond:
    x = float(text)
    return x if math.isfinite(x) else _Beyond(text)


def _float_out(x: float) -> float | str:
    if math.isfinite(x):
        return x
    if math.isnan(x):
        bits = struct.unpack("<Q", struct.pack("<d", x))[0]
        return "nan" if bits == _CANONICAL_NAN else f"nan:{bits:016x}"
    return "inf" if x > 0 else "-inf"


def _shown(v: Any) -> str:
    """``v`` for a message, cut short (a JSON number may have hundreds of digits)."""
    text = repr(v)
    return text if len(text) <= 24 else text[:20] + "..."


def _float_in(v: Any) -> float:
    if isinstance(v, bool):
        raise RecordError(f"{v!r} is not a number")
    if isinstance(v, _Beyond):
        raise RecordError(f"{_shown(v)} is beyond a double")
    if isinstance(v, int | float):
        try:
            return float(v)
        except OverflowError:  # a JSON integer beyond the largest double
            raise RecordError(f"{_shown(v)} is beyond a double") from None
    if isinstance(v, str):
        if v in ("nan", "inf", "-inf"):
            return float(v)
        if v.startswith("nan:"):
            try:
                bits = int(v[4:], 16)
                x = struct.unpack("<d", struct.pack("<Q", bits))[0]
            except (ValueError, struct.error):
                x = 0.0
            if math.isnan(x):
                return x
    raise RecordError(f"{_shown(v)} is not a number")


def _stamp_in(v: Any) -> float:
    """A stamp the relay can serve as EPICS time (see EPICS_EPOCH), or 0."""
    huge = isinstance(v, _Beyond) or (
        isinstance(v, int) and not isinstance(v, bool) and abs(v) >= EPICS_TIME_END
    )
    x = math.inf if huge else _float_in(v)
    if x == 0 or EPICS_EPOCH <= x < EPICS_TIME_END:  # False for NaN
        return x
    raise RecordError(
        f"{_shown(v)} is not a time EPICS can carry: 0 (never put), or seconds since 1970 "
        f"at least {EPICS_EPOCH} (1990) and below {EPICS_TIME_END} (2126)"
    )


def _text_out(data: bytes) -> tuple[str, str]:
    try:
        return "text", data.decode("utf-8")
    except UnicodeDecodeError:
        return "hex", data.hex()


def encode(name: str, stamp: float, value: np.ndarray, fields: dict[str, Any]) -> str:
    """The export line of a PV (no newline)."""
    parsed = split_type(name)
    if parsed is None:
        raise RecordError(f"{name}: not a relay PV name")
    _, type_code, count = parsed
    out: dict[str, Any] = {
        "name": name,
        "type": type_code,
        "count": count,
        "stamp": _float_out(float(stamp)),
        "fields": {
            k: _float_out(v) if isinstance(v, float) else v for k, v in sorted(fields.items())
        },
    }
    kind = type_code.lower()
    if kind == "s":
        key, text = _text_out(bytes(value.reshape(-1)[0]) if value.size else b"")
        out[key] = text
    elif kind == "c":
        key, text = _text_out(np.ascontiguousarray(value, dtype=np.uint8).tobytes())
        out[key] = text
    elif kind == "f":
        out["value"] = [_float_out(float(x)) for x in value.reshape(-1)]
    else:
        out["value"] = [int(x) for x in value.reshape(-1)]
    return json.dumps(out, ensure_ascii=False, allow_nan=False)


def decode(line: str) -> PvRecord:
    """The PV of one export line, checked; RecordError says what does not fit."""
    try:
        raw = json.loads(line, parse_float=_parse_float)
    except ValueError as e:
        raise RecordError(f"not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise RecordError("not a JSON object")
    name = raw.get("name")
    if not isinstance(name, str):
        raise RecordError("no name")
    parsed = split_type(name)
    if parsed is None:
        raise RecordError(f"{name}: not a relay PV name (<prefix><name>_<type><count>)")
    _, type_code, count = parsed
    if raw.get("type") != type_code or raw.get("count") != count:
        raise RecordError(
            f"{name}: conflicting type: the line says {raw.get('type')}{raw.get('count')}, "
            f"the name says {type_code}{count}"
        )
    try:
        stamp = _stamp_in(raw.get("stamp", 0.0))
    except RecordError as e:
        raise RecordError(f"{name}: stamp: {e}") from None
    fields = _fields_in(PvSpec(name, type_code, count), raw.get("fields", {}))
    value = _value_in(name, type_code, count, raw)
    return PvRecord(name, type_code, count, stamp, fields, value)


def _fields_in(spec: PvSpec, raw: Any) -> dict[str, Any]:
    """The fields of a line, as the relay would store them.  A field the PV's type does
    not have (EGU of a ``c`` PV) is refused here, as the relay refuses a put to it: a
    running relay would refuse it only after the value had made the PV, and a stopped
    store would keep a field no client can read."""
    name = spec.name
    if not isinstance(raw, dict):
        raise RecordError(f"{name}: fields are not a map")
    out = {}
    for field, v in raw.items():
        if field not in STORED:
            raise RecordError(f"{name}: {field} is not a stored field")
        if not applies(field, spec):
            article = "an" if spec.type_code in "fFiIsS" else "a"
            raise RecordError(f"{name}.{field}: {article} {spec.type_code} PV has no {field} field")
        try:
            if isinstance(v, _Beyond) or (FIELDS[field].kind == "double" and isinstance(v, str)):
                v = _float_in(v)
            out[field] = validate(field, v)
        except (FieldError, RecordError) as e:
            raise RecordError(f"{name}.{field}: {e}") from None
    return out


def _text_in(name: str, raw: dict) -> bytes:
    if "text" in raw and isinstance(raw["text"], str):
        return raw["text"].encode("utf-8")
    if "hex" in raw and isinstance(raw["hex"], str):
        try:
            return bytes.fromhex(raw["hex"])
        except ValueError:
            raise RecordError(f"{name}: hex is not hexadecimal") from None
    raise RecordError(f'{name}: a text PV needs "text" or "hex"')


def _value_in(name: str, type_code: str, count: int, raw: dict) -> np.ndarray:
    kind = type_code.lower()
    buffer = type_code.isupper()
    if kind == "s":
        data = _text_in(name, raw)
        if len(data) >= MAX_STRING_CHARS or b"\0" in data:
            raise RecordError(
                f"{name}: a string holds at most {MAX_STRING_CHARS - 1} bytes and no NUL"
            )
        return np.array([data], dtype=DTYPES["s"])
    if kind == "c":
        value = np.frombuffer(_text_in(name, raw), dtype=DTYPES["c"]).copy()
    else:
        items = raw.get("value")
        if not isinstance(items, list):
            raise RecordError(f"{name}: value is not a list")
        if kind == "f":
            try:
                value = np.array([_float_in(v) for v in items], dtype=DTYPES["f"])
            except RecordError as e:
                raise RecordError(f"{name}: {e}") from None
        else:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                raise RecordError(f"{name}: an i PV holds whole numbers")
            if any(not _INT32.min <= v <= _INT32.max for v in items):
                raise RecordError(f"{name}: a value is beyond 32 bits")
            value = np.array(items, dtype=DTYPES["i"])
    if value.size > count or (value.size == 0 and not buffer):
        raise RecordError(f"{name}: {value.size} elements for a PV of {count}")
    return value
