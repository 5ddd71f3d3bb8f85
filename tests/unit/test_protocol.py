"""Unit tests for the broker-shard wire codec (carelay.common.protocol)."""

from __future__ import annotations

import contextlib
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from carelay.common.protocol import (
    BATCH_TAG,
    PROTOCOL_TAG,
    Message,
    Op,
    ProtocolError,
    WriteRun,
    batches,
    decode,
    decode_batch,
    encode,
    encode_batch,
)

DTYPES = ["<f8", "<i4", "|u1", "|S40"]


def wire(msg: Message) -> list[bytes]:
    """Encode ``msg`` and turn every frame into plain bytes, as a socket would deliver them."""
    return [bytes(f) for f in encode(msg)]


def roundtrip(msg: Message) -> Message:
    return decode(wire(msg))


def header(
    op=int(Op.PUT),
    name="RELAY:x_f1",
    req=1,
    seq=2,
    epoch=3,
    stamp=4.5,
    length=1,
    reason="",
    info=None,
    dtype="",
    count=0,
) -> list:
    return [
        op,
        name,
        req,
        seq,
        epoch,
        stamp,
        length,
        reason,
        {} if info is None else info,
        dtype,
        count,
    ]


def packed(h) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def sample(dtype: str, n: int = 5) -> np.ndarray:
    if dtype == "|S40":
        return np.array([f"text {k}".encode() for k in range(n)], dtype="S40")
    return (np.arange(n) * 3 - 4).astype(dtype)


# -- round trips -----------------------------------------------------------------


def test_tag():
    assert PROTOCOL_TAG == b"CRL1"


@pytest.mark.parametrize("op", list(Op))
def test_roundtrip_without_data(op):
    msg = Message(
        op,
        "RELAY:temp_f1",
        req=7,
        seq=123456789,
        epoch=2**40,
        stamp=1700000000.25,
        length=3,
        reason="because",
        info={"pvs": 3, "rate": 1.5, "who": "shard-0"},
    )
    frames = wire(msg)
    assert len(frames) == 2
    assert frames[0] == PROTOCOL_TAG
    out = decode(frames)
    assert out == msg
    assert out.op is op
    assert out.data is None
    assert (out.name, out.req, out.seq, out.epoch, out.stamp, out.length) == (
        "RELAY:temp_f1",
        7,
        123456789,
        2**40,
        1700000000.25,
        3,
    )
    assert out.reason == "because"
    assert out.info == {"pvs": 3, "rate": 1.5, "who": "shard-0"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(Op))
def test_roundtrip_with_data(op, dtype):
    data = sample(dtype)
    msg = Message(op, "RELAY:x_F5", req=1, seq=2, epoch=3, stamp=4.0, length=5, data=data)
    frames = wire(msg)
    assert len(frames) == 3
    assert len(frames[2]) == data.nbytes
    out = decode(frames)
    assert out == msg
    assert out.data.dtype == np.dtype(dtype)
    assert out.data.tolist() == data.tolist()


def test_defaults_roundtrip():
    assert roundtrip(Message(Op.PING)) == Message(Op.PING)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_single_element_and_empty(dtype):
    one = sample(dtype, 1)
    assert roundtrip(Message(Op.PUT, "a", data=one)) == Message(Op.PUT, "a", data=one)
    empty = np.zeros(0, dtype=dtype)
    out = roundtrip(Message(Op.PUT, "a", data=empty))
    assert out.data is not None
    assert out.data.dtype == np.dtype(dtype)
    assert out.data.size == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_one_million_elements(dtype):
    if dtype == "|S40":
        data = np.full(1_000_000, b"x" * 40, dtype="S40")
        data[123_456] = b"needle"
    else:
        data = (np.arange(1_000_000) % 251).astype(dtype)
    msg = Message(Op.SNAPSHOT, "RELAY:big_F1000000", length=1_000_000, data=data)
    out = roundtrip(msg)
    assert out.data.shape == (1_000_000,)
    assert out.data.dtype == np.dtype(dtype)
    assert np.array_equal(out.data, data)
    assert out == msg


