"""The export format: every line reads back to exactly the PV it was written from."""

from __future__ import annotations

import json
import logging
import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from carelay.common.progress import Progress
from carelay.supervisor.pvfile import RecordError, decode, encode


def round_trip(name, value, fields=None, stamp=1795904681.912762):
    line = encode(name, stamp, value, fields or {})
    assert "\n" not in line
    record = decode(line)
    assert record.name == name and record.stamp == stamp
    assert record.fields == (fields or {})
    return record.value


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=8))
def test_floats_keep_their_bits(xs):
    value = np.array(xs, dtype="<f8")
    back = round_trip("P:x_f8", value)
    assert back.dtype == value.dtype and back.tobytes() == value.tobytes()


def test_nan_payloads_and_negative_zero():
    bits = [0x7FF8000000000001, 0xFFF8000000000000, 0x7FF8000000000000]
    value = np.array([struct.unpack("<d", struct.pack("<Q", b))[0] for b in bits] + [-0.0])
    line = encode("P:x_f4", 0.0, value, {})
    assert json.loads(line)["value"] == [
        "nan:7ff8000000000001",
        "nan:fff8000000000000",
        "nan",
        -0.0,
    ]
    assert decode(line).value.tobytes() == value.tobytes()


@given(st.binary(max_size=64))
def test_char_arrays_keep_any_bytes(data):
    value = np.frombuffer(data, dtype=np.uint8)
    back = round_trip("P:t_C64", value)
    assert back.dtype == np.uint8 and back.tobytes() == data


def test_text_is_readable_and_other_bytes_are_hex():
    assert (
        json.loads(encode("P:t_c9", 0.0, np.frombuffer("é ok".encode(), np.uint8), {}))["text"]
        == "é ok"
    )
    assert json.loads(encode("P:t_c9", 0.0, np.frombuffer(b"\xff\x00", np.uint8), {}))["hex"] == (
        "ff00"
    )


@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=8))
def test_ints_and_buffers_oldest_first(xs):
    value = np.array(xs, dtype="<i4")
    assert round_trip("P:n_I8", value).tolist() == xs
    assert round_trip("P:n_i8", value).tolist() == xs


def test_strings_and_fields():
    back = round_trip("P:s_s1", np.array([b"hello \xff"], dtype="S40"), {"DESC": "a string"})
    assert bytes(back[0]) == b"hello \xff"
    fields = {"EGU": "degC", "PREC": 2, "HIHI": math.inf, "LOLO": -1.5, "HHSV": 2}
    assert round_trip("P:temp_f1", np.array([21.5]), fields).tolist() == [21.5]


def test_an_empty_buffer_is_a_pv():
    assert round_trip("P:log_F5", np.zeros(0)).size == 0


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"name": "P:x_f1", "type": "i", "count": 1, "value": [1]}', "conflicting type"),
        ('{"name": "P:x_f1", "type": "f", "count": 2, "value": [1]}', "conflicting type"),
        ('{"name": "P:x_f2", "type": "f", "count": 2, "value": [1, 2, 3]}', "3 elements"),
        ('{"name": "P:x_f2", "type": "f", "count": 2, "value": []}', "0 elements"),
        ('{"name": "P:x_i1", "type": "i", "count": 1, "value": [1.5]}', "whole numbers"),
        ('{"name": "P:x_i1", "type": "i", "count": 1, "value": [2147483648]}', "32 bits"),
        ('{"name": "P:x_f1", "type": "f", "count": 1, "value": ["one"]}', "not a number"),
        ('{"name": "P:x_c4", "type": "c", "count": 4, "text": "too long"}', "8 elements"),
        ('{"name": "P:x_c4", "type": "c", "count": 4, "hex": "zz"}', "hexadecimal"),
        ('{"name": "P:x_s1", "type": "s", "count": 1, "text": "' + "x" * 40 + '"}', "string"),
        (
            '{"name": "P:x_f1", "type": "f", "count": 1, "value": [1], "fields": {"PREC": -1}}',
            "PREC",
        ),
        (
            '{"name": "P:x_f1", "type": "f", "count": 1, "value": [1], "fields": {"NORD": 1}}',
            "NORD",
        ),
        ('{"name": "P:nope", "type": "f", "count": 1, "value": [1]}', "not a relay PV name"),
        ("[1, 2]", "not a JSON object"),
        ("{not json", "not JSON"),
    ],
)
def test_lines_that_do_not_fit_are_refused(line, why):
    with pytest.raises(RecordError, match=why):
        decode(line)


def _line(stamp="1795904681.5", value="[1.5]", fields="{}") -> str:
    return (
        f'{{"name": "P:x_f1", "type": "f", "count": 1, "stamp": {stamp}, '
        f'"fields": {fields}, "value": {value}}}'
    )


