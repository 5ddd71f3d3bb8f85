"""Unit tests for the PV naming rule (carelay.common.naming)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from carelay.common.naming import InvalidPvName, PvSpec, parse_pv_name

PREFIX = "5trap:relay:"
MAX_ELEMENTS = 1_000_000
MAX_NAME_LENGTH = 128


def parse(rest: str, *, prefix: str = PREFIX, max_elements: int = MAX_ELEMENTS) -> PvSpec:
    return parse_pv_name(prefix + rest, prefix, max_elements, MAX_NAME_LENGTH)


def refused(fullname: str, match: str, *, max_elements: int = MAX_ELEMENTS) -> None:
    with pytest.raises(InvalidPvName, match=match):
        parse_pv_name(fullname, PREFIX, max_elements, MAX_NAME_LENGTH)


# -- the five documented examples -------------------------------------------


@pytest.mark.parametrize(
    ("rest", "type_code", "count", "kind", "is_buffer", "dtype", "is_text"),
    [
        ("cupsofcoffeetoday_i1", "i", 1, "i", False, np.dtype("<i4"), False),
        ("temperature_lab_f1", "f", 1, "f", False, np.dtype("<f8"), False),
        ("fit_results_f4", "f", 4, "f", False, np.dtype("<f8"), False),
        ("pressure_log_F100", "F", 100, "f", True, np.dtype("<f8"), False),
        ("cmdline_output_c10000", "c", 10000, "c", False, np.dtype("u1"), True),
    ],
)
def test_examples(rest, type_code, count, kind, is_buffer, dtype, is_text):
    spec = parse(rest)
    assert spec == PvSpec(PREFIX + rest, type_code, count)
    assert spec.name == PREFIX + rest
    assert spec.type_code == type_code
    assert spec.count == count
    assert spec.kind == kind
    assert spec.is_buffer is is_buffer
    assert spec.dtype == dtype
    assert spec.is_text is is_text


# -- every type letter --------------------------------------------------------


@pytest.mark.parametrize(
    ("letter", "count", "dtype", "is_buffer", "is_text"),
    [
        ("f", 3, np.dtype("<f8"), False, False),
        ("i", 3, np.dtype("<i4"), False, False),
        ("c", 3, np.dtype("u1"), False, True),
        ("s", 1, np.dtype("S40"), False, True),
        ("F", 3, np.dtype("<f8"), True, False),
        ("I", 3, np.dtype("<i4"), True, False),
        ("C", 3, np.dtype("u1"), True, True),
    ],
)
def test_every_type_letter(letter, count, dtype, is_buffer, is_text):
    spec = parse(f"x_{letter}{count}")
    assert spec.type_code == letter
    assert spec.kind == letter.lower()
    assert spec.count == count
    assert spec.dtype == dtype
    assert spec.is_buffer is is_buffer
    assert spec.is_text is is_text


def test_string_dtype_holds_40_characters():
    assert parse("label_s1").dtype.itemsize == 40


def test_count_at_max_elements_accepted():
    assert parse("x_f10", max_elements=10).count == 10
    assert parse("x_F10", max_elements=10).count == 10


def test_count_without_upper_bound_short_of_ten_digits():
    assert parse("x_f1000000000", max_elements=10**9).count == 10**9


@pytest.mark.parametrize(
    "rest",
    [
        "a-b_f1",
        "a:b_f1",
        "a;b_f1",
        "a_b_f1",
        "_f1_f1",
        "__f1",
        "-_i2",
        "A:b-C;d_e_F5",
        "0123_c4",
    ],
)
def test_allowed_characters_in_name_part(rest):
    spec = parse(rest)
    assert spec.name == PREFIX + rest


def test_name_with_type_like_suffix_takes_the_last_one():
    spec = parse("data_f4_i2")
    assert (spec.type_code, spec.count) == ("i", 2)


def test_name_length_limit_is_inclusive():
    rest_len = MAX_NAME_LENGTH - len(PREFIX)
    rest = "a" * (rest_len - 3) + "_f1"
    assert len(PREFIX + rest) == MAX_NAME_LENGTH
    assert parse(rest).count == 1


# -- refusals -----------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 10, 40])
def test_string_with_count_other_than_one_refused(count):
    refused(f"{PREFIX}label_s{count}", r"count 1")


@pytest.mark.parametrize("rest", ["label_S1", "label_S10"])
def test_string_buffer_refused(rest):
    refused(PREFIX + rest, r"\(S\)")


@pytest.mark.parametrize("rest", ["x_f0", "x_F0", "x_c0", "x_s0"])
def test_count_zero_refused(rest):
    refused(PREFIX + rest, r"count")


@pytest.mark.parametrize("rest", ["x_f01", "x_F007", "x_i00", "x_s01"])
def test_leading_zeros_refused(rest):
    refused(PREFIX + rest, r"leading zeros")


@pytest.mark.parametrize("rest", ["x_f11", "x_F11", "x_c1000"])
def test_count_above_max_elements_refused(rest):
    refused(PREFIX + rest, r"max_elements", max_elements=10)


@pytest.mark.parametrize(
    "rest", ["x_f99999999999999", "x_F12345678901", "x_c" + "9" * 40, "x_i4294967297"]
)
def test_absurd_counts_refused(rest):
    refused(PREFIX + rest, r"count")


@pytest.mark.parametrize(
    "rest",
    [
        "a.b_f1",
        "x_f1.VAL",
        "a b_f1",
        "x_f1 ",
        " x_f1",
        "a\tb_f1",
        "a/b_f1",
        "a$b_f1",
        "a{b}_f1",
        "a,b_f1",
    ],
)
def test_disallowed_characters_refused(rest):
    refused(PREFIX + rest, r"<name>_<type><count>")


@pytest.mark.parametrize("rest", ["café_f1", "x_f1\u00b2", "ünits_i1", "温度_f1", "x_f\uff11"])
def test_non_ascii_refused(rest):
    refused(PREFIX + rest, r"ASCII")


@pytest.mark.parametrize("rest", ["_f1", "_F4", "_i1", ""])
def test_empty_name_part_refused(rest):
    refused(PREFIX + rest, r"<name>_<type><count>")


@pytest.mark.parametrize("rest", ["x_d1", "x_b4", "x_u1", "x_D1", "x_x1", "x_ff1"])
def test_unknown_type_letters_refused(rest):
    refused(PREFIX + rest, r"type one of")


@pytest.mark.parametrize("rest", ["x_f", "x_F", "x_s", "x", "x_", "x_1", "xf1", "x_f-1", "x_f+1"])
def test_missing_count_or_separator_refused(rest):
    refused(PREFIX + rest, r"<name>_<type><count>")


@pytest.mark.parametrize(
    "fullname",
    [
        "other:relay:x_f1",
        "5trap:relay-x_f1",
        "5TRAP:RELAY:x_f1",
        "x_f1",
        "",
        " 5trap:relay:x_f1",
        "5trap:relay",
    ],
)
def test_wrong_prefix_refused(fullname):
    refused(fullname, r"prefix")


def test_over_long_name_refused():
    rest = "a" * (MAX_NAME_LENGTH - len(PREFIX) - 2) + "_f1"
    assert len(PREFIX + rest) == MAX_NAME_LENGTH + 1
    refused(PREFIX + rest, r"longer than 128")


def test_invalid_pv_name_is_a_value_error():
    assert issubclass(InvalidPvName, ValueError)


@pytest.mark.parametrize("rest", ["x_f1\n", "x_F4\n"])
def test_trailing_newline_refused(rest):
    refused(PREFIX + rest, r"<name>_<type><count>")


# -- properties -------------------------------------------------------------------------

_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-:;"


@given(
    stem=st.text(alphabet=_NAME_CHARS, min_size=1, max_size=40),
    type_code=st.sampled_from("ficFIC"),
    count=st.integers(min_value=1, max_value=1000),
)
def test_every_name_built_by_the_rule_parses_back(stem, type_code, count):
    name = f"P:{stem}_{type_code}{count}"
    spec = parse_pv_name(name, "P:", 1000, 128)
    assert (spec.name, spec.type_code, spec.count) == (name, type_code, count)
    assert spec.is_buffer == type_code.isupper()


@given(st.text(max_size=80))
def test_any_text_parses_or_is_refused_with_the_rules_own_error(rest):
    try:
        spec = parse_pv_name("P:" + rest, "P:", 1000, 128)
    except InvalidPvName:
        return
    # Whatever is accepted follows the rule exactly.
    assert rest.isascii() and "." not in rest and not any(c.isspace() for c in rest)
    assert 1 <= spec.count <= 1000
    assert spec.type_code in "ficsFIC"
    assert spec.type_code != "s" or spec.count == 1
