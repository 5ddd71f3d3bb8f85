"""Unit tests for the ring buffer (carelay.common.ring)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carelay.common.ring import RingBuffer


def contents(ring: RingBuffer) -> list:
    return ring.view().tolist()


def test_new_buffer_is_empty():
    ring = RingBuffer(5, "<f8")
    assert len(ring) == 0
    assert ring.capacity == 5
    assert ring.dtype == np.dtype("<f8")
    assert ring.view().shape == (0,)
    assert ring.view().dtype == np.dtype("<f8")


@pytest.mark.parametrize("capacity", [0, -1, -100])
def test_capacity_below_one_raises(capacity):
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(capacity, "<f8")


def test_append_scalars_as_one_element_arrays():
    ring = RingBuffer(3, "<i4")
    ring.append(np.array([7], dtype="<i4"))
    assert contents(ring) == [7]
    assert len(ring) == 1
    ring.append(np.array([8], dtype="<i4"))
    ring.append(np.array([9], dtype="<i4"))
    assert contents(ring) == [7, 8, 9]
    ring.append(np.array([10], dtype="<i4"))
    assert contents(ring) == [8, 9, 10]
    assert len(ring) == 3


def test_append_zero_dimensional_scalar():
    ring = RingBuffer(2, "<f8")
    ring.append(np.float64(1.5))
    ring.append(2.5)
    assert contents(ring) == [1.5, 2.5]


def test_append_many_elements_below_capacity():
    ring = RingBuffer(10, "<f8")
    ring.append(np.arange(4.0))
    ring.append(np.arange(4.0, 7.0))
    assert contents(ring) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert len(ring) == 7


def test_append_exactly_capacity():
    ring = RingBuffer(5, "<i4")
    ring.append(np.arange(5, dtype="<i4"))
    assert contents(ring) == [0, 1, 2, 3, 4]
    assert len(ring) == 5
    ring.append(np.arange(10, 15, dtype="<i4"))
    assert contents(ring) == [10, 11, 12, 13, 14]
    assert len(ring) == 5


def test_append_more_than_capacity_keeps_newest():
    ring = RingBuffer(4, "<i4")
    ring.append(np.arange(11, dtype="<i4"))
    assert contents(ring) == [7, 8, 9, 10]
    assert len(ring) == 4


def test_append_more_than_capacity_onto_partially_filled_wrapped_buffer():
    ring = RingBuffer(4, "<i4")
    ring.append(np.arange(3, dtype="<i4"))
    ring.append(np.arange(3, 6, dtype="<i4"))  # wraps
    assert contents(ring) == [2, 3, 4, 5]
    ring.append(np.arange(100, 106, dtype="<i4"))
    assert contents(ring) == [102, 103, 104, 105]


def test_partial_overflow_drops_oldest():
    ring = RingBuffer(5, "<f8")
    ring.append(np.array([1.0, 2.0, 3.0]))
    ring.append(np.array([4.0, 5.0, 6.0]))
    assert contents(ring) == [2.0, 3.0, 4.0, 5.0, 6.0]
    ring.append(np.array([7.0, 8.0]))
    assert contents(ring) == [4.0, 5.0, 6.0, 7.0, 8.0]


def test_wrap_around_many_times_one_element_at_a_time():
    ring = RingBuffer(7, "<i4")
    for k in range(1000):
        ring.append(np.array([k], dtype="<i4"))
        expected = list(range(max(0, k - 6), k + 1))
        assert contents(ring) == expected


def test_empty_append_changes_nothing():
    ring = RingBuffer(3, "<f8")
    ring.append(np.array([1.0, 2.0]))
    ring.append(np.array([], dtype="<f8"))
    assert contents(ring) == [1.0, 2.0]


def test_append_converts_to_buffer_dtype():
    ring = RingBuffer(3, "u1")
    ring.append(np.array([1, 2, 3], dtype="<i4"))
    assert ring.view().dtype == np.dtype("u1")
    assert contents(ring) == [1, 2, 3]


def test_append_flattens_two_dimensional_input():
    ring = RingBuffer(6, "<i4")
    ring.append(np.arange(6, dtype="<i4").reshape(2, 3))
    assert contents(ring) == [0, 1, 2, 3, 4, 5]


def test_text_buffer_of_strings():
    ring = RingBuffer(2, "S40")
    ring.append(np.array([b"one", b"two", b"three"], dtype="S40"))
    assert contents(ring) == [b"two", b"three"]


def test_clear():
    ring = RingBuffer(4, "<f8")
    ring.append(np.arange(6.0))
    ring.clear()
    assert len(ring) == 0
    assert contents(ring) == []
    ring.append(np.array([9.0]))
    assert contents(ring) == [9.0]
    assert len(ring) == 1


def test_replace():
    ring = RingBuffer(4, "<i4")
    ring.append(np.arange(7, dtype="<i4"))
    ring.replace(np.array([1, 2], dtype="<i4"))
    assert contents(ring) == [1, 2]
    assert len(ring) == 2
    ring.replace(np.arange(10, dtype="<i4"))
    assert contents(ring) == [6, 7, 8, 9]
    ring.replace(np.array([], dtype="<i4"))
    assert contents(ring) == []
    assert len(ring) == 0


def test_view_does_not_change_with_caller_input():
    ring = RingBuffer(4, "<f8")
    src = np.array([1.0, 2.0])
    ring.append(src)
    src[:] = 99.0
    assert contents(ring) == [1.0, 2.0]


# -- model-based property test --------------------------------------------------

_appends = st.lists(
    st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=25),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(min_value=1, max_value=12), appends=_appends)
def test_matches_list_model(capacity, appends):
    ring = RingBuffer(capacity, "<i4")
    model: list[int] = []
    for chunk in appends:
        ring.append(np.array(chunk, dtype="<i4"))
        model.extend(chunk)
        expected = model[-capacity:] if model else []
        assert contents(ring) == expected
        assert len(ring) == len(expected)
        assert ring.view().dtype == np.dtype("<i4")


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=8),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["append", "replace", "clear"]),
            st.lists(st.floats(allow_nan=False), max_size=12),
        ),
        max_size=30,
    ),
)
def test_matches_list_model_with_clear_and_replace(capacity, ops):
    ring = RingBuffer(capacity, "<f8")
    model: list[float] = []
    for op, chunk in ops:
        arr = np.array(chunk, dtype="<f8")
        if op == "append":
            ring.append(arr)
            model.extend(chunk)
        elif op == "replace":
            ring.replace(arr)
            model = list(chunk)
        else:
            ring.clear()
            model = []
        model = model[-capacity:]
        assert contents(ring) == model
        assert len(ring) == len(model)
