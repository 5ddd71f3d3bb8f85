"""The field table's pure functions (carelay.common.fields): what a field put stores or
refuses, and the alarm status the limits give, with hysteresis, as an ai/ao record."""

from __future__ import annotations

import math

import pytest

from carelay.common.fields import (
    ACTIONS,
    FIELD_NAMES,
    HIGH_ALARM,
    HIHI_ALARM,
    LOLO_ALARM,
    LOW_ALARM,
    MAJOR,
    MINOR,
    NO_ALARM,
    NO_SEVERITY,
    STORED,
    FieldError,
    FieldResolver,
    applies,
    check_alarm,
    choices,
    long_size,
    record_type,
    validate,
)
from carelay.common.naming import PvSpec

OK = (NO_ALARM, NO_SEVERITY)


# -- what a PV serves ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, count, rtyp",
    [
        ("f", 1, "ao"),
        ("i", 1, "longout"),
        ("s", 1, "stringout"),
        ("c", 1, "waveform"),
        ("c", 40, "waveform"),
        ("f", 2, "waveform"),
        ("i", 9, "waveform"),
        ("F", 1, "compress"),
        ("I", 5, "compress"),
        ("C", 8, "compress"),
    ],
)
def test_record_type_is_the_record_a_pv_behaves_as(code, count, rtyp):
    assert record_type(PvSpec(f"P:x_{code}{count}", code, count)) == rtyp


@pytest.mark.parametrize(
    "put, held",
    [(3.5, 3), (3.9, 3), (-3.5, -3), (-0.5, 0), (7.0, 7), (1e20, 2**31 - 1), (-math.inf, -(2**31))],
)
def test_a_longout_holds_its_limits_deadbands_and_hysteresis_as_whole_numbers(put, held):
    resolver = FieldResolver("P:", {"*": {"HIHI": put}})
    stored = {"HOPR": put, "DRVH": put, "HYST": put, "MDEL": put, "PREC": 2, "EGU": "V"}
    eff = resolver.effective(PvSpec("P:x_i1", "i", 1), stored)
    for field in ("HIHI", "HOPR", "DRVH", "HYST", "MDEL"):
        assert eff[field] == held and type(eff[field]) is int, field
    assert (eff["PREC"], eff["EGU"]) == (2, "V")


@pytest.mark.parametrize("code, count", [("f", 1), ("i", 4), ("I", 4), ("F", 1)])
def test_other_pvs_keep_their_double_fields_as_put(code, count):
    resolver = FieldResolver("P:", {"*": {"HIHI": 3.5}})
    eff = resolver.effective(PvSpec(f"P:x_{code}{count}", code, count), {"HOPR": 3.9})
    assert (eff["HIHI"], eff["HOPR"]) == (3.5, 3.9)


def test_each_enum_field_has_its_labels():
    assert choices("SCAN")[:3] == ("Passive", "Event", "I/O Intr") and len(choices("SCAN")) == 10
    assert choices("STAT")[17] == "UDF"
    assert choices("HHSV") == choices("SEVR") == ("NO_ALARM", "MINOR", "MAJOR", "INVALID")


def test_proc_is_an_action_of_every_pv_but_a_buffer():
    for spec in (PvSpec("P:a_f1", "f", 1), PvSpec("P:w_i4", "i", 4), PvSpec("P:t_c9", "c", 9)):
        assert applies("PROC", spec), spec.name
    assert not applies("PROC", PvSpec("P:b_F4", "F", 4))
    assert "PROC" not in STORED and "PROC" in ACTIONS
    with pytest.raises(FieldError):
        validate("PROC", 1)  # not held: it acts


def test_a_string_field_is_served_as_chars_with_a_dollar_and_no_other_field_is():
    num, text = PvSpec("P:a_f1", "f", 1), PvSpec("P:t_s1", "s", 1)
    for field in ("NAME$", "RTYP$", "DESC$", "EGU$"):
        assert applies(field, num), field
        assert field in FIELD_NAMES
    for field in ("PREC$", "HIHI$", "NELM$", "NAME$$", "$", "VAL$"):
        assert not applies(field, num), field
        assert field not in FIELD_NAMES
    assert applies("NAME$", text) and applies("DESC$", text) and not applies("EGU$", text)


