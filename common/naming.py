"""The naming rule: ``<prefix><name>_<type><count>``.

``type`` is one of ``f`` (float64), ``i`` (int32), ``c`` (uint8 text) and
``s`` (one string of at most 40 characters); upper case ``F I C`` make a
right-appending ring buffer of ``count`` elements.  This module is the one
place that parses names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

#: Bytes of a DBF_STRING (EPICS MAX_STRING_SIZE), terminator included: CA carries 39 characters.
MAX_STRING_CHARS = 40

#: dtype for each type letter (lower case).
DTYPES: dict[str, np.dtype] = {
    "f": np.dtype("<f8"),
    "i": np.dtype("<i4"),
    "c": np.dtype("u1"),
    "s": np.dtype(f"S{MAX_STRING_CHARS}"),
}

_NAME_RE = re.compile(r"(?P<name>[A-Za-z0-9_\-:;]+)_(?P<type>[fics])(?P<count>[0-9]+)", re.I)
_COUNT_RE = re.compile(r"[1-9][0-9]{0,9}")


class InvalidPvName(ValueError):
    """A name that does not follow the rule or asks for more than the limits."""


@dataclass(frozen=True, slots=True)
class PvSpec:
    """What a relay PV name says: its full name, type letter and element count."""

    name: str
    type_code: str
    count: int
    # Derived once: every put reads them.
    #: Lower-case type letter: ``f``, ``i``, ``c`` or ``s``.
    kind: str = field(init=False, repr=False, compare=False)
    is_buffer: bool = field(init=False, repr=False, compare=False)
    dtype: np.dtype = field(init=False, repr=False, compare=False)
    is_text: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = self.type_code.lower()
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "is_buffer", self.type_code.isupper())
        object.__setattr__(self, "dtype", DTYPES[kind])
        object.__setattr__(self, "is_text", kind in "cs")


def parse_pv_name(fullname: str, prefix: str, max_elements: int, max_name_length: int) -> PvSpec:
    """Return the PvSpec of ``fullname`` or raise InvalidPvName saying why."""
    if not fullname.startswith(prefix):
        raise InvalidPvName("does not start with the prefix")
    if len(fullname) > max_name_length:
        raise InvalidPvName(f"longer than {max_name_length} characters")
    rest = fullname[len(prefix) :]
    if not rest.isascii():
        raise InvalidPvName("not ASCII")
    m = _NAME_RE.fullmatch(rest)
    if m is None:
        raise InvalidPvName("does not follow <name>_<type><count> with type one of f i c s F I C")
    type_code = m["type"]
    if type_code == "S":
        raise InvalidPvName("string buffers (S) do not exist; use C for a text buffer")
    if not _COUNT_RE.fullmatch(m["count"]):
        raise InvalidPvName("count must be a whole number from 1, without leading zeros")
    count = int(m["count"])
    if type_code == "s" and count != 1:
        raise InvalidPvName("a string PV (s) has count 1")
    if count > max_elements:
        raise InvalidPvName(f"count {count} is above max_elements {max_elements}")
    return PvSpec(fullname, type_code, count)


_TAIL_RE = re.compile(r"_(?P<type>[fics])(?P<count>[1-9][0-9]{0,9})\Z", re.I)


def split_type(fullname: str) -> tuple[str, str, int] | None:
    """``(base, type_code, count)`` of a name ending in ``_<type><count>``, whatever its
    prefix (``("P:temp", "f", 1)`` for ``P:temp_f1``); None for a name that does not."""
    m = _TAIL_RE.search(fullname)
    if m is None or m["type"] == "S":
        return None
    return fullname[: m.start()], m["type"], int(m["count"])