def test_roundtrip_non_contiguous_array():
    base = np.arange(20, dtype="<f8")
    out = roundtrip(Message(Op.PUT, "a", data=base[::3]))
    assert out.data.tolist() == base[::3].tolist()


def test_two_dimensional_array_is_flattened():
    data = np.arange(6, dtype="<i4").reshape(2, 3)
    out = roundtrip(Message(Op.PUT, "a", data=data))
    assert out.data.tolist() == [0, 1, 2, 3, 4, 5]


def test_float_special_values_roundtrip():
    data = np.array([math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308], dtype="<f8")
    out = roundtrip(Message(Op.PUT, "a", stamp=math.inf, data=data))
    assert out.data.tobytes() == data.tobytes()
    nan = roundtrip(Message(Op.PUT, "a", data=np.array([math.nan])))
    assert math.isnan(nan.data[0])


def test_decode_accepts_memoryview_and_bytearray_frames():
    msg = Message(Op.UPDATE, "a", seq=9, data=sample("<i4"))
    frames = encode(msg)
    assert decode(list(frames)) == msg
    assert decode([bytearray(bytes(f)) for f in frames]) == msg


def test_decode_accepts_zmq_frames():
    zmq = pytest.importorskip("zmq")
    msg = Message(Op.UPDATE, "a", seq=9, data=sample("<f8"))
    assert decode([zmq.Frame(bytes(f)) for f in encode(msg)]) == msg


@pytest.mark.parametrize("dtype", [">f8", "<f4", "<i8", "|b1", "<U10", "|S10", ">i4"])
def test_encode_refuses_disallowed_dtype(dtype):
    with pytest.raises(ProtocolError, match="dtype"):
        encode(Message(Op.PUT, "a", data=np.zeros(2, dtype=dtype)))


def test_message_equality():
    a = Message(Op.PUT, "a", data=np.array([1.0]))
    assert a == Message(Op.PUT, "a", data=np.array([1.0]))
    assert a != Message(Op.PUT, "a", data=np.array([2.0]))
    assert a != Message(Op.PUT, "a", data=np.array([1], dtype="<i4"))
    assert a != Message(Op.PUT, "a")
    assert a != Message(Op.PUT, "b", data=np.array([1.0]))
    assert Message(Op.PUT, seq=1) != Message(Op.PUT, seq=2)
    assert Message(Op.PUT, info={"a": 1}) != Message(Op.PUT, info={"a": 2})


# -- decode refusals ---------------------------------------------------------------


def refused(frames, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frames)
    assert type(info.value) is ProtocolError


@pytest.mark.parametrize("tag", [b"CRL2", b"", b"crl1", b"CRL1\x00", b"XXXX"])
def test_wrong_tag(tag):
    refused([tag, packed(header())], "tag")


@pytest.mark.parametrize("n", [0, 1, 4, 5])
def test_wrong_number_of_frames(n):
    frames = [PROTOCOL_TAG, packed(header()), b"", b"", b""][:n]
    refused(frames, "frames")


def test_header_declares_data_but_no_data_frame():
    refused([PROTOCOL_TAG, packed(header(dtype="<f8", count=1))], "no data frame")


@pytest.mark.parametrize(
    "raw",
    [b"\xc1", b"", b"\x9b", b"\x9b\x02", packed(header()) + b"\x00", b"\xdd\xff\xff\xff\xff"],
)
def test_header_not_msgpack(raw):
    refused([PROTOCOL_TAG, raw], "malformed|header")


def test_header_too_large():
    refused([PROTOCOL_TAG, packed(header(name="x" * 70_000))], "too large")