@pytest.mark.parametrize(
    ("stamp", "why"),
    [
        ('"nan"', "stamp: 'nan' is not a time"),
        ('"nan:7ff8000000000001"', "is not a time"),
        ('"inf"', "stamp: 'inf' is not a time"),
        ('"-inf"', "is not a time"),
        ("1e300", "stamp: 1e\\+300 is not a time"),
        ("1" + "0" * 400, "is not a time"),
        ("-5", "is not a time"),
        ("1.0", "is not a time"),
        ("631151999.999", "is not a time"),
        ("4926119296", "is not a time"),
        ('"1795904681"', "is not a number"),
        ("true", "is not a number"),
    ],
)
def test_a_stamp_epics_time_cannot_carry_is_refused(stamp, why):
    with pytest.raises(RecordError, match=f"^P:x_f1: {why}" if why[0] == "s" else why):
        decode(_line(stamp=stamp))


@pytest.mark.parametrize(
    "stamp", ["0", "0.0", "631152000", "631152000.5", "1795904681.912762", "4926119295.999"]
)
def test_stamps_from_the_epics_epoch_to_its_last_second_are_taken(stamp):
    assert decode(_line(stamp=stamp)).stamp == float(stamp)


def test_no_stamp_is_never():
    assert decode('{"name": "P:x_f1", "type": "f", "count": 1, "value": [1]}').stamp == 0.0


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (_line(value="[" + "1" * 400 + "]"), "^P:x_f1: 1111111111.* is beyond a double$"),
        (_line(value="[2.5, -" + "9" * 400 + "]"), "is beyond a double"),
        (_line(fields='{"HIHI": ' + "1" * 400 + "}"), "^P:x_f1.HIHI: .*a double holds"),
        # A float literal beyond a double reads as inf in Python's json: refused as the
        # whole number is (export writes a real infinity as "inf").
        (_line(value="[1e400]"), "^P:x_f1: 1e400 is beyond a double$"),
        (_line(value="[2.5, -1.5e400]"), "^P:x_f1: -1.5e400 is beyond a double$"),
        (_line(fields='{"HIHI": 1e400}'), "^P:x_f1.HIHI: 1e400 is beyond a double$"),
        (_line(fields='{"EGU": 1e400}'), "^P:x_f1.EGU: 1e400 is beyond a double$"),
        (_line(stamp="1e400"), "^P:x_f1: stamp: 1e400 is not a time"),
    ],
)
def test_a_number_beyond_a_double_is_refused(line, why):
    with pytest.raises(RecordError, match=why):
        decode(line)


def test_infinities_written_as_text_and_large_literals_are_taken():
    line = '{"name": "P:x_f3", "type": "f", "count": 3, "value": ["inf", "-inf", 1e308]}'
    assert decode(line).value.tolist() == [math.inf, -math.inf, 1e308]
    assert decode(_line(fields='{"HIHI": "inf"}')).fields == {"HIHI": math.inf}


@pytest.mark.parametrize(
    ("name", "fields", "why"),
    [
        ("x_c8", '{"EGU": "V"}', "^P:x_c8.EGU: a c PV has no EGU field$"),
        ("x_C8", '{"HIHI": 3}', "^P:x_C8.HIHI: a C PV has no HIHI field$"),
        ("x_s1", '{"DESC": "ok", "PREC": 2}', "^P:x_s1.PREC: an s PV has no PREC field$"),
    ],
)
def test_a_field_its_type_does_not_have_is_refused(name, fields, why):
    # The relay serves no such field: a running one refuses the put, a stopped store
    # must not get it either.
    text = '"text": "hi"' if name[2] in "cCs" else '"value": [1]'
    line = (
        f'{{"name": "P:{name}", "type": "{name[2]}", "count": {name[3:]}, '
        f'"fields": {fields}, {text}}}'
    )
    with pytest.raises(RecordError, match=why):
        decode(line)


def test_the_fields_of_each_type_are_taken():
    fields = '{"DESC": "d", "EGU": "V", "PREC": 2, "HIHI": 3, "HHSV": "MAJOR"}'
    for name in ("x_f1", "x_i1", "x_F4", "x_I4"):
        text = f'{{"name": "P:{name}", "type": "{name[2]}", "count": {name[3:]}, '
        record = decode(text + f'"fields": {fields}, "value": [1]}}')
        assert record.fields == {"DESC": "d", "EGU": "V", "PREC": 2, "HIHI": 3.0, "HHSV": 2}
    for name in ("x_c4", "x_C4", "x_s1"):
        text = f'{{"name": "P:{name}", "type": "{name[2]}", "count": {name[3:]}, '
        assert decode(text + '"fields": {"DESC": "d"}, "text": "hi"}').fields == {"DESC": "d"}


def test_large_whole_numbers_a_double_holds_are_taken():
    assert decode(_line(value=str([2**60]))).value.tolist() == [float(2**60)]
    big = str(int(1.7e308))
    assert decode(_line(value=f"[{big}]")).value.tolist() == [float(big)]


def test_progress_says_counts_every_interval(caplog):
    now = [0.0]
    progress = Progress(logging.getLogger("test"), "import", 10, interval=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        for _ in range(10):
            now[0] += 1.0
            progress.step()
    assert [r.getMessage() for r in caplog.records] == [
        "import: 5 of 10 PVs",
        "import: 10 of 10 PVs",
    ]
