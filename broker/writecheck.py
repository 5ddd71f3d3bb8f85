"""What PCAS would make of a CA put before the relay sees it, judged on the raw message.

PCAS converts a put to the PV's native type (aitConvert) before it calls the relay, and
some conversions lose the value without failing: text it reads with ``sscanf`` (``"abc"``
as hex 0xabc, ``"1.5 volts"`` as 1.5) and a double cast to a 32-bit integer (2**31, NaN:
INT_MIN).  The relay sees only the result, so such a put is judged here, on its way into
PCAS (broker/castream.py), by the rule the relay applies to what it sees itself
(broker/putrules.py): text must be a number as a whole (or ``0x`` hex, which PCAS reads
too), and an integer PV takes only numbers that fit.  No pcaspy.
"""

from __future__ import annotations

import math
import re
import struct

#: DBR types (db_access.h) of CA puts and of native channel types.
DBR_STRING, DBR_SHORT, DBR_FLOAT, DBR_ENUM, DBR_CHAR, DBR_LONG, DBR_DOUBLE = range(7)
#: A compound type, which PCAS refuses in a put before it reads a byte of the payload
#: (S_cas_badType): what a refused put's type becomes.
DBR_STS_STRING = 7
#: Bytes of a DBR_STRING element on the wire (MAX_STRING_SIZE), and of the others.
STRING_SIZE = 40
_NUMBERS = {
    DBR_SHORT: struct.Struct(">h"),
    DBR_FLOAT: struct.Struct(">f"),
    DBR_LONG: struct.Struct(">i"),
    DBR_DOUBLE: struct.Struct(">d"),
}
#: The numbers an integer native type holds, and what it is called.
_INT_RANGE = {
    DBR_SHORT: (-(2**15), 2**15 - 1, "a 16-bit integer"),
    DBR_LONG: (-(2**31), 2**31 - 1, "a 32-bit integer"),
    DBR_CHAR: (0, 255, "a char (0 to 255)"),
}
#: Native types whose puts are judged, and the put types judged for each.
CHECKED = {
    DBR_DOUBLE: frozenset({DBR_STRING}),
    DBR_FLOAT: frozenset({DBR_STRING}),
    DBR_LONG: frozenset({DBR_STRING, DBR_FLOAT, DBR_DOUBLE}),
    DBR_SHORT: frozenset({DBR_STRING, DBR_FLOAT, DBR_DOUBLE, DBR_LONG}),
    # A number put to a char (c, C) PV: PCAS wrapped 300 to 44 and -1 to 255.  Text is
    # left to PCAS: a name put to delpv as DBR_STRING is no number.
    DBR_CHAR: frozenset({DBR_SHORT, DBR_FLOAT, DBR_DOUBLE, DBR_LONG}),
}
#: Puts with more payload than this are left to PCAS (a large array of text or doubles
#: to a number PV): judging them would hold the payload.
MAX_CHECKED_BYTES = 16384


def element_size(dtype: int) -> int:
    return STRING_SIZE if dtype == DBR_STRING else _NUMBERS[dtype].size


def judged(native: int, dtype: int, count: int) -> bool:
    """Whether a put of ``count`` elements of ``dtype`` to a channel of type ``native``
    is judged here."""
    puts = CHECKED.get(native)
    return (
        puts is not None and dtype in puts and 0 < count * element_size(dtype) <= MAX_CHECKED_BYTES
    )


def refusal(native: int, dtype: int, count: int, payload: bytes) -> str | None:
    """Why a put of ``count`` elements of ``dtype`` to a channel of type ``native``,
    with ``payload`` (at least the elements), must be refused; None if it may go."""
    size = element_size(dtype)
    if len(payload) < count * size:
        return f"{count} elements in {len(payload)} bytes"
    for k in range(count):
        raw = payload[k * size : (k + 1) * size]
        if dtype == DBR_STRING:
            text = raw.split(b"\0", 1)[0].decode("latin-1")
            x = _text_number(text)
            if x is None:
                return f"cannot convert text {text[:40]!r} to a number"
        else:
            x = _NUMBERS[dtype].unpack(raw)[0]
        why = _range_refusal(native, x)
        if why is not None:
            return why
    return None


#: A number as C's strtod reads it whole (PCAS reads text with it): decimal, ``inf``,
#: ``nan`` or ``0x`` hex.  Not Python's float(), which takes ``1_5`` (strtod: 1).
_DECIMAL = re.compile(
    r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE
)
_HEX = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?\d+)?")
#: What C's isspace() skips around a number.
_SPACE = " \t\n\v\f\r"


def _text_number(text: str) -> float | None:
    t = text.strip(_SPACE)
    try:
        if _HEX.fullmatch(t):
            return float.fromhex(t)
        if _DECIMAL.fullmatch(t):
            return float(t)
    except (ValueError, OverflowError):
        pass
    return None


def _range_refusal(native: int, x: float) -> str | None:
    bounds = _INT_RANGE.get(native)
    if bounds is None:
        return None
    low, high, what = bounds
    # A fraction is cut toward zero, as PCAS and an IOC cut it: 255.9 is a char's 255.
    if not math.isfinite(x) or not low <= math.trunc(x) <= high:
        return f"{x} does not fit {what}"
    return None
