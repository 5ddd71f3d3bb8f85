"""The field table's pure functions (carelay.common.fields): what a field put stores or
refuses, and the alarm status the limits give, with hysteresis, as an ai/ao record."""

from __future__ import annotations

import pytest

from carelay.common.fields import (
    NO_ALARM,
    NO_SEVERITY,
    FieldError,
    validate,
)

OK = (NO_ALARM, NO_SEVERITY)


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
