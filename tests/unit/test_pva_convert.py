"""The PVA face of a relay PV without a PVA server: types, metadata, puts checked."""

from __future__ import annotations

import numpy as np
import pytest

from carelay.broker.pva import convert
from carelay.broker.pva.inbox import Inbox
from carelay.common.naming import PvSpec


def spec(code: str, count: int = 1) -> PvSpec:
    return PvSpec(f"P:x_{code}{count}", code, count)


@pytest.mark.parametrize(
    ("code", "count", "nt"),
    [
        ("f", 1, "d"),
        ("i", 1, "i"),
        ("f", 3, "ad"),
        ("i", 3, "ai"),
        ("F", 1, "ad"),
        ("I", 4, "ai"),
        ("s", 1, "s"),
        ("c", 20, "s"),
        ("C", 20, "s"),
    ],
)
def test_nt_types(code, count, nt):
    assert convert.nt_code(spec(code, count)) == nt


def test_values_served():
    assert convert.value_of(spec("f"), np.array([2.5])) == 2.5
    assert convert.value_of(spec("s"), np.array([b"hi"], dtype="S40")) == "hi"
    assert convert.value_of(spec("c", 8), np.frombuffer(b"ab\0\0", dtype=np.uint8)) == "ab"
    assert list(convert.value_of(spec("i", 3), np.array([1, 2], dtype=np.int32))) == [1, 2]


def test_alarm_as_ca_names_it():
    assert convert.alarm_of(0, 0) == {"severity": 0, "status": 0, "message": ""}
    assert convert.alarm_of(3, 2)["message"] == "HIHI"
    udf = convert.alarm_of(17, 3)
    assert udf["message"] == "UDF" and udf["severity"] == 3


def test_metadata_from_fields():
    meta = convert.metadata(
        spec("f"), {"EGU": "mm", "PREC": 3, "HOPR": 10.0, "DRVH": 5.0, "HIHI": 8.0, "HHSV": 2}
    )
    assert meta["display"]["units"] == "mm" and meta["display"]["precision"] == 3
    assert meta["display"]["limitHigh"] == 10.0
    assert meta["control"]["limitHigh"] == 5.0
    assert meta["valueAlarm"]["highAlarmLimit"] == 8.0
    assert meta["valueAlarm"]["highAlarmSeverity"] == 2 and meta["valueAlarm"]["active"]
    # An int PV's limits are ints, clamped to int32.
    assert convert.metadata(spec("i"), {"HOPR": 1e20})["display"]["limitHigh"] == 2**31 - 1
    assert set(convert.metadata(spec("s"), {})) == {"display"}


def test_field_puts_name_the_record_fields():
    changed = {"value", "display.units", "valueAlarm.hysteresis", "alarm.severity"}
    read = {"display.units": "V", "valueAlarm.hysteresis": 0.5}.__getitem__
    assert convert.field_puts(changed, read) == [("EGU", "V"), ("HYST", 0.5)]


def test_puts_checked_as_on_ca():
    assert convert.put_array(spec("f"), 1.5).tolist() == [1.5]
    assert convert.put_array(spec("i", 3), np.array([1.0, 2.0])).dtype == np.int32
    assert convert.put_array(spec("f"), "2.5").tolist() == [2.5]
    with pytest.raises(convert.PutRefused, match="cannot convert text 'abc'"):
        convert.put_array(spec("f"), "abc")
    with pytest.raises(convert.PutRefused, match="does not fit a 32-bit integer"):
        convert.put_array(spec("i"), 3e10)
    # What CA carries of a string, and no more: every protocol reads what was put.
    assert convert.put_array(spec("s"), "x" * 39).tolist() == [b"x" * 39]
    with pytest.raises(convert.PutRefused, match="at most 39 bytes"):
        convert.put_array(spec("s"), "x" * 40)
    with pytest.raises(convert.PutRefused, match="4 elements for a PV of 3"):
        convert.put_array(spec("f", 3), [1.0, 2.0, 3.0, 4.0])
    # Appended: the last three stay, and only they are converted.
    assert convert.put_array(spec("F", 3), [1.0, 2.0, 3.0, 4.0]).tolist() == [2.0, 3.0, 4.0]
    with pytest.raises(convert.PutRefused, match="at least one element"):
        convert.put_array(spec("f", 3), np.array([]))
    # Text longer than a char array is refused, as CA refuses it, not cut.
    with pytest.raises(convert.PutRefused, match="6 characters for a PV of 4"):
        convert.put_array(spec("c", 4), "abcdef")
    assert convert.put_array(spec("c", 4), "abcd").tobytes() == b"abcd"
    assert convert.put_array(spec("c", 4), b"abcd\0\0").tobytes() == b"abcd"
    with pytest.raises(convert.PutRefused, match="nothing to append"):
        convert.put_array(spec("C", 4), "")


def test_inbox_runs_calls_in_order_and_survives_errors():
    inbox = Inbox()
    got = []
    inbox.push(got.append, 1)
    inbox.push(lambda: 1 / 0)
    inbox.push(got.append, 2)
    assert inbox.run() == 3
    assert got == [1, 2]
    assert inbox.run() == 0
    inbox.close()


def test_a_buffer_put_longer_than_the_buffer_looks_at_its_last_elements_alone():
    """Ten million elements to an int buffer of 100 took the PVA loop seconds, one number
    at a time, while every other PVA client waited (and the shards, not hearing the front-end,
    dropped it): of a buffer's put, only the last ``count`` elements stay anyway."""
    big = np.arange(2_000_000, dtype=np.float64)
    big[:10] = np.nan  # not among the last 100: not looked at
    got = convert.put_array(spec("I", 100), big)
    assert got.dtype == np.int32 and got.tolist() == list(range(1_999_900, 2_000_000))
    big[-1] = 3e9  # among them: the put is refused, named by that element
    with pytest.raises(convert.PutRefused, match="3000000000.0 does not fit"):
        convert.put_array(spec("I", 100), big)
    texts = np.array(["x"] * 1000 + ["1", "2"])
    assert convert.put_array(spec("F", 2), texts).tolist() == [1.0, 2.0]


def test_the_first_number_that_does_not_fit_an_int_is_named():
    with pytest.raises(convert.PutRefused, match=r"^nan does not fit"):
        convert.put_array(spec("i", 4), np.array([1.0, np.nan, 3e10, 2.0]))
    with pytest.raises(convert.PutRefused, match=r"^-3000000000.0 does not fit"):
        convert.put_array(spec("i", 3), np.array([1.0, -3e9, 3e10]))
    assert convert.put_array(spec("i", 2), np.array([-(2.0**31), 2.0**31 - 1])).tolist() == [
        -(2**31),
        2**31 - 1,
    ]
