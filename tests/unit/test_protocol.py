"""Unit tests for the broker-shard wire codec (carelay.common.protocol, .messages)."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from carelay.common.messages import (
    KINDS,
    Ack,
    Applied,
    Confirm,
    Delete,
    Deleted,
    FieldChanged,
    Follow,
    Hello,
    Ping,
    Pong,
    Put,
    Reject,
    SetField,
    Shown,
    Snapshot,
    SnapshotBegin,
    SnapshotEnd,
    Update,
    Wanted,
    Watch,
    Write,
)
from carelay.common.protocol import (
    BATCH_TAG,
    INLINE_MAX,
    WRITE_RUN,
    ProtocolError,
    WriteRun,
    batches,
    decode_batch,
    encode_batch,
)
from carelay.common.runs import update_runs

DTYPES = ["<f8", "<i4", "|u1", "|S40"]


def sample(dtype: str, n: int = 5) -> np.ndarray:
    if dtype == "|S40":
        return np.array([f"text {k}".encode() for k in range(n)], dtype="S40")
    return (np.arange(n) * 3 - 4).astype(dtype)


#: One message of every kind, every field set away from its default.
EVERY_KIND = [
    Hello(1, "s3cret", "b1"),
    Hello(2, "", "b2", True),
    Follow(38, "R:a_f1", True),
    Ping(2),
    Put("R:a_f1", 3, 1.5, np.array([1.0]), True, 99.5),
    Write("R:b_F5", 4, 2.5, sample("<f8"), 98.5),
    Delete("R:c_f1", 5, 97.5),
    SetField("R:a_f1", 6, "EGU", "degC", 96.5),
    Update("R:a_f1", 7, 8, 3.5, sample("<i4"), True, True, 2**40),
    Ack("R:a_f1", 9, 10, 11),
    FieldChanged("R:a_f1", 12, 13, "PREC", 3, 14),
    Deleted("R:c_f1", 15, 16, True, 17),
    Reject(18, "R:a_f1", "because", 19),
    SnapshotBegin(20, 21, 22),
    Snapshot("R:t_s1", 4.5, sample("|S40", 1), {"EGU": "V", "HIHI": 2.5}, 23),
    SnapshotEnd(24, 25, "disk full", 26),
    Pong(27, 28, 29, "", 30, 31, 32.5, {"buckets": [0.1], "counts": [1, 2], "sum": 3.0}, 4096, 33),
    Applied(34, 35, 36),
    Watch(37, "R:a_f1", True),
    Shown(38, 39),
    Confirm(40, 41),
    Wanted("R:a_f1", True, 42),
]


def wire(msgs) -> list[bytes]:
    """Encode ``msgs`` and turn every frame into plain bytes, as a socket would deliver them."""
    return [bytes(f) for f in encode_batch(msgs)]


def roundtrip(msg):
    (out,) = decode_batch(wire([msg]))
    return out


def packed(entries) -> bytes:
    return BATCH_TAG + msgpack.packb(entries, use_bin_type=True)


def entry(msg) -> list:
    """The batch entry of ``msg`` (inline data), as msgpack gives it back."""
    return msgpack.unpackb(wire([msg])[0][len(BATCH_TAG) :])[0]


# -- round trips -----------------------------------------------------------------


def test_every_kind_is_tested():
    assert {type(m) for m in EVERY_KIND} == set(KINDS.values())


@pytest.mark.parametrize("msg", EVERY_KIND, ids=lambda m: type(m).__name__)
def test_every_kind_roundtrips_with_its_fields(msg):
    out = roundtrip(msg)
    assert type(out) is type(msg)
    assert out == msg
    for f in dataclasses.fields(msg):
        got, sent = getattr(out, f.name), getattr(msg, f.name)
        if isinstance(sent, np.ndarray):
            assert got.dtype == sent.dtype and got.tolist() == sent.tolist()
        else:
            assert got == sent and type(got) is type(sent), f.name


@pytest.mark.parametrize("msg", EVERY_KIND, ids=lambda m: type(m).__name__)
def test_an_entry_is_the_kind_then_the_fields_in_order(msg):
    e = entry(msg)
    assert e[0] == type(msg).KIND and len(e) == 1 + len(dataclasses.fields(msg))
    for value, f in zip(e[1:], dataclasses.fields(msg), strict=True):
        sent = getattr(msg, f.name)
        if isinstance(sent, np.ndarray):
            assert value == [sent.dtype.str, sent.size, sent.tobytes()]
        else:
            assert value == sent, f.name


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Ping(1).req = 2  # type: ignore[misc]


def test_defaults_roundtrip():
    assert roundtrip(Hello(1)) == Hello(1, "", "")
    assert roundtrip(Delete("a", 1)).expires == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_single_element_and_empty(dtype):
    one = sample(dtype, 1)
    assert roundtrip(Put("a", 1, 0.0, one)) == Put("a", 1, 0.0, one)
    out = roundtrip(Put("a", 1, 0.0, np.zeros(0, dtype=dtype)))
    assert out.data.dtype == np.dtype(dtype) and out.data.size == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_one_million_elements(dtype):
    if dtype == "|S40":
        data = np.full(1_000_000, b"x" * 40, dtype="S40")
        data[123_456] = b"needle"
    else:
        data = (np.arange(1_000_000) % 251).astype(dtype)
    msg = Snapshot("RELAY:big_F1000000", 1.0, data, {})
    frames = wire([msg])
    assert len(frames) == 2 and len(frames[1]) == data.nbytes
    out = roundtrip(msg)
    assert out.data.shape == (1_000_000,) and out.data.dtype == np.dtype(dtype)
    assert out == msg


def test_roundtrip_non_contiguous_and_two_dimensional_arrays():
    base = np.arange(20, dtype="<f8")
    assert roundtrip(Put("a", 1, 0.0, base[::3])).data.tolist() == base[::3].tolist()
    data = np.arange(6, dtype="<i4").reshape(2, 3)
    assert roundtrip(Put("a", 1, 0.0, data)).data.tolist() == [0, 1, 2, 3, 4, 5]


def test_float_special_values_roundtrip():
    data = np.array([math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308], dtype="<f8")
    out = roundtrip(Put("a", 1, math.inf, data))
    assert out.data.tobytes() == data.tobytes() and out.stamp == math.inf
    assert math.isnan(roundtrip(Put("a", 1, 0.0, np.array([math.nan]))).data[0])


def test_decode_accepts_memoryview_bytearray_and_zmq_frames():
    zmq = pytest.importorskip("zmq")
    msg = Update("a", 1, 9, 1.0, np.arange(1000.0))
    frames = encode_batch([msg])
    assert len(frames) == 2
    assert decode_batch(list(frames)) == [msg]
    assert decode_batch([bytearray(bytes(f)) for f in frames]) == [msg]
    assert decode_batch([zmq.Frame(bytes(f)) for f in frames]) == [msg]


@pytest.mark.parametrize("dtype", [">f8", "<f4", "<i8", "|b1", "<U10", "|S10", ">i4"])
def test_encode_refuses_disallowed_dtype(dtype):
    with pytest.raises(ProtocolError, match="dtype"):
        encode_batch([Put("a", 1, 0.0, np.zeros(2, dtype=dtype))])


def test_message_equality():
    a = Put("a", 1, 0.0, np.array([1.0]))
    assert a == Put("a", 1, 0.0, np.array([1.0]))
    assert a != Put("a", 1, 0.0, np.array([2.0]))
    assert a != Put("a", 1, 0.0, np.array([1], dtype="<i4"))
    assert a != Put("b", 1, 0.0, np.array([1.0]))
    assert a != Write("a", 1, 0.0, np.array([1.0]))
    assert Ack("a", 1, 2) != Ack("a", 1, 3)


# -- refusals ------------------------------------------------------------------------


def refused(frames, match: str, to_shard: bool = False) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode_batch(frames, to_shard=to_shard)
    assert type(info.value) is ProtocolError


def with_field(msg, index: int, value) -> list:
    """The entry of ``msg`` with its field ``index`` (0: the kind) set to ``value``."""
    e = entry(msg)
    e[index] = value
    return e


@pytest.mark.parametrize("tag", [b"CRB1", b"CRL1", b"", b"crb2", b"XXXX"])
def test_wrong_tag(tag):
    refused([tag + msgpack.packb([entry(Ping(1))])], "tag")


def test_batch_without_entries():
    refused([BATCH_TAG], "needs its entries")


@pytest.mark.parametrize("entries", [[], {}, 5, [[]], [5], [entry(Ping(1))] * 3000])
def test_batch_wrong_shape(entries):
    refused([packed(entries)], "batch|malformed")


@pytest.mark.parametrize("kind", [0, 9, 25, 99, -1, 2**40, "PUT", None, 2.5, True, [2]])
def test_unknown_kind(kind):
    refused([packed([with_field(Ping(1), 0, kind)])], "kind|malformed")


def test_each_side_refuses_the_other_sides_runs():
    """A shard takes WRITE_RUNs only, a front-end UPDATE_RUNs only."""
    updates = [Update(f"R:{c}_f1", 0, 5, 1.0, np.array([2.0])) for c in "ab"]
    refused(encode_batch(update_runs(updates)), "unknown message kind 8", to_shard=True)
    refused([packed([_run_entry()])], "unknown message kind 7")


@pytest.mark.parametrize("msg", EVERY_KIND, ids=lambda m: type(m).__name__)
def test_a_field_too_many_or_too_few(msg):
    e = entry(msg)
    refused([packed([[*e, 0]])], "needs")
    refused([packed([e[:-1]])], "needs")


@pytest.mark.parametrize(
    ("msg", "index", "value"),
    [
        (Ping(1), 1, -1),
        (Ping(1), 1, 1.0),
        (Ping(1), 1, "1"),
        (Ping(1), 1, True),
        (Ping(1), 1, None),
        (Ack("a", 1, 2), 3, -(2**63)),
        (Hello(1), 2, None),
        (Hello(1), 3, b"b1"),
        (Reject(1, "a", "why"), 3, 5),
        (Put("a", 1, 0.0, np.zeros(1)), 3, 1),
        (Put("a", 1, 0.0, np.zeros(1)), 3, "now"),
        (Put("a", 1, 0.0, np.zeros(1)), 5, 1),
        (Put("a", 1, 0.0, np.zeros(1)), 6, None),
        (SetField("a", 1, "EGU", "V"), 4, None),
        (SetField("a", 1, "EGU", "V"), 4, [1]),
        (SetField("a", 1, "EGU", "V"), 4, True),
        (Snapshot("a", 1.0, np.zeros(1), {}), 4, [1]),
        (Snapshot("a", 1.0, np.zeros(1), {}), 4, {1: 2}),
        (Snapshot("a", 1.0, np.zeros(1), {}), 4, {b"EGU": "V"}),
        (Update("a", 1, 2, 3.0, np.zeros(1)), 3, -1),
        (Update("a", 1, 2, 3.0, np.zeros(1)), 6, 1),
        (Pong(1, 2, 3, "", 4, 5, 6.0, {}, None), 9, -5),
        (Pong(1, 2, 3, "", 4, 5, 6.0, {}, None), 9, 1.5),
    ],
)
def test_a_field_of_the_wrong_type(msg, index, value):
    name = dataclasses.fields(msg)[index - 1].name
    refused([packed([with_field(msg, index, value)])], f"{type(msg).__name__}.{name}|map key")


def _put_entry(data) -> list:
    return with_field(Put("a", 1, 0.0, np.zeros(1)), 4, data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, "data must be"),
        (["<f8", 1], "data must be"),
        ("<f8", "data must be"),
        ([1, 1, b"\0" * 8], "dtype"),
        ([None, 1, b"\0" * 8], "dtype"),
        (["<f8", "1", b"\0" * 8], "count"),
        (["<f8", 1.0, b"\0" * 8], "count"),
        (["<f8", -1, b""], "count"),
        (["<f8", 2**63, b"\0" * 8], "count"),
        (["<f8", 1, "12345678"], "inline"),
        (["<f8", 2, b"\0" * 8], "holds"),
        (["<f8", 1, b"\0" * 9], "holds"),
    ],
)
def test_bad_data(data, match):
    refused([packed([_put_entry(data)])], match)


@pytest.mark.parametrize("dtype", [">f8", "<f4", "f8", "float64", "O", "|O", "<U10", "|S39", "V8"])
def test_disallowed_dtype(dtype):
    refused([packed([_put_entry([dtype, 1, b"\0" * 8])])], "dtype")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta", [-1, 1])
def test_data_frame_size_not_matching_count(dtype, delta):
    frame = b"\x00" * (3 * np.dtype(dtype).itemsize + delta)
    refused([packed([_put_entry([dtype, 3, None])]), frame], "holds")


@pytest.mark.parametrize("count", [100_000_000, 10**12, 2**63 - 1, 2**64 - 1])
def test_huge_declared_count_with_tiny_frame(count):
    refused([packed([_put_entry(["<f8", count, None])]), b"\0" * 8], "count|holds")


def _good_batch() -> list[bytes]:
    return wire(
        [Put("R:a_f1", 1, 0.0, np.array([1.0])), Put("R:b_F10000", 2, 0.0, np.zeros(10_000))]
    )


def test_batch_missing_data_frame():
    refused(_good_batch()[:1], "more data frames")


def test_batch_extra_data_frame():
    refused([*_good_batch(), b"\0" * 8], "too many")


def test_batch_with_one_bad_entry_is_refused_whole():
    good = _put_entry(["<f8", 1, b"\0" * 8])
    bad = _put_entry(["<f8", 2, b"\0" * 8])  # declares 16 bytes, carries 8
    refused([packed([good, good, bad, good])], "holds")


def test_non_list_frames():
    refused(None, "malformed")
    refused([1, 2], "malformed|tag")
    refused([BATCH_TAG, 5], "malformed|entries")


# -- batches -------------------------------------------------------------------------


def test_batch_roundtrip_mixed_sizes():
    msgs = [
        Put("R:a_f1", 1, 0.0, np.array([1.5])),
        Ping(2),
        Put("R:b_F100000", 3, 0.0, np.arange(100_000, dtype="<f8")),
        SetField("R:a_f1", 4, "EGU", "degC"),
        Put("R:c_c10", 5, 0.0, np.frombuffer(b"hello", dtype="|u1")),
        Put("R:d_F9000", 6, 0.0, np.ones(9000)),
    ]
    frames = wire(msgs)
    assert frames[0].startswith(BATCH_TAG)
    # The two arrays over INLINE_MAX travel as frames of their own; the rest inline.
    assert len(frames) == 3 and np.ones(9000).nbytes > INLINE_MAX
    assert decode_batch(frames) == msgs


def test_batches_cut_by_count_and_bytes():
    small = [Put(f"R:{k}_f1", k, 0.0, np.zeros(1)) for k in range(2500)]
    assert [len(b) for b in batches(small)] == [1000, 1000, 500]
    big = [Put("R:a_F400000", k, 0.0, np.zeros(100_000)) for k in range(3)]
    assert [len(b) for b in batches(big)] == [1, 1, 1]
    assert batches([]) == []


# -- property tests ------------------------------------------------------------------

_uint = st.integers(min_value=0, max_value=2**64 - 1)
_text = st.text(max_size=40)
_floats = st.floats(allow_nan=False)
_value = st.one_of(st.integers(-(2**63), 2**64 - 1), _floats, st.text(max_size=20))
_fields = st.dictionaries(st.text(max_size=8), _value, max_size=4)
_data = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(
        np.dtype(dt),
        st.integers(min_value=0, max_value=600),
        elements={"allow_nan": False} if dt == "<f8" else None,
    )
)
_messages = st.one_of(
    st.builds(Hello, _uint, _text, _text, st.booleans()),
    st.builds(Follow, _uint, _text, st.booleans()),
    st.builds(Ping, _uint),
    st.builds(Put, _text, _uint, _floats, _data, st.booleans(), _floats),
    st.builds(Write, _text, _uint, _floats, _data, _floats),
    st.builds(Delete, _text, _uint, _floats),
    st.builds(SetField, _text, _uint, _text, _value, _floats),
    st.builds(Update, _text, _uint, _uint, _floats, _data, st.booleans(), st.booleans(), _uint),
    st.builds(Ack, _text, _uint, _uint, _uint),
    st.builds(FieldChanged, _text, _uint, _uint, _text, _value, _uint),
    st.builds(Deleted, _text, _uint, _uint, st.booleans(), _uint),
    st.builds(Reject, _uint, _text, _text, _uint),
    st.builds(SnapshotBegin, _uint, _uint, _uint),
    st.builds(Snapshot, _text, _floats, _data, _fields, _uint),
    st.builds(SnapshotEnd, _uint, _uint, _text, _uint),
    st.builds(
        Pong, _uint, _uint, _uint, _text, _uint, _uint, _floats, _fields, st.none() | _uint, _uint
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages, min_size=1, max_size=8))
def test_property_batch_roundtrip(msgs):
    assert decode_batch(wire(msgs)) == msgs


def _only_protocol_error(frames, runs: bool = False) -> None:
    # Anything but ProtocolError propagates and fails the test.
    with contextlib.suppress(ProtocolError):
        decode_batch(frames, to_shard=runs)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4), st.booleans())
def test_property_random_frames_only_protocol_error(frames, runs):
    _only_protocol_error(frames, runs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=128), st.lists(st.binary(max_size=64), max_size=3), st.booleans())
def test_property_random_entries_only_protocol_error(raw, data, runs):
    _only_protocol_error([BATCH_TAG + raw, *data], runs)


_msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(),
        st.text(max_size=10),
        st.binary(max_size=10),
        st.sampled_from(DTYPES + ["", ">f8", "O"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    msg=st.sampled_from(EVERY_KIND),
    replaced=st.dictionaries(st.integers(0, 11), _msgpack_values, min_size=1, max_size=3),
    frame=st.one_of(st.none(), st.binary(max_size=100)),
    runs=st.booleans(),
)
def test_property_random_fields_only_protocol_error(msg, replaced, frame, runs):
    e = entry(msg)
    for index, value in replaced.items():
        e[index % len(e)] = value
    _only_protocol_error([packed([e]), *([frame] if frame is not None else [])], runs)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.one_of(_messages, st.deferred(lambda: _runs)), min_size=1, max_size=4),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255))),
    runs=st.booleans(),
)
def test_property_corrupted_batches_only_protocol_error(items, flips, runs):
    """Batches of messages and WRITE runs, with bytes flipped, read by a receiver that
    takes runs (the shard) or not (the broker)."""
    frames = [bytearray(f) for f in wire(items)]
    for pos, value in flips:
        frame = frames[pos % len(frames)]
        if frame:
            frame[pos % len(frame)] = value
    _only_protocol_error([bytes(f) for f in frames], runs)


# -- runs of one-element WRITEs -------------------------------------------------------


def _run(dtype: str, items, expires: float = 0.0) -> WriteRun:
    run = WriteRun(np.dtype(dtype), expires=expires)
    for name, req, stamp, value in items:
        run.add(name, req, stamp, np.array([value], dtype=dtype))
    return run


def test_a_write_run_is_one_entry_and_decodes_column_by_column():
    run = _run(
        "<f8", [("R:a_f1", 0, 1.5, 1.0), ("R:b_f1", 7, 2.5, -2.0), ("R:a_f1", 0, 3.5, 3.0)], 9.5
    )
    texts = _run("|S40", [("R:t_s1", 0, 4.0, b"hello")])
    msgs = [Ping(1), run, texts, Put("R:c_f2", 0, 0.0, np.ones(2))]
    frames = wire(msgs)
    assert len(frames) == 1
    entries = msgpack.unpackb(frames[0][len(BATCH_TAG) :])
    assert len(entries) == 4 and entries[1][:4] == [WRITE_RUN, "<f8", run.names, [0, 7, 0]]
    out = decode_batch(frames, to_shard=True)
    assert out[0] == msgs[0] and out[3] == msgs[3]
    got = out[1]
    assert isinstance(got, WriteRun) and len(got) == 3 and got.expires == 9.5
    assert got.names == ["R:a_f1", "R:b_f1", "R:a_f1"] and got.reqs == [0, 7, 0]
    assert got.stamps == [1.5, 2.5, 3.5] and got.values.tolist() == [1.0, -2.0, 3.0]
    assert got.values.dtype == np.dtype("<f8")
    assert out[2].values.tolist() == [b"hello"]
    # As single messages, the run is the Writes it stands for.
    assert (
        got.messages()
        == run.messages()
        == [
            Write("R:a_f1", 0, 1.5, np.array([1.0])),
            Write("R:b_f1", 7, 2.5, np.array([-2.0]), 9.5),
            Write("R:a_f1", 0, 3.5, np.array([3.0])),
        ]
    )


def test_a_receiver_that_takes_no_runs_refuses_them():
    refused(wire([_run("<f8", [("R:a_f1", 0, 1.0, 1.0)])]), "kind")


def test_batches_count_the_puts_of_a_run():
    run = _run("<f8", [(f"R:{k}_f1", 0, 1.0, k) for k in range(600)])
    single = [Put("R:a_f1", 0, 0.0, np.zeros(1))] * 500
    assert [len(b) for b in batches([run, *single])] == [401, 100]


def test_a_run_of_a_dtype_not_allowed_is_not_sent():
    with pytest.raises(ProtocolError, match="not allowed"):
        encode_batch([_run("<f4", [("R:a_f1", 0, 1.0, 1.0)])])


def _run_entry(**changes) -> list:
    e = {
        "kind": WRITE_RUN,
        "dtype": "<f8",
        "names": ["R:a_f1", "R:b_f1"],
        "reqs": [0, 3],
        "stamps": np.array([1.0, 2.0]).tobytes(),
        "values": np.array([5.0, 6.0]).tobytes(),
        "expires": 0.0,
    }
    e.update(changes)
    return list(e.values())


def test_a_well_formed_run_entry_decodes():
    (run,) = decode_batch([packed([_run_entry()])], to_shard=True)
    assert run.names == ["R:a_f1", "R:b_f1"] and run.values.tolist() == [5.0, 6.0]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"kind": True}, "kind"),
        ({"dtype": "<f4"}, "not allowed"),
        ({"dtype": 8}, "not allowed"),
        ({"names": "R:a_f1"}, "list of names"),
        ({"reqs": {"a": 1}}, "as many"),
        ({"names": [], "reqs": []}, "list of names, and some"),
        ({"reqs": [0]}, "as many"),
        ({"names": ["R:a_f1", b"R:b_f1"]}, "text"),
        ({"reqs": [0, -1]}, "non-negative"),
        ({"reqs": [0, True]}, "non-negative"),
        ({"reqs": [0, 1.0]}, "non-negative"),
        ({"stamps": np.array([1.0]).tobytes()}, "stamp"),
        ({"stamps": [1.0, 2.0]}, "stamp"),
        ({"values": np.array([5.0]).tobytes()}, "value per name"),
        ({"values": np.array([5, 6], dtype="<i4").tobytes()}, "value per name"),
        ({"values": None}, "value per name"),
        ({"expires": -1.0}, "expiry"),
        ({"expires": math.nan}, "expiry"),
        ({"expires": 1}, "expiry"),
    ],
)
def test_a_malformed_run_entry_is_refused(changes, match):
    refused([packed([_run_entry(**changes)])], match, to_shard=True)


def test_a_run_entry_of_the_wrong_length_is_refused():
    refused([packed([_run_entry()[:6]])], "7 fields", to_shard=True)


_runs = st.builds(
    _run,
    st.sampled_from(["<f8", "<i4", "|u1"]),
    st.lists(
        st.tuples(
            st.text(max_size=12),
            st.integers(0, 2**64 - 1),
            st.floats(allow_nan=False),
            st.integers(0, 100),
        ),
        min_size=1,
        max_size=20,
    ),
    st.floats(min_value=0.0, allow_infinity=False),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_messages, _runs), min_size=1, max_size=6))
def test_property_batches_with_runs_roundtrip(items):
    out = decode_batch(wire(items), to_shard=True)
    assert len(out) == len(items)
    for got, sent in zip(out, items, strict=True):
        if isinstance(sent, WriteRun):
            assert got.messages() == sent.messages()
        else:
            assert got == sent
