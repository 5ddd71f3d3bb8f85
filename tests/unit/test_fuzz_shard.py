"""Fuzzing the shard's message handler (``ShardServer.handle``) with hypothesis.

No socket: each message goes straight into ``handle(peer, frames)``, the
replies collect in ``server._out`` as the serve loop would send them after
``_commit``.  Whatever arrives — random bytes, headers with random fields,
well-formed messages with random names, dtypes, sizes and field values —

- ``handle`` and ``_commit`` never raise;
- every reply encodes, and decodes again (the broker must be able to read it);
- the store changes only as the replies say: replaying the UPDATE, DELETED
  and FIELD replies, and the WRITEs the shard did not refuse (a WRITE is
  answered only when refused or when it asks for an ACK), over the PVs stored
  before gives exactly the store after.  A PV that got no such reply keeps its
  value and fields, and no PV appears without an UPDATE that says it was
  created; a refused WRITE is followed by a restatement of the PV that agrees
  with the model;
- with an autosave, what a reopened store loads is what the live store holds.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from carelay.common.config import load_config
from carelay.common.fields import FIELDS, FieldResolver, clip_to_drive_limits
from carelay.common.naming import parse_pv_name
from carelay.common.protocol import PROTOCOL_TAG, Message, Op, decode, encode
from carelay.shard.persist import ShardDatabase
from carelay.shard.server import ShardServer
from carelay.shard.store import ShardStore

PREFIX = "F:"
MAX_ELEMENTS = 16
MAX_NAME_LENGTH = 64
DTYPES = ["<f8", "<i4", "|u1", "|S40"]

#: PVs stored before any fuzzed message arrives, with their values.
SEED = {
    "F:a_f1": np.array([1.5]),
    "F:b_f4": np.array([1.0, 2.0, 3.0]),
    "F:c_i2": np.array([7, -7], dtype="<i4"),
    "F:d_c10": np.frombuffer(b"hello", dtype="u1"),
    "F:e_s1": np.array([b"text"], dtype="S40"),
    "F:g_F3": np.array([1.0, 2.0]),
    "F:h_I2": np.array([5], dtype="<i4"),
    "F:k_C5": np.frombuffer(b"abc", dtype="u1"),
}
SEED_FIELDS = {"F:a_f1": {"EGU": "degC", "HIHI": 30.0}, "F:g_F3": {"DESC": "a buffer"}}

NAMES = [
    *SEED,
    # new names that follow the rule
    "F:new_f1",
    "F:new_F3",
    "F:new_c4",
    "F:new_s1",
    "F:new_i2",
    "F:new_C2",
    # names that do not
    "F:bad",
    "",
    "other:x_f1",
    "F:x_f0",
    "F:big_f17",
    "F:x_S1",
    "F:" + "n" * 70 + "_f1",
    "F:a_f1.EGU",
    "F:caf\u00e9_f1",
]

_names = st.one_of(st.sampled_from(NAMES), st.text(max_size=20))
_uint = st.integers(min_value=0, max_value=2**64 - 1)
_int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _int64,
    st.floats(),
    st.text(max_size=50),
    st.binary(max_size=50),
    st.sampled_from(["MAJOR", "minor", "INVALID_ALARM", "degC", "", "1e400"]),
)
#: Values at the edges of what fields take: non-finite floats, 64-bit extremes, out of range.
_special = st.one_of(
    st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    st.sampled_from([2**64 - 1, -(2**63), -1, 0, 3, 17, 18, 2.5, 1e308, "x" * 41, "MAJOR"]),
)
_values = st.recursive(
    st.one_of(_special, _scalars),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=4,
)
_field_info = st.fixed_dictionaries(
    {
        "field": st.one_of(
            st.sampled_from([*FIELDS, "VAL", "RES", "BOGUS", ""]), _int64, st.none()
        ),
        "value": _values,
    }
)
_info = st.one_of(
    _field_info, st.dictionaries(st.text(max_size=8), _values, max_size=3), st.just({})
)
_arrays = st.one_of(
    st.none(),
    st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(np.dtype(dt), st.integers(min_value=0, max_value=MAX_ELEMENTS + 4))
    ),
)
_ops = st.one_of(
    st.sampled_from([Op.PUT, Op.PUT, Op.WRITE, Op.SET_FIELD, Op.DELETE]),
    st.sampled_from(list(Op)),
)
_valid_messages = st.builds(
    Message,
    op=_ops,
    name=_names,
    req=_uint,
    seq=_uint,
    epoch=_uint,
    stamp=st.floats(allow_nan=False),
    length=_uint,
    reason=st.text(max_size=20),
    info=_info,
    data=_arrays,
).map(lambda msg: [bytes(f) for f in encode(msg)])


def _header_frames(draw) -> list[bytes]:
    """A tag and a header list whose fields are drawn at random, one by one, and
    sometimes a data frame of a size that may or may not fit the header."""
    fields = [
        draw(st.one_of(st.sampled_from([int(op) for op in Op]), _values)),
        draw(st.one_of(_names, _values)),
        draw(st.one_of(_uint, _values)),
        draw(st.one_of(_uint, _values)),
        draw(st.one_of(_uint, _values)),
        draw(st.one_of(st.floats(), _values)),
        draw(st.one_of(_uint, _values)),
        draw(st.one_of(st.text(max_size=10), _values)),
        draw(st.one_of(_info, _values)),
        draw(st.one_of(st.sampled_from([*DTYPES, "", ">f8", "O", "<f4"]), _values)),
        draw(
            st.one_of(
                st.integers(min_value=-2, max_value=MAX_ELEMENTS + 4),
                st.sampled_from([10**8, 10**8 + 1, 2**40, 2**63]),
                _values,
            )
        ),
    ]
    if draw(st.booleans()):
        fields = draw(st.lists(_values, max_size=12))
    frames = [
        draw(st.sampled_from([PROTOCOL_TAG, PROTOCOL_TAG, b"CRL2", b"", b"crl1"])),
        msgpack.packb(fields, use_bin_type=True),
    ]
    dtype, count = fields[9] if len(fields) > 9 else None, fields[10] if len(fields) > 10 else 0
    if draw(st.booleans()):
        if dtype in DTYPES and isinstance(count, int) and 0 <= count <= 64 and draw(st.booleans()):
            size = count * np.dtype(dtype).itemsize
        else:
            size = draw(st.integers(min_value=0, max_value=200))
        frames.append(draw(st.binary(min_size=size, max_size=size)))
    return frames


#: Well-formed requests aimed at the stored PVs: the ones most likely to change them.
_aimed_messages = st.builds(
    Message,
    op=st.sampled_from([Op.PUT, Op.WRITE, Op.WRITE, Op.SET_FIELD, Op.SET_FIELD, Op.DELETE]),
    name=st.sampled_from(list(SEED)),
    req=_uint,
    info=st.fixed_dictionaries(
        {
            "field": st.sampled_from([*FIELDS, "VAL"]),
            "value": st.one_of(_special, _special, _scalars),
        }
    ),
    data=_arrays,
).map(lambda msg: [bytes(f) for f in encode(msg)])
_random_frames = st.lists(st.binary(max_size=64), max_size=4)
_messages = st.one_of(
    _random_frames,
    st.composite(lambda draw: _header_frames(draw))(),
    _valid_messages,
    _aimed_messages,
    # a valid message cut short or with a frame too many
    _valid_messages.flatmap(
        lambda frames: st.sampled_from(
            [frames[:1], frames[:2], [*frames, b"extra"], [frames[0], frames[1][:-1], *frames[2:]]]
        )
    ),
)
_batches = st.lists(st.lists(_messages, min_size=1, max_size=6), min_size=1, max_size=4)


def _config(data_dir: Path):
    return load_config(
        prefix=PREFIX,
        shards=1,
        data_dir=str(data_dir),
        max_elements=MAX_ELEMENTS,
        max_name_length=MAX_NAME_LENGTH,
    )


def _seeded(data_dir: Path, db: ShardDatabase | None = None) -> ShardServer:
    server = ShardServer(_config(data_dir), 0, db=db)
    server.load()
    for k, (name, value) in enumerate(SEED.items(), start=1):
        server.handle(b"seed", encode(Message(Op.PUT, name, req=k, data=value)))
    for name, stored in SEED_FIELDS.items():
        for field, value in stored.items():
            msg = Message(Op.SET_FIELD, name, req=99, info={"field": field, "value": value})
            server.handle(b"seed", encode(msg))
    server._commit()
    assert all(msg.op in (Op.UPDATE, Op.FIELD) for _, msg in server._out), server._out
    server._out.clear()
    return server


def _spec(name: str):
    return parse_pv_name(name, PREFIX, MAX_ELEMENTS, MAX_NAME_LENGTH)


def _apply_put(model: dict, name: str, spec, data: np.ndarray, reset: bool = False) -> None:
    before = model.get(name)
    if spec.is_buffer:
        old = np.zeros(0, spec.dtype) if before is None or reset else before
        model[name] = np.concatenate([old, data])[-spec.count :]
    else:
        model[name] = data.copy()


def _replay_write(model: dict, fields: dict, msg: Message) -> None:
    """Apply a WRITE the shard took without a word (it answers only a refusal or an ACK)."""
    assert msg.name in model, f"WRITE to {msg.name}, which does not exist, taken"
    spec = _spec(msg.name)
    data = clip_to_drive_limits(
        FieldResolver(PREFIX, {}).effective(spec, fields[msg.name]), msg.data.reshape(-1)
    )
    _apply_put(model, msg.name, spec, data)


def _replay(model: dict, fields: dict, msg: Message) -> None:
    """Apply one acknowledgement of the shard to the model of its store."""
    if msg.info.get("restate"):
        # After a refused WRITE: how the PV stands, which the model must agree with.
        if msg.op is Op.DELETED:
            assert msg.name not in model, f"{msg.name} restated as gone, but it exists"
        else:
            assert msg.op is Op.UPDATE and msg.name in model, msg
            assert model[msg.name].tobytes() == msg.data.tobytes(), (msg, model[msg.name])
        return
    if msg.op is Op.UPDATE:
        spec = _spec(msg.name)
        before = model.get(msg.name)
        if msg.info.get("created"):
            assert before is None, f"{msg.name} created twice"
            fields[msg.name] = {}
        else:
            assert before is not None, f"UPDATE of {msg.name}, which does not exist"
        _apply_put(model, msg.name, spec, msg.data, bool(msg.info.get("reset")))
    elif msg.op is Op.DELETED:
        assert msg.name in model, f"DELETED {msg.name}, which does not exist"
        del model[msg.name]
        del fields[msg.name]
    elif msg.op is Op.FIELD:
        assert msg.name in model, f"FIELD of {msg.name}, which does not exist"
        fields[msg.name][msg.info["field"]] = msg.info["value"]


def _feed(server: ShardServer, batches: list) -> None:
    """Feed every batch, commit after each as the serve loop does, and check the
    replies against a model of the store built from the acknowledgements."""
    model = {name: server.store.get(name).copy() for name in server.store.names()}
    fields = {name: server.store.fields(name) for name in model}
    last_seq = server.store.seq
    for batch in batches:
        # WRITEs taken silently, by the number of replies that came before them.
        writes: dict[int, list[Message]] = {}
        for frames in batch:
            start = len(server._out)
            server.handle(b"fuzzer", frames)
            with contextlib.suppress(Exception):
                msg = decode(frames)
                replies = [m.op for _, m in server._out[start:]]
                if msg.op is Op.WRITE and Op.REJECT not in replies:
                    writes.setdefault(start, []).append(msg)
        server._commit()
        for k, (_, msg) in enumerate([*server._out, (None, None)]):
            for write in writes.get(k, ()):
                _replay_write(model, fields, write)
            if msg is None:
                break
            # What the serve loop would send must be a message the broker can read.
            again = decode([bytes(f) for f in encode(msg)])
            assert again.op is msg.op and again.name == msg.name
            if msg.op in (Op.UPDATE, Op.DELETED, Op.FIELD):
                if msg.info.get("restate"):
                    assert msg.seq >= last_seq, (msg, last_seq)
                else:
                    assert msg.seq > last_seq, (msg, last_seq)
                    last_seq = msg.seq
                _replay(model, fields, msg)
        server._out.clear()
    store = server.store
    assert sorted(store.names()) == sorted(model)
    for name, expected in model.items():
        got = store.get(name)
        assert got.dtype == _spec(name).dtype, name
        assert got.tobytes() == expected.tobytes(), (name, got, expected)
        assert store.fields(name) == fields[name], name


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches=_batches)
def test_handler_never_raises_and_changes_only_what_it_acknowledges(batches):
    with tempfile.TemporaryDirectory() as tmp:
        server = _seeded(Path(tmp))
        before = {name: (server.store.get(name).copy(), server.store.fields(name)) for name in SEED}
        _feed(server, batches)
        # A seeded PV that is still there and got no acknowledged put kept its value:
        # _feed checked every PV against the acknowledgements; here the plain case.
        acked = set()
        for batch in batches:
            for frames in batch:
                with contextlib.suppress(Exception):
                    acked.add(decode(frames).name)
        for name, (value, stored) in before.items():
            if name not in acked:
                assert server.store.get(name).tobytes() == value.tobytes(), name
                assert server.store.fields(name) == stored, name


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches=_batches)
def test_autosave_holds_what_the_store_holds_after_fuzzing(batches):
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp))
        db = ShardDatabase(config.store_path(0))
        server = _seeded(Path(tmp), db)
        _feed(server, batches)
        server.autosave.flush()
        live = {name: (v.tobytes(), v.dtype, f) for name, _, v, f in server.store.snapshot()}
        db.close()
        reopened = ShardStore(PREFIX, MAX_ELEMENTS, MAX_NAME_LENGTH)
        db2 = ShardDatabase(config.store_path(0))
        try:
            assert reopened.load(db2.open()) == []
        finally:
            db2.close()
        saved = {name: (v.tobytes(), v.dtype, f) for name, _, v, f in reopened.snapshot()}
        assert saved == live


EDGE_VALUES = [
    float("inf"),
    float("-inf"),
    float("nan"),
    2**64 - 1,
    -(2**63),
    1e308,
    -1,
    0,
    2.5,
    18,
    True,
    None,
    "",
    "MAJOR",
    "x" * 41,
    b"\xff\xfe",
    [1, 2],
    {"a": 1},
]


def test_every_field_with_edge_values_to_every_pv(tmp_path):
    """Each field (and a few that do not exist) with each edge value, to each stored PV,
    then a delete and a re-creation: exhaustively, where the fuzzing only samples."""
    server = _seeded(tmp_path)
    batch = [
        encode(Message(Op.SET_FIELD, name, req=1, info={"field": field, "value": value}))
        for name in [*SEED, "F:new_f1"]
        for field in [*FIELDS, "VAL", "BOGUS", ""]
        for value in EDGE_VALUES
    ]
    batch += [encode(Message(Op.DELETE, "F:a_f1", req=2))]
    batch += [encode(Message(Op.PUT, "F:a_f1", req=3, data=np.array([float("nan")])))]
    _feed(server, [batch])
    assert np.isnan(server.store.get("F:a_f1")[0])
    assert server.store.fields("F:a_f1") == {}


def test_known_bad_messages_are_dropped_and_change_nothing(tmp_path, caplog):
    """A few hand-made cases, so that a failure says plainly what broke."""
    server = _seeded(tmp_path)
    before = {name: server.store.get(name).copy() for name in SEED}
    bad = [
        [b"\x00\x01garbage"],
        [PROTOCOL_TAG],
        [b"CRL2", msgpack.packb([2, "F:a_f1", 1, 0, 0, 0.0, 0, "", {}, "<f8", 1]), b"\0" * 8],
        [PROTOCOL_TAG, msgpack.packb([2, "F:a_f1", 1, 0, 0, 0.0, 0, "", {}, "<f8", 10**8])],
        [PROTOCOL_TAG, msgpack.packb([2, "F:a_f1", 1, 0, 0, 0.0, 0, "", {}, "<f8", 2**40]), b"x"],
        [PROTOCOL_TAG, msgpack.packb([2, "F:a_f1", 1, 0, 0, 0.0, 0, "", {}, "<f8", 1]), b"\0" * 7],
        [PROTOCOL_TAG, b"\xc1"],
    ]
    for frames in bad:
        server.handle(b"fuzzer", frames)
    assert caplog.text.count("dropped a malformed message") == len(bad)
    # Well-formed requests that the store must refuse.
    refused = [
        Message(Op.PUT, "F:a_f1", req=1, data=np.array([1, 2], dtype="<i4")),  # wrong dtype
        Message(Op.PUT, "F:b_f4", req=2, data=np.arange(5.0)),  # more than count
        Message(Op.PUT, "F:a_f1", req=3, data=np.zeros(0)),  # no elements
        Message(Op.PUT, "F:a_f1", req=4),  # no data at all
        Message(Op.SET_FIELD, "F:a_f1", req=5, info={"field": "PREC", "value": float("inf")}),
        Message(Op.SET_FIELD, "F:a_f1", req=6, info={"field": "PREC", "value": float("nan")}),
        Message(Op.SET_FIELD, "F:a_f1", req=7, info={"field": "HHSV", "value": float("-inf")}),
        Message(Op.SET_FIELD, "F:a_f1", req=8, info={"field": "HIHI", "value": "high"}),
        Message(Op.SET_FIELD, "F:d_c10", req=9, info={"field": "HIHI", "value": 1.0}),
        Message(Op.SET_FIELD, "F:a_f1", req=10, info={"field": "NELM", "value": 3}),
        Message(Op.DELETE, "F:nothing_f1", req=11),
        Message(Op.PUT, "F:big_f17", req=12, data=np.zeros(1)),
    ]
    for msg in refused:
        server.handle(b"fuzzer", encode(msg))
    server._commit()
    replies = [msg for _, msg in server._out]
    assert [m.op for m in replies] == [Op.REJECT] * len(refused), replies
    assert [m.req for m in replies] == [m.req for m in refused]
    for name, value in before.items():
        assert server.store.get(name).tobytes() == value.tobytes(), name
    assert server.store.fields("F:a_f1") == SEED_FIELDS["F:a_f1"]
