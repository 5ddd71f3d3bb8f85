"""The mirror's event decisions follow the rules of EPICS records (carelay.broker.mirror):
ai/ao deadbands for numbers (MDEL/ADEL, NaN as recGblCheckDeadband), stringout for
strings (on change), waveform for arrays and buffers (every put)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from carelay.broker.mirror import DBE_LOG, DBE_VALUE, VALUE_MASK, PvMirror, past_deadband
from carelay.common.fields import FieldResolver
from carelay.common.naming import PvSpec

PREFIX = "R:"
NAN, INF = math.nan, math.inf


def mirror(type_code: str = "f", count: int = 1, stored=None, defaults=None) -> PvMirror:
    spec = PvSpec(f"{PREFIX}x_{type_code}{count}", type_code, count)
    m = PvMirror(spec, FieldResolver(PREFIX, defaults or {}))
    if stored:
        m.set_fields(stored)
    return m


def masks(m: PvMirror, *values) -> list[int]:
    """The value events of one put of each of ``values``, in turn."""
    out = []
    for v in values:
        data = np.array(v if isinstance(v, list) else [v], dtype=m.spec.dtype)
        out.append(m.apply(data, 1000.0, append=m.ring is not None, owned=True))
    return out


@pytest.mark.parametrize(
    ("last", "value", "deadband", "passes"),
    [
        (None, 1.0, 5.0, True),  # nothing posted yet
        (1.0, 1.0, 0.0, False),
        (1.0, 1.5, 0.0, True),
        (1.0, 1.0, -1.0, True),
        (1.0, 1.5, 0.5, False),  # "more than" the deadband
        (1.0, 1.6, 0.5, True),
        (1.0, NAN, 1e300, True),  # NaN against a number: an infinite change
        (NAN, 1.0, 1e300, True),
        (NAN, NAN, 0.0, False),  # NaN against NaN: none
        (NAN, NAN, -1.0, True),
        (1.0, INF, 1e300, True),
        (INF, INF, 0.0, False),
        (INF, -INF, 1e300, True),
        (NAN, INF, 1e300, True),
        (1.0, 2.0, INF, False),
    ],
)
def test_past_deadband_as_recgblcheckdeadband(last, value, deadband, passes):
    assert past_deadband(last, value, deadband) is passes


@pytest.mark.parametrize("type_code", ["f", "i"])
def test_a_plain_scalar_posts_on_change_only(type_code):
    m = mirror(type_code)
    assert m.plain
    assert masks(m, 2, 2, 2, 3, 2) == [VALUE_MASK, 0, 0, VALUE_MASK, VALUE_MASK]
    assert m.value.tolist() == [2]


def test_a_plain_scalar_judges_nan_as_records_do():
    m = mirror()
    assert masks(m, NAN, NAN, 1.0, NAN, INF, INF, -INF) == [
        VALUE_MASK,
        0,
        VALUE_MASK,
        VALUE_MASK,
        VALUE_MASK,
        0,
        VALUE_MASK,
    ]


def test_a_put_of_the_same_value_keeps_its_new_stamp():
    m = mirror()
    m.apply(np.array([1.0]), 1000.0, append=False)
    assert m.apply(np.array([1.0]), 2000.0, append=False) == 0
    assert m.stamp == 2000.0


@pytest.mark.parametrize(
    ("stored", "values", "expected"),
    [
        # MDEL 0 set (no longer plain): the same rule as unset.
        ({"MDEL": 0.0}, [1.0, 1.0, 2.0], [VALUE_MASK, 0, VALUE_MASK]),
        ({"MDEL": -1.0}, [1.0, 1.0, 2.0], [VALUE_MASK, DBE_VALUE, VALUE_MASK]),
        ({"ADEL": -1.0}, [1.0, 1.0], [VALUE_MASK, DBE_LOG]),
        ({"MDEL": -1.0, "ADEL": -1.0}, [1.0, 1.0], [VALUE_MASK, VALUE_MASK]),
        (
            {"MDEL": 0.5},
            [1.0, 1.5, 1.6, NAN, NAN, 1.0],
            [VALUE_MASK, DBE_LOG, VALUE_MASK, VALUE_MASK, 0, VALUE_MASK],
        ),
        ({"ADEL": 0.5}, [1.0, 1.0, 1.2], [VALUE_MASK, 0, DBE_VALUE]),
        ({"HIGH": 5.0}, [6.0, 6.0], [VALUE_MASK, 0]),  # alarm limits: no deadband of their own
    ],
)
def test_deadbands_of_a_scalar_with_fields(stored, values, expected):
    m = mirror(stored=stored)
    assert not m.plain
    assert masks(m, *values) == expected


def test_mdel_minus_one_by_glob():
    m = mirror(defaults={"x_*": {"MDEL": -1.0}})
    assert m.eff == {"MDEL": -1.0}
    assert masks(m, 1.0, 1.0, 1.0) == [VALUE_MASK, DBE_VALUE, DBE_VALUE]


def test_a_string_posts_on_change_as_a_stringout_does():
    m = mirror("s")
    assert masks(m, b"a", b"a", b"b", b"a", b"a") == [VALUE_MASK, 0, VALUE_MASK, VALUE_MASK, 0]


@pytest.mark.parametrize(
    ("type_code", "count", "value"),
    [("f", 3, [1.0, 2.0, 3.0]), ("i", 2, [1, 1]), ("c", 1, [65]), ("c", 8, [65, 66])],
)
def test_arrays_post_every_put_as_a_waveform_does(type_code, count, value):
    stored = {"MDEL": 5.0} if type_code in "fi" else None
    assert masks(mirror(type_code, count, stored), value, value, value) == [VALUE_MASK] * 3


@pytest.mark.parametrize(("type_code", "count"), [("F", 1), ("F", 4), ("C", 8)])
def test_buffers_post_every_put(type_code, count):
    m = mirror(type_code, count)
    assert masks(m, [1], [1], [1]) == [VALUE_MASK] * 3


def test_a_deadband_set_on_a_plain_pv_counts_from_the_value_last_posted():
    m = mirror()
    masks(m, 1.0, 1.0)
    m.field_changed("MDEL", 1.0)
    assert not m.plain
    assert masks(m, 1.5, 2.5) == [DBE_LOG, VALUE_MASK]


def test_a_pv_that_turns_plain_again_posts_its_next_change():
    m = mirror(stored={"ADEL": 5.0})
    assert masks(m, 1.0, 2.0) == [VALUE_MASK, DBE_VALUE]  # DBE_LOG last posted 1.0
    m.set_fields({})
    assert m.plain
    # The archive monitors hold 1.0: the next put posts both, whatever its value.
    assert masks(m, 2.0, 2.0) == [VALUE_MASK, 0]


def test_a_deleted_pv_posts_its_first_put_again():
    m = mirror()
    masks(m, 1.0)
    m.forget()
    assert masks(m, 1.0) == [VALUE_MASK]
