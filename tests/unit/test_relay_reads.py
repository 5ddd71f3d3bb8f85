"""What a CA read of a relay PV gets (RelayPV.getValue), without a CA server: the value,
its stamp and its alarm, by the short way for a plain number and the long way for the
rest, and the EPICS stamp made once per stamp."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pcaspy import cas

from carelay.broker.pvs import RelayPV
from carelay.common.naming import parse_pv_name
from tests.unit.test_post_cap import PREFIX, T0, _Broker, _stamp


def _pv(type_count: str) -> RelayPV:
    return RelayPV(_Broker(), parse_pv_name(f"{PREFIX}r_{type_count}", PREFIX, 1000, 128), 0)


def _read(pv: RelayPV, prim=cas.aitEnumInvalid) -> cas.gdd:
    gdd = cas.gdd(16, prim)
    assert pv.getValue(gdd) == cas.S_casApp_success
    return gdd


@pytest.mark.parametrize(("type_count", "value"), [("f1", 2.5), ("i1", -7)])
def test_a_plain_number_reads_its_value_stamp_and_no_alarm(type_count, value):
    pv = _pv(type_count)
    pv.apply(np.array([value], dtype=pv.spec.dtype), T0 + 0.25, False, owned=True)
    assert pv.plain
    for prim in (cas.aitEnumInvalid, cas.aitEnumFloat64):
        gdd = _read(pv, prim)
        assert gdd.getConvertNumeric() == value
        assert _stamp(gdd) == pytest.approx(T0 + 0.25, abs=1e-6)
        assert list(gdd.getStatSevr()) == [0, 0]
    # A new value brings its own stamp.
    pv.apply(np.array([value * 2], dtype=pv.spec.dtype), T0 + 1.5, False, owned=True)
    gdd = _read(pv)
    assert gdd.getConvertNumeric() == value * 2
    assert _stamp(gdd) == pytest.approx(T0 + 1.5, abs=1e-6)


def test_a_plain_number_fills_an_array_gdd_too():
    """A client may ask for an array of one element."""
    pv = _pv("f1")
    pv.apply(np.array([2.5]), T0, False, owned=True)
    gdd = cas.gdd(16, cas.aitEnumFloat64, 1)
    gdd.setBound(0, 0, 1)
    assert pv.getValue(gdd) == cas.S_casApp_success
    assert list(gdd.getNumericArray(1)) == [2.5]


def test_a_provisional_pv_reads_zero_undefined_stamped_now():
    pv = _pv("f1")
    before = time.time()
    gdd = _read(pv)
    assert gdd.getConvertNumeric() == 0.0
    assert list(gdd.getStatSevr()) == [17, 3]  # UDF_ALARM, INVALID
    assert before - 1 <= _stamp(gdd) <= time.time() + 1


def test_a_number_with_alarm_limits_reads_its_alarm():
    pv = _pv("f1")
    pv.apply(np.array([1.0]), T0, False, owned=True)
    pv.field_changed("HIGH", 5.0)
    pv.apply(np.array([6.0]), T0 + 1, False, owned=True)
    assert not pv.plain
    gdd = _read(pv)
    assert gdd.getConvertNumeric() == 6.0
    assert list(gdd.getStatSevr()) == [4, 1]  # HIGH, MINOR


def test_an_array_and_a_string_read_the_long_way():
    arr = _pv("f3")
    arr.apply(np.array([1.0, 2.0]), T0, False, owned=True)
    gdd = _read(arr)
    assert gdd.getDataSizeElements() == 2
    text = _pv("s1")
    text.apply(np.array([b"hello"], dtype=text.spec.dtype), T0, False, owned=True)
    assert _read(text).getConvertString() == "hello"
