"""Text between CA puts and reads and what a PV holds (carelay.broker.values), with the
gdds of pcaspy and no CA server: a string PV keeps the bytes a client put, UTF-8 or
not, and a read gives them back."""

from __future__ import annotations

import numpy as np
import pytest
from pcaspy import cas

from carelay.broker.putrules import ConversionError
from carelay.broker.values import fill_gdd, gdd_to_array, value_gdd
from carelay.common.naming import PvSpec

S1 = PvSpec("V:text_s1", "s", 1)
C10 = PvSpec("V:text_c10", "c", 10)


def string_put(raw: bytes) -> cas.gdd:
    """The gdd of a DBR_STRING put of ``raw``, as PCAS hands it over: a scalar string
    whose text reads surrogate-escaped where ``raw`` is not UTF-8."""
    src = cas.gdd(16, cas.aitEnumFixedString)
    src.setDimension(1)
    src.setBound(0, 0, 1)
    src.putFStringArray([raw])
    value = cas.gdd(16, cas.aitEnumString)
    value.putDD(src)
    return value


def char_put(raw: bytes) -> cas.gdd:
    """The gdd of a DBR_CHAR array put of ``raw``."""
    value = cas.gdd(16, cas.aitEnumUint8)
    value.setDimension(1)
    value.setBound(0, 0, len(raw))
    value.putCharArray(list(raw))
    return value


def read_bytes(gdd: cas.gdd) -> bytes:
    """The bytes a DBR_STRING read of ``gdd`` carries."""
    assert gdd.isScalar()
    return gdd.getConvertString().encode("utf-8", "surrogateescape")


TEXTS = [b"25\xb0C", b"\xff\xfe", "25 °C".encode(), b"plain", b"x" * 38 + b"\xb0"]


@pytest.mark.parametrize("raw", TEXTS)
def test_a_string_put_keeps_the_bytes_sent(raw):
    assert read_bytes(string_put(raw)) == raw  # what the relay is handed
    assert gdd_to_array(S1, string_put(raw)).tolist() == [raw]
    assert gdd_to_array(S1, char_put(raw + b"\0after")).tolist() == [raw]


@pytest.mark.parametrize("raw", TEXTS)
def test_text_put_to_a_char_pv_keeps_the_bytes_sent(raw):
    if len(raw) <= 10:
        assert bytes(gdd_to_array(C10, string_put(raw))) == raw
        return
    # Longer than the array: refused, as CA refuses more elements than a PV has.
    with pytest.raises(ConversionError, match=f"{len(raw)} characters for a PV of 10"):
        gdd_to_array(C10, string_put(raw))


@pytest.mark.parametrize("raw", TEXTS)
@pytest.mark.parametrize("prim", [cas.aitEnumInvalid, cas.aitEnumString, cas.aitEnumFixedString])
def test_a_string_pv_reads_back_the_bytes_it_holds(raw, prim):
    contents = np.array([raw], dtype=S1.dtype)
    gdd = cas.gdd(16, prim)
    fill_gdd(S1, gdd, contents)
    assert read_bytes(gdd) == raw
    assert read_bytes(value_gdd(S1, contents)) == raw


def test_a_string_pv_reads_at_most_what_a_dbr_string_carries():
    # 40 bytes that are not UTF-8 (a DBR_CHAR put may bring them): the 39 a DBR_STRING
    # carries with its terminator, never what lies past them.
    raw = b"\xb0" * 40
    gdd = value_gdd(S1, np.array([raw], dtype=S1.dtype))
    assert read_bytes(gdd) == raw[:39]