@pytest.mark.parametrize(
    "h",
    [
        header()[:10],
        header() + [0],
        [],
        {"op": 2},
        2,
        "header",
        None,
    ],
)
def test_header_wrong_shape(h):
    refused([PROTOCOL_TAG, packed(h)], "header")


@pytest.mark.parametrize("op", [0, 7, 9, 19, 99, -1, 2**40, "PUT", None, 2.5, [2]])
def test_unknown_op(op):
    refused([PROTOCOL_TAG, packed(header(op=op))], "operation|malformed")


@pytest.mark.parametrize("field", ["req", "seq", "epoch", "length"])
@pytest.mark.parametrize("value", [-1, -(2**63), 1.0, "1", True, None])
def test_bad_integer_fields(field, value):
    refused([PROTOCOL_TAG, packed(header(**{field: value}))], field)


def test_negative_seq():
    refused([PROTOCOL_TAG, packed(header(seq=-5))], "seq")


@pytest.mark.parametrize("stamp", [1, "now", None, True])
def test_bad_stamp(stamp):
    refused([PROTOCOL_TAG, packed(header(stamp=stamp))], "stamp")


@pytest.mark.parametrize(("field", "value"), [("name", 1), ("name", b"x"), ("reason", None)])
def test_bad_text_fields(field, value):
    refused([PROTOCOL_TAG, packed(header(**{field: value}))], "text")


@pytest.mark.parametrize("info", [[1, 2], "x", 3, {1: 2}])
def test_bad_info(info):
    refused([PROTOCOL_TAG, packed(header(info=info))], "info|malformed")


@pytest.mark.parametrize(("dtype", "count"), [(1, 0), (None, 0), ("<f8", "1"), ("<f8", 1.0)])
def test_bad_dtype_or_count_types(dtype, count):
    refused([PROTOCOL_TAG, packed(header(dtype=dtype, count=count)), b"\x00" * 8], "dtype")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta", [-1, 1])
def test_data_frame_size_not_matching_count(dtype, delta):
    itemsize = np.dtype(dtype).itemsize
    frame = b"\x00" * (3 * itemsize + delta)
    refused([PROTOCOL_TAG, packed(header(dtype=dtype, count=3)), frame], "data frame holds")


@pytest.mark.parametrize("dtype", DTYPES)
def test_data_frame_whole_elements_but_wrong_count(dtype):
    itemsize = np.dtype(dtype).itemsize
    frame = b"\x00" * (4 * itemsize)
    refused([PROTOCOL_TAG, packed(header(dtype=dtype, count=3)), frame], "data frame holds")
    refused([PROTOCOL_TAG, packed(header(dtype=dtype, count=5)), frame], "data frame holds")


@pytest.mark.parametrize("count", [100_000_000, 10**12, 2**63 - 1, 2**64 - 1])
def test_huge_declared_count_with_tiny_frame(count):
    refused([PROTOCOL_TAG, packed(header(dtype="<f8", count=count)), b"\x00" * 8], "count|data")


@pytest.mark.parametrize("count", [-1, -(2**63)])
def test_negative_count(count):
    refused([PROTOCOL_TAG, packed(header(dtype="<f8", count=count)), b""], "count")


@pytest.mark.parametrize("dtype", [">f8", "<f4", "f8", "float64", "O", "|O", "<U10", "|S39", "V8"])
def test_disallowed_dtype(dtype):
    refused([PROTOCOL_TAG, packed(header(dtype=dtype, count=1)), b"\x00" * 8], "dtype")


@pytest.mark.parametrize("frame", [b"", b"\x00" * 8])
def test_data_frame_without_dtype(frame):
    refused([PROTOCOL_TAG, packed(header(dtype="", count=0)), frame], "without a dtype")


def test_non_list_frames():
    refused(None, "malformed")
    refused([1, 2], "malformed|tag")
    refused([PROTOCOL_TAG, 5], "malformed")


# -- property tests ------------------------------------------------------------------