def test_a_char_field_holds_the_longest_text_and_its_terminator():
    spec = PvSpec("P:a_long_name_f1", "f", 1)
    assert long_size("NAME", spec) == len("P:a_long_name_f1") + 1
    assert long_size("DESC", spec) == 41
    assert long_size("EGU", spec) == 17
    assert long_size("RTYP", spec) == 40


# -- text fields ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["DESC", "EGU"])
@pytest.mark.parametrize(
    "value",
    [
        "\udcb0C",  # the text PCAS hands over for the bytes b"\xb0C" of a DBR_STRING put
        b"\xb0C",
        b"25\xb0C\0rest",
    ],
    ids=["surrogate-escaped", "bytes", "bytes-with-terminator"],
)
def test_text_that_is_not_utf8_is_refused_with_a_field_error(field, value):
    # A field travels to its shard, and is stored there, as UTF-8 text.
    with pytest.raises(FieldError, match=f"{field} takes UTF-8 text"):
        validate(field, value)


@pytest.mark.parametrize(
    ("value", "stored"),
    [("degC", "degC"), ("°C", "°C"), (b"\xc2\xb0C\0junk", "°C"), ("", "")],
)
def test_utf8_text_is_stored(value, stored):
    assert validate("EGU", value) == stored


def test_text_longer_than_the_field_is_refused_by_its_bytes():
    assert validate("EGU", "°" * 8) == "°" * 8  # 16 bytes
    with pytest.raises(FieldError, match="EGU holds at most 16"):
        validate("EGU", "°" * 8 + "C")


# -- alarm limits and hysteresis ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "value", "held", "expected"),
    [
        # An alarm raised at a limit holds while the value is within HYST of it, the
        # bound included, as aiRecord's checkAlarms: val >= limit - HYST.
        ({"HIHI": 10.0, "HIGH": 5.0, "HYST": 2.0}, 8.0, HIHI_ALARM, (HIHI_ALARM, MAJOR)),
        ({"HIHI": 10.0, "HIGH": 5.0, "HYST": 2.0}, 7.9, HIHI_ALARM, (HIGH_ALARM, MINOR)),
        ({"HIGH": 5.0, "HYST": 1.0}, 4.0, HIGH_ALARM, (HIGH_ALARM, MINOR)),
        ({"HIGH": 5.0, "HYST": 1.0}, 3.9, HIGH_ALARM, OK),
        # ...and for a low limit, val <= limit + HYST.
        ({"LOLO": -10.0, "LOW": -5.0, "HYST": 2.0}, -8.0, LOLO_ALARM, (LOLO_ALARM, MAJOR)),
        ({"LOLO": -10.0, "LOW": -5.0, "HYST": 2.0}, -7.9, LOLO_ALARM, (LOW_ALARM, MINOR)),
        ({"LOW": -5.0, "HYST": 1.0}, -4.0, LOW_ALARM, (LOW_ALARM, MINOR)),
        ({"LOW": -5.0, "HYST": 1.0}, -3.9, LOW_ALARM, OK),
        # Not held: only the limit itself raises the alarm.
        ({"HIHI": 10.0, "HIGH": 5.0, "HYST": 2.0}, 8.0, HIGH_ALARM, (HIGH_ALARM, MINOR)),
        ({"HIGH": 5.0, "HYST": 1.0}, 4.0, NO_ALARM, OK),
    ],
)
def test_hysteresis_holds_an_alarm_at_exactly_hyst_from_its_limit(fields, value, held, expected):
    assert check_alarm(fields, [value], held) == expected


def test_nan_is_never_in_alarm_even_when_held():
    limits = {"HIHI": 10.0, "HIGH": 5.0, "HYST": 2.0}
    assert check_alarm(limits, [math.nan], HIHI_ALARM) == OK
    assert check_alarm(limits, [math.nan, 11.0], NO_ALARM) == (HIHI_ALARM, MAJOR)
