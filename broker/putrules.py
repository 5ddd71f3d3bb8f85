"""The rules a put's elements follow to fit a PV, the same for every front door.

Each front-end first takes a put's value out of its protocol's container (a pcaspy gdd in
broker/values.py, a p4p Value in broker/pva/convert.py) as text, bytes or numbers; what
fits the PV, and why not, is decided here once.  No pcaspy, no p4p.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from carelay.common.naming import MAX_STRING_CHARS, PvSpec

_INT32 = np.iinfo(np.int32)


class ConversionError(ValueError):
    """A value that does not fit the PV (text to a number, out of range, ...); its text is
    what the client is told."""


def string_elements(spec: PvSpec, raw: bytes) -> np.ndarray:
    """A string PV's one element, from the put's text as bytes: at most what CA carries
    (a DBF_STRING's 40 bytes, its terminator included), so that every protocol reads what
    was put."""
    if len(raw) >= MAX_STRING_CHARS:
        raise ConversionError(
            f"a string PV holds at most {MAX_STRING_CHARS - 1} bytes: CA carries no more"
        )
    return np.array([raw], dtype=spec.dtype)


def char_elements(spec: PvSpec, raw: bytes) -> np.ndarray:
    """A char PV's elements: text appended to a C buffer goes in without its terminator;
    text longer than a char array is refused, as CA refuses more elements than a PV has
    (its terminators alone are cut to the length)."""
    if spec.is_buffer:
        raw = raw.rstrip(b"\0")
        if not raw:
            raise ConversionError("nothing to append")
    elif len(raw) > spec.count:
        text = raw.rstrip(b"\0")
        if len(text) > spec.count:
            raise ConversionError(f"{len(text)} characters for a PV of {spec.count}")
        raw = raw[: spec.count]
    return np.frombuffer(raw, dtype=np.uint8).copy()


def text_numbers(texts: Iterable[str]) -> list[float]:
    """The numbers that texts put to a number PV say."""
    out = []
    for t in texts:
        try:
            out.append(float(t.strip()))
        except ValueError:
            raise ConversionError(f"cannot convert text {t[:40]!r} to a number") from None
    return out


def check_int32(x: float) -> None:
    if math.isnan(x) or not (_INT32.min <= x <= _INT32.max):
        raise ConversionError(f"{x} does not fit a 32-bit integer")


def number_elements(spec: PvSpec, numbers) -> np.ndarray:
    """A number PV's elements, of its dtype: an int PV takes only numbers that fit (the
    first that does not is named)."""
    values = np.asarray(numbers, dtype=np.float64)
    if spec.kind == "i":
        bad = np.isnan(values) | (values < _INT32.min) | (values > _INT32.max)
        if bad.any():
            check_int32(float(values[bad.argmax()]))
        return values.astype(np.int32)
    return values