_uint = st.integers(min_value=0, max_value=2**64 - 1)
_finite = st.floats(allow_nan=False)
_info_value = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1), _finite, st.text(max_size=20)
)
_data = st.one_of(
    st.none(),
    st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(
            np.dtype(dt),
            st.integers(min_value=0, max_value=50),
            elements={"allow_nan": False} if dt == "<f8" else None,
        )
    ),
)
_messages = st.builds(
    Message,
    op=st.sampled_from(list(Op)),
    name=st.text(max_size=60),
    req=_uint,
    seq=_uint,
    epoch=_uint,
    stamp=_finite,
    length=_uint,
    reason=st.text(max_size=60),
    info=st.dictionaries(st.text(max_size=10), _info_value, max_size=6),
    data=_data,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages)
def test_property_roundtrip(msg):
    out = roundtrip(msg)
    assert out == msg
    if msg.data is not None:
        assert out.data.dtype == msg.data.dtype
        assert out.data.tobytes() == msg.data.tobytes()


def _decode_only_protocol_error(frames) -> None:
    # Anything but ProtocolError propagates and fails the test.
    with contextlib.suppress(ProtocolError):
        decode(frames)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_property_random_frames_only_protocol_error(frames):
    _decode_only_protocol_error(frames)


@settings(max_examples=500, deadline=None)
@given(
    header_bytes=st.binary(max_size=128),
    data=st.lists(st.binary(max_size=64), max_size=2),
)
def test_property_random_header_after_valid_tag_only_protocol_error(header_bytes, data):
    _decode_only_protocol_error([PROTOCOL_TAG, header_bytes, *data])


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


@settings(max_examples=200, deadline=None)
@given(
    replaced=st.dictionaries(st.integers(0, 10), _msgpack_values, min_size=1, max_size=3),
    frame=st.one_of(st.none(), st.binary(max_size=100)),
)
def test_property_random_header_fields_only_protocol_error(replaced, frame):
    fields = header(dtype="<f8", count=2)
    for index, value in replaced.items():
        fields[index] = value
    frames = [PROTOCOL_TAG, packed(fields)]
    if frame is not None:
        frames.append(frame)
    _decode_only_protocol_error(frames)


@settings(max_examples=300, deadline=None)
@given(msg=_messages, flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255))))
def test_property_corrupted_valid_messages_only_protocol_error(msg, flips):
    frames = [bytearray(f) for f in wire(msg)]
    for pos, value in flips:
        frame = frames[1 + pos % (len(frames) - 1)]
        if frame:
            frame[pos % len(frame)] = value
    _decode_only_protocol_error([bytes(f) for f in frames])


# -- batches -------------------------------------------------------------------------


def batch_wire(msgs) -> list[bytes]:
    return [bytes(f) for f in encode_batch(msgs)]


def test_batch_roundtrip_mixed_sizes():
    msgs = [
        Message(Op.PUT, "R:a_f1", req=1, data=np.array([1.5])),
        Message(Op.PING, req=2),
        Message(Op.PUT, "R:b_F100000", req=3, data=np.arange(100_000, dtype="<f8")),
        Message(Op.SET_FIELD, "R:a_f1", req=4, info={"field": "EGU", "value": "degC"}),
        Message(Op.PUT, "R:c_c10", req=5, data=np.frombuffer(b"hello", dtype="|u1")),
        Message(Op.PUT, "R:d_F9000", req=6, data=np.ones(9000)),
    ]
    frames = batch_wire(msgs)
    assert frames[0].startswith(BATCH_TAG)
    # The two arrays over INLINE_MAX travel as frames of their own; the rest inline.
    assert len(frames) == 3
    out = decode_batch(frames)
    assert out == msgs
    assert [m.data.dtype if m.data is not None else None for m in out] == [
        m.data.dtype if m.data is not None else None for m in msgs
    ]


