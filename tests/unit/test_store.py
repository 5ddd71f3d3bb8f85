"""Unit tests for the shard's PV store (carelay.shard.store)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from carelay.common.fields import PROCESSING
from carelay.shard.store import Change, Rejected, ShardStore

P = "T:"


class FakeClock:
    """A clock that returns 1000.0, 1001.0, ... on successive calls."""

    def __init__(self, start: float = 1000.0) -> None:
        self._ticks = itertools.count()
        self.start = start
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.start + next(self._ticks)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock) -> ShardStore:
    return ShardStore(P, max_elements=1000, max_name_length=64, clock=clock)


def f8(*values) -> np.ndarray:
    return np.array(values, dtype="<f8")


def i4(*values) -> np.ndarray:
    return np.array(values, dtype="<i4")


def u1(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype="u1").copy()


def s40(*values: bytes) -> np.ndarray:
    return np.array(values, dtype="S40")


def state(store: ShardStore) -> tuple:
    """Everything observable, for checking that a rejection changed nothing."""
    return store.seq, [(n, s, c.tolist(), c.dtype.str) for n, s, c, _ in store.snapshot()]


# -- creation ----------------------------------------------------------------------


def test_empty_store(store):
    assert len(store) == 0
    assert store.names() == []
    assert list(store.snapshot()) == []
    assert store.seq == 0
    with pytest.raises(KeyError):
        store.get(P + "x_f1")


def test_first_put_creates_second_does_not(store):
    first = store.put(P + "temp_f1", f8(20.5))
    assert isinstance(first, Change)
    assert first.created is True
    assert first.name == P + "temp_f1"
    assert first.seq == 1
    assert first.length == 1
    assert first.data.tolist() == [20.5]
    second = store.put(P + "temp_f1", f8(21.0))
    assert second.created is False
    assert second.seq == 2
    assert store.get(P + "temp_f1").tolist() == [21.0]
    assert len(store) == 1
    assert store.names() == [P + "temp_f1"]
    assert P + "temp_f1" in store


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("a_f1", f8(1.5)),
        ("a_i1", i4(-7)),
        ("a_c5", u1(b"hello")),
        ("a_s1", s40(b"a string of forty characters at most...")),
        ("a_F3", f8(1.0)),
        ("a_I3", i4(1, 2)),
        ("a_C8", u1(b"log")),
    ],
)
def test_every_type_can_be_created(store, name, data):
    change = store.put(P + name, data)
    assert change.created
    assert store.get(P + name).tolist() == data.tolist()
    assert store.get(P + name).dtype == data.dtype


def test_zero_dimensional_scalar_put(store):
    change = store.put(P + "a_f1", np.array(3.25))
    assert change.length == 1
    assert store.get(P + "a_f1").tolist() == [3.25]


# -- scalars and arrays replace ------------------------------------------------------


def test_scalar_replace(store):
    store.put(P + "n_i1", i4(1))
    store.put(P + "n_i1", i4(2))
    change = store.put(P + "n_i1", i4(3))
    assert change.data.tolist() == [3]
    assert change.length == 1
    assert store.get(P + "n_i1").tolist() == [3]


def test_array_put_of_fewer_elements_stores_exactly_those(store):
    store.put(P + "fit_f4", f8(1, 2, 3, 4))
    assert store.get(P + "fit_f4").tolist() == [1, 2, 3, 4]
    change = store.put(P + "fit_f4", f8(9, 8))
    assert change.length == 2
    assert change.data.tolist() == [9, 8]
    assert store.get(P + "fit_f4").tolist() == [9, 8]
    store.put(P + "fit_f4", f8(5, 6, 7))
    assert store.get(P + "fit_f4").tolist() == [5, 6, 7]


def test_array_put_of_more_than_count_rejected_old_value_kept(store):
    store.put(P + "fit_f4", f8(1, 2, 3, 4))
    before = state(store)
    with pytest.raises(Rejected, match="5 elements"):
        store.put(P + "fit_f4", f8(1, 2, 3, 4, 5))
    assert state(store) == before
    assert store.get(P + "fit_f4").tolist() == [1, 2, 3, 4]


def test_first_put_of_more_than_count_rejected_nothing_created(store):
    with pytest.raises(Rejected, match="elements"):
        store.put(P + "x_f2", f8(1, 2, 3))
    assert len(store) == 0
    assert store.seq == 0


def test_string_pv_rejects_two_strings(store):
    with pytest.raises(Rejected):
        store.put(P + "label_s1", s40(b"a", b"b"))
    assert len(store) == 0


def test_stored_value_is_a_copy_of_the_put_data(store):
    data = f8(1, 2)
    store.put(P + "x_f2", data)
    data[:] = 99
    assert store.get(P + "x_f2").tolist() == [1, 2]


# -- buffers append --------------------------------------------------------------------


def test_buffer_appends(store):
    name = P + "log_F5"
    c1 = store.put(name, f8(1, 2))
    assert (c1.created, c1.length, c1.data.tolist()) == (True, 2, [1, 2])
    c2 = store.put(name, f8(3))
    assert (c2.created, c2.length, c2.data.tolist()) == (False, 3, [3])
    assert store.get(name).tolist() == [1, 2, 3]


def test_buffer_drops_oldest_past_count(store):
    name = P + "log_I4"
    store.put(name, i4(1, 2, 3))
    c = store.put(name, i4(4, 5, 6))
    assert c.data.tolist() == [4, 5, 6]
    assert c.length == 4
    assert store.get(name).tolist() == [3, 4, 5, 6]
    for k in range(7, 20):
        c = store.put(name, i4(k))
        assert c.length == 4
        assert c.data.tolist() == [k]
    assert store.get(name).tolist() == [16, 17, 18, 19]


def test_buffer_put_larger_than_count_keeps_newest(store):
    name = P + "log_F3"
    store.put(name, f8(0))
    c = store.put(name, f8(1, 2, 3, 4, 5, 6))
    assert c.data.tolist() == [4, 5, 6]
    assert c.length == 3
    assert store.get(name).tolist() == [4, 5, 6]


def test_text_buffer(store):
    name = P + "out_C10"
    store.put(name, u1(b"hello "))
    store.put(name, u1(b"world!"))
    assert store.get(name).tobytes() == b"llo world!"


# -- rejections -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "first", "wrong"),
    [
        ("x_f1", f8(1), i4(1)),
        ("x_i1", i4(1), np.array([1], dtype="<i8")),
        ("x_F4", f8(1), np.array([1], dtype="<f4")),
        ("x_c4", u1(b"ab"), np.array([1], dtype="i1")),
        ("x_s1", s40(b"a"), np.array([b"a"], dtype="S10")),
        ("x_f1", f8(1), np.array([1.0], dtype=">f8")),
    ],
)
def test_dtype_mismatch_rejected_nothing_changes(store, name, first, wrong):
    store.put(P + name, first)
    before = state(store)
    with pytest.raises(Rejected, match="dtype"):
        store.put(P + name, wrong)
    assert state(store) == before


def test_dtype_mismatch_on_first_put_creates_nothing(store):
    with pytest.raises(Rejected, match="dtype"):
        store.put(P + "x_f1", i4(1))
    assert len(store) == 0
    assert store.seq == 0


@pytest.mark.parametrize("name", ["x_f4", "x_F4", "x_c4"])
def test_zero_element_put_rejected(store, name):
    dtype = "u1" if name.endswith("c4") else "<f8"
    with pytest.raises(Rejected, match="at least one element"):
        store.put(P + name, np.zeros(0, dtype=dtype))
    assert len(store) == 0
    store.put(P + name, np.ones(2, dtype=dtype))
    before = state(store)
    with pytest.raises(Rejected, match="at least one element"):
        store.put(P + name, np.zeros(0, dtype=dtype))
    assert state(store) == before


@pytest.mark.parametrize(
    "name",
    [
        "x_f1",
        P + "x",
        P + "x_d1",
        P + "x_f0",
        P + "x_S1",
        P + "a.b_f1",
        P + "x_f1001",
        P + "y" * 70 + "_f1",
    ],
)
def test_invalid_name_rejected(store, name):
    with pytest.raises(Rejected, match="invalid PV name"):
        store.put(name, f8(1))
    assert len(store) == 0
    assert store.seq == 0


def test_delete_of_unknown_name_rejected(store):
    store.put(P + "a_f1", f8(1))
    before = state(store)
    with pytest.raises(Rejected, match="no PV named"):
        store.delete(P + "b_f1")
    assert state(store) == before


def test_delete_then_put_creates_again(store):
    name = P + "log_F3"
    store.put(name, f8(1, 2, 3))
    seq = store.delete(name)
    assert seq == 2
    assert name not in store
    assert len(store) == 0
    with pytest.raises(KeyError):
        store.get(name)
    with pytest.raises(Rejected):
        store.delete(name)
    change = store.put(name, f8(9))
    assert change.created is True
    assert change.length == 1
    assert store.get(name).tolist() == [9]


# -- sequence numbers, snapshot, stamps ------------------------------------------------------


def test_seq_increases_by_one_per_applied_change_only(store):
    expected = 0
    ops = [
        ("put", P + "a_f1", f8(1), True),
        ("put", P + "a_f1", i4(1), False),  # dtype
        ("put", P + "b_F2", f8(1, 2, 3), True),
        ("put", P + "bad", f8(1), False),  # name
        ("put", P + "c_f2", f8(1, 2, 3), False),  # too many
        ("delete", P + "a_f1", None, True),
        ("delete", P + "a_f1", None, False),  # unknown
        ("put", P + "b_F2", np.zeros(0), False),  # empty
        ("put", P + "a_f1", f8(2), True),
    ]
    for op, name, data, applies in ops:
        if applies:
            expected += 1
            result = store.put(name, data).seq if op == "put" else store.delete(name)
            assert result == expected
        else:
            with pytest.raises(Rejected):
                store.put(name, data) if op == "put" else store.delete(name)
        assert store.seq == expected
    assert expected == 4


def test_snapshot_lists_every_pv_oldest_first(store, clock):
    store.put(P + "a_f1", f8(1))
    store.put(P + "log_I3", i4(1, 2))
    store.put(P + "log_I3", i4(3, 4))  # wraps: 2 3 4
    store.put(P + "txt_c8", u1(b"hi"))
    store.put(P + "s_s1", s40(b"str"))
    store.put(P + "a_f1", f8(5))
    snap = {name: (stamp, contents.tolist()) for name, stamp, contents, _ in store.snapshot()}
    assert snap == {
        P + "a_f1": (1005.0, [5.0]),
        P + "log_I3": (1002.0, [2, 3, 4]),
        P + "txt_c8": (1003.0, list(b"hi")),
        P + "s_s1": (1004.0, [b"str"]),
    }
    assert sorted(store.names()) == sorted(snap)
    assert len(store) == 4


def test_snapshot_omits_deleted(store):
    store.put(P + "a_f1", f8(1))
    store.put(P + "b_f1", f8(2))
    store.delete(P + "a_f1")
    assert [n for n, _, _, _ in store.snapshot()] == [P + "b_f1"]


def test_stamp_comes_from_injected_clock(store, clock):
    c1 = store.put(P + "a_f1", f8(1))
    c2 = store.put(P + "b_F4", f8(1))
    c3 = store.put(P + "b_F4", f8(2))
    assert (c1.stamp, c2.stamp, c3.stamp) == (1000.0, 1001.0, 1002.0)
    stamps = {n: s for n, s, _, _ in store.snapshot()}
    assert stamps == {P + "a_f1": 1000.0, P + "b_F4": 1002.0}


def test_rejections_do_not_move_the_stamp(store, clock):
    store.put(P + "a_f2", f8(1))
    with pytest.raises(Rejected):
        store.put(P + "a_f2", f8(1, 2, 3))
    with pytest.raises(Rejected):
        store.put(P + "a_f2", i4(1))
    assert [s for _, s, _, _ in store.snapshot()] == [1000.0]


def test_default_clock_is_wall_time():
    before = time.time()
    change = ShardStore(P, 10, 64).put(P + "a_f1", f8(1))
    assert before <= change.stamp <= time.time()


def test_snapshot_contents_not_changed_by_later_puts(store):
    store.put(P + "log_F4", f8(1, 2))
    ((_, _, contents, _),) = store.snapshot()
    store.put(P + "log_F4", f8(3, 4, 5))
    assert contents.tolist() == [1.0, 2.0]


# -- PROC ----------------------------------------------------------------------------


def test_process_puts_the_value_again_stamped_now(store, clock):
    store.put(f"{P}a_f3", f8(1.0, 2.0), stamp=5.0)
    store.dirty.clear()
    seq = store.seq
    change = store.process(f"{P}a_f3")
    assert change.data.tolist() == [1.0, 2.0] and change.length == 2
    assert change.stamp == store.stamp(f"{P}a_f3") == clock.start  # now, not 5.0
    assert change.seq == store.seq == seq + 1 and not change.created
    assert f"{P}a_f3" in store.dirty  # flushed as a put is


def test_process_goes_through_the_drive_limits_as_they_stand(store):
    store.put(f"{P}d_f1", f8(6.0))
    store.set_field(f"{P}d_f1", "DRVH", 3.0)
    assert store.get(f"{P}d_f1").tolist() == [6.0]  # a field change processes nothing
    assert store.process(f"{P}d_f1").data.tolist() == [3.0]
    assert store.get(f"{P}d_f1").tolist() == [3.0]


def test_process_of_a_buffer_or_an_unknown_pv_is_refused_and_changes_nothing(store):
    store.put(f"{P}b_F4", f8(1.0))
    before = state(store)
    with pytest.raises(Rejected, match="has no field PROC"):
        store.process(f"{P}b_F4")
    with pytest.raises(Rejected, match="no PV named"):
        store.process(f"{P}none_f1")
    assert state(store) == before


def test_a_value_past_new_drive_limits_is_brought_within_them(store, clock):
    store.put(f"{P}s_f1", f8(6.0), stamp=5.0)
    store.put(f"{P}w_i3", i4(1, 5, 9), stamp=5.0)
    store.set_field(f"{P}s_f1", "DRVH", 3.0)
    store.set_field(f"{P}w_i3", "DRVH", 4.0)
    store.set_field(f"{P}w_i3", "DRVL", 2.0)
    change = store.process_after_field(f"{P}s_f1", "DRVH")
    assert change.data.tolist() == [3.0] and store.get(f"{P}s_f1").tolist() == [3.0]
    assert change.stamp != 5.0  # stamped now, as a processing
    assert store.process_after_field(f"{P}w_i3", "DRVL").data.tolist() == [2, 4, 4]
    seq = store.seq
    assert store.process_after_field(f"{P}w_i3", "DRVH") is None  # within them now
    assert store.seq == seq


def test_a_put_to_a_drive_or_alarm_field_processes_a_scalar_each_time(store, clock):
    """An ao or longout record processes at each put to a pp(TRUE) field, its value within
    the limits or not: put again as it is, stamped now."""
    for name in (f"{P}l_i1", f"{P}n_f1"):
        store.put(name, i4(2) if name.endswith("_i1") else f8(float("nan")), stamp=5.0)
        for field in sorted(PROCESSING):
            stamp, seq = store.stamp(name), store.seq
            change = store.process_after_field(name, field)
            assert change is not None and change.seq == seq + 1, (name, field)
            assert change.stamp > stamp and store.stamp(name) == change.stamp
            assert change.data.tobytes() == store.get(name).tobytes()
    assert store.get(f"{P}l_i1").tolist() == [2]


def test_what_a_put_to_a_drive_or_alarm_field_leaves_alone(store):
    """A buffer (its elements are history), an array within the drive limits or given an
    alarm limit (a waveform has none on an IOC), text, a PV gone, and the fields that do
    not process a record (EGU, HYST, MDEL, ...)."""
    store.put(f"{P}b_F3", f8(1.0, 9.0))
    store.put(f"{P}a_f3", f8(1.0, 9.0))
    store.put(f"{P}x_f1", f8(6.0))
    store.put(f"{P}t_c8", np.frombuffer(b"text", dtype=np.uint8))
    for name in (f"{P}b_F3", f"{P}a_f3"):
        store.set_field(name, "DRVH", 30.0)
    names = (f"{P}b_F3", f"{P}a_f3", f"{P}x_f1", f"{P}t_c8")
    seq, before = store.seq, [(store.get(n).tobytes(), store.stamp(n)) for n in names]
    left = [(f"{P}b_F3", "DRVH"), (f"{P}b_F3", "HIHI"), (f"{P}a_f3", "DRVH")]
    left += [(f"{P}a_f3", "HIHI"), (f"{P}a_f3", "HHSV"), (f"{P}t_c8", "DESC")]
    left += [(f"{P}x_f1", f) for f in ("EGU", "HYST", "MDEL", "ADEL", "PREC", "HOPR", "DESC")]
    left += [(f"{P}gone_f1", "HIHI")]
    for name, field in left:
        assert store.process_after_field(name, field) is None, (name, field)
    assert store.seq == seq
    assert [(store.get(n).tobytes(), store.stamp(n)) for n in names] == before
