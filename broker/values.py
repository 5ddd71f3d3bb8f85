"""Converting between pcaspy's gdd containers and the numpy arrays that travel to shards."""

from __future__ import annotations

import numpy as np
from pcaspy import cas

from carelay.broker.putrules import (
    ConversionError,
    char_elements,
    check_int32,
    number_elements,
    string_elements,
    text_numbers,
)
from carelay.common.naming import MAX_STRING_CHARS, PvSpec

#: pcaspy/PCAS primitive type for each type letter.
AIT_TYPES = {
    "f": cas.aitEnumFloat64,
    "i": cas.aitEnumInt32,
    "c": cas.aitEnumUint8,
    "s": cas.aitEnumString,
}
_TEXT_TYPES = (cas.aitEnumString, cas.aitEnumFixedString)
_CHAR_TYPES = (cas.aitEnumUint8, cas.aitEnumInt8)


def _gdd_function(name: str):
    """gdd method ``name`` as the extension's own function, called without the Python
    layer of pcaspy's generated wrapper (a read of a number makes six such calls); the
    wrapper itself where the extension has no function of that name."""
    try:
        from pcaspy import _cas

        return getattr(_cas, f"gdd_{name}")
    except (ImportError, AttributeError):
        return getattr(cas.gdd, name)


_primitive_type = _gdd_function("primitiveType")
_set_prim_type = _gdd_function("setPrimType")
_is_atomic = _gdd_function("isAtomic")
_put_convert_numeric = _gdd_function("putConvertNumeric")
_set_stat_sevr = _gdd_function("setStatSevr")
_set_time_stamp = _gdd_function("setTimeStamp")


def _text(value: cas.gdd) -> str:
    if value.isScalar():
        return value.getConvertString()
    strings = value.getStringArray(value.getDataSizeElements())
    return strings[0] if strings else ""


def dbr_string(value: cas.gdd) -> str:
    """The text of a DBR_STRING put.  A DBR_STRING is 40 bytes with its terminator: one that
    fills them has none (the client cut longer text), and what PCAS read past its end
    depends on the bytes that follow, so it is refused (ConversionError)."""
    text = _text(value)
    if len(text.encode("utf-8", "surrogateescape")) >= MAX_STRING_CHARS:
        raise ConversionError(
            f"text of {MAX_STRING_CHARS} bytes or more: CA carries at most "
            f"{MAX_STRING_CHARS - 1} characters"
        )
    return text


def _numbers(value: cas.gdd, n: int) -> list[float]:
    prim = value.primitiveType()
    if prim in _TEXT_TYPES:
        return text_numbers([_text(value)] if value.isScalar() else value.getStringArray(n))
    if value.isScalar():
        return [value.getConvertNumeric()]
    if prim in _CHAR_TYPES:
        return [float(x) for x in value.getCharArray(n)]
    return value.getNumericArray(n)


def _chars(value: cas.gdd, n: int) -> bytes:
    prim = value.primitiveType()
    if prim in _TEXT_TYPES:
        return _text(value).encode("utf-8", "surrogateescape")
    if prim in _CHAR_TYPES:
        if value.isScalar():
            return bytes([int(value.getConvertNumeric()) & 0xFF])
        chars = value.getCharArray(n)
        try:
            return bytes(chars)  # one C loop; 0..255 is the usual case
        except ValueError:  # signed chars
            return bytes(x & 0xFF for x in chars)
    nums = _numbers(value, n)
    if any(not (0 <= x <= 255) or x != int(x) for x in nums):
        raise ConversionError("char elements must be whole numbers from 0 to 255")
    return bytes(int(x) for x in nums)


def scalar_number(value: cas.gdd) -> float | None:
    """The number a put of one number carries, or None for any other put (an array, text).
    The commonest put of all, read with as few gdd calls as can be."""
    if value.isScalar() and value.primitiveType() not in _TEXT_TYPES:
        return value.getConvertNumeric()
    return None


def number_array(spec: PvSpec, x: float) -> np.ndarray:
    """One number as a one-element array of the numeric PV's dtype.  Raises ConversionError.
    On every put's short way, so without number_elements' loop."""
    if spec.kind == "i":
        check_int32(x)
        return np.array([x], dtype=np.float64).astype(np.int32)
    return np.array([x], dtype=np.float64)