def test_decode_batch_reads_a_single_message_too():
    msg = Message(Op.PUT, "R:a_f1", req=7, data=np.array([2.0]))
    assert decode_batch(wire(msg)) == [msg]


def test_batches_cut_by_count_and_bytes():
    small = [Message(Op.PUT, f"R:{k}_f1", req=k, data=np.zeros(1)) for k in range(2500)]
    assert [len(b) for b in batches(small)] == [1000, 1000, 500]
    big = [Message(Op.PUT, "R:a_F400000", req=k, data=np.zeros(100_000)) for k in range(3)]
    assert [len(b) for b in batches(big)] == [1, 1, 1]
    assert batches([]) == []


def _good_batch() -> list[bytes]:
    return batch_wire(
        [
            Message(Op.PUT, "R:a_f1", req=1, data=np.array([1.0])),
            Message(Op.PUT, "R:b_F10000", req=2, data=np.zeros(10_000)),
        ]
    )


def batch_refused(frames, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_batch(frames)


def test_batch_missing_data_frame():
    batch_refused(_good_batch()[:1], "more data frames")


def test_batch_extra_data_frame():
    batch_refused([*_good_batch(), b"\0" * 8], "too many")


def test_batch_without_header_frame():
    batch_refused([BATCH_TAG], "needs a header")


@pytest.mark.parametrize("headers", [[], {}, 5, [[1, 2, 3]], [header() + [None]] * 3000])
def test_batch_header_wrong_shape(headers):
    batch_refused([BATCH_TAG + packed(headers)], "batch|malformed")


def test_batch_inline_not_bytes():
    batch_refused([BATCH_TAG + packed([header(dtype="<f8", count=1) + ["12345678"]])], "inline")


def test_batch_with_one_bad_entry_is_refused_whole():
    good = header(dtype="<f8", count=1) + [b"\0" * 8]
    bad = header(dtype="<f8", count=2) + [b"\0" * 8]  # declares 16 bytes, carries 8
    batch_refused([BATCH_TAG + packed([good, good, bad, good])], "declares")


def _decode_batch_only_protocol_error(frames) -> None:
    with contextlib.suppress(ProtocolError):
        decode_batch(frames)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages, min_size=1, max_size=8))
def test_property_batch_roundtrip(msgs):
    assert decode_batch(batch_wire(msgs)) == msgs


@settings(max_examples=300, deadline=None)
@given(
    header_bytes=st.binary(max_size=128),
    data=st.lists(st.binary(max_size=64), max_size=3),
)
def test_property_random_batch_header_only_protocol_error(header_bytes, data):
    _decode_batch_only_protocol_error([BATCH_TAG + header_bytes, *data])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.one_of(_messages, st.deferred(lambda: _runs)), min_size=1, max_size=4),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255))),
    runs=st.booleans(),
)
def test_property_corrupted_batches_only_protocol_error(items, flips, runs):
    """Batches of messages and WRITE runs, with bytes flipped, read by a receiver that
    takes runs (the shard) or not (the broker)."""
    frames = [bytearray(f) for f in batch_wire(items)]
    for pos, value in flips:
        frame = frames[pos % len(frames)]
        if frame:
            frame[pos % len(frame)] = value
    with contextlib.suppress(ProtocolError):
        decode_batch([bytes(f) for f in frames], runs=runs)


# -- runs of one-element WRITEs -------------------------------------------------------


def _run(dtype: str, items) -> WriteRun:
    run = WriteRun(np.dtype(dtype))
    for name, req, stamp, value in items:
        run.add(name, req, stamp, np.array([value], dtype=dtype))
    return run