def gdd_to_array(spec: PvSpec, value: cas.gdd) -> np.ndarray:
    """The elements of a CA put, as an array of the PV's dtype.  Raises ConversionError."""
    kind = spec.kind
    if kind in "fi":
        x = scalar_number(value)
        if x is not None:
            return number_array(spec, x)
    scalar = value.isScalar()
    n = 1 if scalar else value.getDataSizeElements()
    if kind == "s":
        # The bytes the client sent, UTF-8 or not, as an IOC's stringout keeps them (PCAS
        # hands text over surrogate-escaped).
        if value.primitiveType() in _TEXT_TYPES:
            raw = dbr_string(value).encode("utf-8", "surrogateescape")
        elif value.primitiveType() in _CHAR_TYPES and not value.isScalar():
            raw = _chars(value, n).split(b"\0", 1)[0]
        else:
            raw = repr(_numbers(value, n)[0]).encode()
        return string_elements(spec, raw)
    if kind == "c":
        return char_elements(spec, _chars(value, n))
    return number_elements(spec, _numbers(value, n))


#: Bytes of units a DBR_GR/DBR_CTRL value carries, its NUL aside (MAX_UNITS_SIZE 8).
UNITS_BYTES = 7


def ca_units(egu: object) -> str:
    """EGU as DBR_GR/DBR_CTRL carry it: PCAS cuts it to UNITS_BYTES bytes, in the middle
    of a character of UTF-8 if one is there (``°C`` after six bytes read as invalid
    UTF-8); here it is cut before that character."""
    raw = str(egu).encode("utf-8")
    if len(raw) <= UNITS_BYTES:
        return str(egu)
    return raw[:UNITS_BYTES].decode("utf-8", "ignore")


def fill_gdd(spec: PvSpec, gdd: cas.gdd, contents: np.ndarray) -> None:
    """Put ``contents`` into ``gdd`` as the value (never zero elements: CA cannot send them)."""
    if gdd.primitiveType() == cas.aitEnumInvalid:
        gdd.setPrimType(AIT_TYPES[spec.kind])
    if spec.kind == "s":
        raw = bytes(contents[0]) if len(contents) else b""
        try:
            gdd.put(raw.decode("utf-8"))
        except UnicodeDecodeError:
            _put_bytes(gdd, raw)
        return
    if len(contents) == 0:
        contents = np.zeros(1, dtype=spec.dtype)
    if spec.count == 1 and spec.kind != "c":
        put_number(gdd, contents[0].item())
        return
    if contents.dtype == np.uint8 and contents.max() >= 0x80:
        # pcaspy puts bytes as signed chars: read as numbers, 195 would go out as -61
        # (DBR_CHAR is epicsUInt8).  As int16 every byte keeps its value, whatever type
        # a client reads; text in ASCII alone (most) goes as it is.
        contents = contents.astype(np.int16)
    contents = np.ascontiguousarray(contents)
    gdd.setDimension(1)
    gdd.setBound(0, 0, len(contents))
    gdd.put(contents)


def _put_bytes(gdd: cas.gdd, raw: bytes) -> None:
    """Put text that is not UTF-8 into the string ``gdd`` as its bytes: pcaspy takes text
    as UTF-8 alone, but copies the bytes of a fixed string array, and ``putDD`` copies
    its one element into ``gdd`` (at most the 39 bytes a DBR_STRING carries)."""
    fixed = cas.gdd(16, cas.aitEnumFixedString)
    fixed.setDimension(1)
    fixed.setBound(0, 0, 1)
    fixed.putFStringArray([raw[: MAX_STRING_CHARS - 1]])
    gdd.putDD(fixed)


def put_number(gdd: cas.gdd, x: float) -> None:
    """Put one number into ``gdd``, whose primitive type is set: what ``gdd.put`` does for
    a number, with fewer calls into the extension (a read of a scalar is the commonest)."""
    if _is_atomic(gdd):
        gdd.setBound(0, 0, 1)
        gdd.putNumericArray([x])
    else:
        _put_convert_numeric(gdd, x)


def read_number(
    gdd: cas.gdd, ait: int, x: float, alarm: tuple[int, int], stamp: cas.epicsTimeStamp
) -> None:
    """Fill the gdd of a read of one number: ``x`` (as ``ait`` if the client left the type
    to the server), ``alarm`` (status, severity) and ``stamp``."""
    if _primitive_type(gdd) == cas.aitEnumInvalid:
        _set_prim_type(gdd, ait)
    put_number(gdd, x)
    _set_stat_sevr(gdd, *alarm)
    _set_time_stamp(gdd, stamp)


def value_gdd(spec: PvSpec, contents: np.ndarray) -> cas.gdd:
    """A new value gdd (application type "value") holding ``contents``."""
    gdd = cas.gdd(16, AIT_TYPES[spec.kind])  # 16: gddAppType_value
    fill_gdd(spec, gdd, contents)
    return gdd