def test_a_write_run_is_one_entry_and_decodes_column_by_column():
    run = _run("<f8", [("R:a_f1", 0, 1.5, 1.0), ("R:b_f1", 7, 2.5, -2.0), ("R:a_f1", 0, 3.5, 3.0)])
    texts = _run("|S40", [("R:t_s1", 0, 4.0, b"hello")])
    msgs = [Message(Op.PING, req=1), run, texts, Message(Op.PUT, "R:c_f2", data=np.ones(2))]
    frames = batch_wire(msgs)
    assert len(frames) == 1
    headers = msgpack.unpackb(frames[0][len(BATCH_TAG) :])
    assert len(headers) == 4 and headers[1][:4] == [int(Op.WRITE), "<f8", run.names, [0, 7, 0]]
    out = decode_batch(frames, runs=True)
    assert out[0] == msgs[0] and out[3] == msgs[3]
    got = out[1]
    assert isinstance(got, WriteRun) and len(got) == 3
    assert got.names == ["R:a_f1", "R:b_f1", "R:a_f1"] and got.reqs == [0, 7, 0]
    assert got.stamps == [1.5, 2.5, 3.5] and got.values.tolist() == [1.0, -2.0, 3.0]
    assert got.values.dtype == np.dtype("<f8")
    assert out[2].values.tolist() == [b"hello"]
    # As single messages, the run is the WRITEs it stands for.
    assert (
        got.messages()
        == run.messages()
        == [
            Message(Op.WRITE, "R:a_f1", stamp=1.5, data=np.array([1.0])),
            Message(Op.WRITE, "R:b_f1", req=7, stamp=2.5, data=np.array([-2.0])),
            Message(Op.WRITE, "R:a_f1", stamp=3.5, data=np.array([3.0])),
        ]
    )


def test_a_receiver_that_takes_no_runs_refuses_them():
    frames = batch_wire([_run("<f8", [("R:a_f1", 0, 1.0, 1.0)])])
    batch_refused(frames, "expected fields")


def test_batches_count_the_puts_of_a_run():
    run = _run("<f8", [(f"R:{k}_f1", 0, 1.0, k) for k in range(600)])
    single = [Message(Op.PUT, "R:a_f1", data=np.zeros(1))] * 500
    assert [len(b) for b in batches([run, *single])] == [401, 100]


def test_a_run_of_a_dtype_not_allowed_is_not_sent():
    with pytest.raises(ProtocolError, match="not allowed"):
        encode_batch([_run("<f4", [("R:a_f1", 0, 1.0, 1.0)])])


def _run_entry(**changes) -> list:
    entry = {
        "op": int(Op.WRITE),
        "dtype": "<f8",
        "names": ["R:a_f1", "R:b_f1"],
        "reqs": [0, 3],
        "stamps": np.array([1.0, 2.0]).tobytes(),
        "values": np.array([5.0, 6.0]).tobytes(),
    }
    entry.update(changes)
    return list(entry.values())


def run_refused(entry, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_batch([BATCH_TAG + packed([entry])], runs=True)


def test_a_well_formed_run_entry_decodes():
    (run,) = decode_batch([BATCH_TAG + packed([_run_entry()])], runs=True)
    assert run.names == ["R:a_f1", "R:b_f1"] and run.values.tolist() == [5.0, 6.0]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"op": int(Op.PUT)}, "a run of operation"),
        ({"op": True}, "a run of operation"),
        ({"dtype": "<f4"}, "not allowed"),
        ({"dtype": 8}, "not allowed"),
        ({"names": "R:a_f1"}, "must be lists"),
        ({"reqs": {"a": 1}}, "must be lists"),
        ({"names": [], "reqs": []}, "as many"),
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
    ],
)
def test_a_malformed_run_entry_is_refused(changes, match):
    run_refused(_run_entry(**changes), match)


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
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_messages, _runs), min_size=1, max_size=6))
def test_property_batches_with_runs_roundtrip(items):
    out = decode_batch(batch_wire(items), runs=True)
    assert len(out) == len(items)
    for got, sent in zip(out, items, strict=True):
        if isinstance(sent, WriteRun):
            assert got.messages() == sent.messages()
        else:
            assert got == sent
