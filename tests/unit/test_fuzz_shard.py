"""Fuzzing the shard's message handler (``ShardServer.handle``) with hypothesis.

No socket: each message goes straight into ``handle(peer, frames)`` as a batch of its
own, the replies collect in ``server._out`` as the serve loop would send them after
``_commit``.  Whatever arrives — random bytes, batch entries with random fields,
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
from carelay.common.messages import (
    KINDS,
    Ack,
    Delete,
    Deleted,
    FieldChanged,
    Hello,
    Message,
    Ping,
    Put,
    Reject,
    SetField,
    Update,
    Write,
)
from carelay.common.naming import parse_pv_name
from carelay.common.protocol import BATCH_TAG, WRITE_RUN, decode_batch, encode_batch
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
_field_names = st.sampled_from([*FIELDS, "VAL", "RES", "BOGUS", ""])
_arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), st.integers(min_value=0, max_value=MAX_ELEMENTS + 4))
)
_floats = st.floats(allow_nan=False)
#: Requests a broker sends, and now and then a message only a shard sends.
_valid_messages = st.one_of(
    st.builds(Put, _names, _uint, _floats, _arrays, st.booleans(), _floats),
    st.builds(Put, _names, _uint, _floats, _arrays),
    st.builds(Write, _names, _uint, _floats, _arrays),
    st.builds(SetField, _names, _uint, _field_names, _values),
    st.builds(Delete, _names, _uint),
    st.builds(Hello, _uint, st.text(max_size=8), st.text(max_size=8)),
    st.builds(Ping, _uint),
    st.builds(Reject, _uint, _names, st.text(max_size=20)),
    st.builds(Ack, _names, _uint, _uint),
).map(lambda msg: [bytes(f) for f in encode_batch([msg])])


def _entry_frames(draw) -> list[bytes]:
    """A batch of one entry whose fields are drawn at random, one by one, and sometimes
    a data frame of a size that may or may not fit it."""
    kind = draw(st.one_of(st.sampled_from([*KINDS, WRITE_RUN]), _values))
    dtype = draw(st.one_of(st.sampled_from([*DTYPES, "", ">f8", "O", "<f4"]), _values))
    count = draw(
        st.one_of(
            st.integers(min_value=-2, max_value=MAX_ELEMENTS + 4),
            st.sampled_from([10**8, 10**8 + 1, 2**40, 2**63]),
            _values,
        )
    )
    data = [dtype, count, draw(st.one_of(st.none(), st.binary(max_size=64)))]
    fields = [
        kind,
        *draw(
            st.lists(
                st.one_of(_names, _uint, _floats, st.booleans(), _values, st.just(data)),
                max_size=10,
            )
        ),
    ]
    frames = [
        draw(st.sampled_from([BATCH_TAG, BATCH_TAG, b"CRB1", b"", b"crb2"]))
        + msgpack.packb([fields], use_bin_type=True)
    ]
    if draw(st.booleans()):
        if dtype in DTYPES and isinstance(count, int) and 0 <= count <= 64 and draw(st.booleans()):
            size = count * np.dtype(dtype).itemsize
        else:
            size = draw(st.integers(min_value=0, max_value=200))
        frames.append(draw(st.binary(min_size=size, max_size=size)))
    return frames


#: Well-formed requests aimed at the stored PVs: the ones most likely to change them.
_seeded_names = st.sampled_from(list(SEED))
_aimed_values = st.one_of(_special, _special, _scalars)
_aimed_messages = st.one_of(
    st.builds(Put, _seeded_names, _uint, _floats, _arrays),
    st.builds(Write, _seeded_names, _uint, _floats, _arrays),
    st.builds(Write, _seeded_names, _uint, _floats, _arrays),
    st.builds(SetField, _seeded_names, _uint, st.sampled_from([*FIELDS, "VAL"]), _aimed_values),
    st.builds(SetField, _seeded_names, _uint, st.sampled_from([*FIELDS, "VAL"]), _aimed_values),
    st.builds(Delete, _seeded_names, _uint),
).map(lambda msg: [bytes(f) for f in encode_batch([msg])])
_random_frames = st.lists(st.binary(max_size=64), max_size=4)
_messages = st.one_of(
    _random_frames,
    st.composite(lambda draw: _entry_frames(draw))(),
    _valid_messages,
    _aimed_messages,
    # a valid message cut short or with a frame too many
    _valid_messages.flatmap(
        lambda frames: st.sampled_from(
            [frames[:0], [frames[0][:-1]], [*frames, b"extra"], [frames[0] + b"\x00"]]
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
        server.handle(b"fuzzer", encode_batch([Put(name, k, 0.0, value)]))
    for name, stored in SEED_FIELDS.items():
        for field, value in stored.items():
            server.handle(b"fuzzer", encode_batch([SetField(name, 99, field, value)]))
    server._commit()
    assert all(type(msg) in (Update, FieldChanged) for _, msg in server._out), server._out
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


def _replay_write(model: dict, fields: dict, msg: Write) -> None:
    """Apply a WRITE the shard took without a word (it answers only a refusal or an ACK)."""
    assert msg.name in model, f"WRITE to {msg.name}, which does not exist, taken"
    spec = _spec(msg.name)
    data = clip_to_drive_limits(
        FieldResolver(PREFIX, {}).effective(spec, fields[msg.name]), msg.data.reshape(-1)
    )
    _apply_put(model, msg.name, spec, data)


def _replay(model: dict, fields: dict, msg: Message, restate: bool) -> None:
    """Apply one acknowledgement of the shard to the model of its store (``restate``: it
    follows the refusal of a WRITE)."""
    if restate:
        # After a refused WRITE: how the PV stands, which the model must agree with.
        if type(msg) is Deleted:
            assert msg.restate, msg
            assert msg.name not in model, f"{msg.name} restated as gone, but it exists"
        else:
            assert type(msg) is Update and msg.name in model and msg.req == 0, msg
            assert model[msg.name].tobytes() == msg.data.tobytes(), (msg, model[msg.name])
        return
    if type(msg) is Update:
        spec = _spec(msg.name)
        before = model.get(msg.name)
        if msg.created:
            assert before is None, f"{msg.name} created twice"
            fields[msg.name] = {}
        else:
            assert before is not None, f"UPDATE of {msg.name}, which does not exist"
        _apply_put(model, msg.name, spec, msg.data, msg.reset)
    elif type(msg) is Deleted:
        assert not msg.restate, msg
        assert msg.name in model, f"DELETED {msg.name}, which does not exist"
        del model[msg.name]
        del fields[msg.name]
    elif type(msg) is FieldChanged:
        assert msg.name in model, f"FIELD of {msg.name}, which does not exist"
        fields[msg.name][msg.field] = msg.value


def _feed(server: ShardServer, batches: list) -> None:
    """Feed every batch, commit after each as the serve loop does, and check the
    replies against a model of the store built from the acknowledgements."""
    model = {name: server.store.get(name).copy() for name in server.store.names()}
    fields = {name: server.store.fields(name) for name in model}
    last_seq = server.store.seq
    for batch in batches:
        # WRITEs taken silently, by the number of replies that came before them.
        writes: dict[int, list[Write]] = {}
        # The replies that restate a PV after a refused WRITE, by their place.
        restated: set[int] = set()
        for frames in batch:
            start = len(server._out)
            server.handle(b"fuzzer", frames)
            with contextlib.suppress(Exception):
                (msg,) = decode_batch(frames)
                replies = [type(m) for _, m in server._out[start:]]
                if type(msg) is Write:
                    if Reject in replies:
                        restated.add(start + replies.index(Reject) + 1)
                    else:
                        writes.setdefault(start, []).append(msg)
        server._commit()
        for k, (_, msg) in enumerate([*server._out, (None, None)]):
            for write in writes.get(k, ()):
                _replay_write(model, fields, write)
            if msg is None:
                break
            # What the serve loop would send must be a message the broker can read.
            (again,) = decode_batch([bytes(f) for f in encode_batch([msg])])
            assert type(again) is type(msg)
            assert getattr(again, "name", None) == getattr(msg, "name", None)
            if type(msg) in (Update, Deleted, FieldChanged):
                restate = k in restated
                if restate:
                    assert msg.seq >= last_seq, (msg, last_seq)
                else:
                    assert msg.seq > last_seq, (msg, last_seq)
                    last_seq = msg.seq
                _replay(model, fields, msg, restate)
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
                    acked.add(decode_batch(frames)[0].name)
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
        encode_batch([SetField(name, 1, field, value)])
        for name in [*SEED, "F:new_f1"]
        for field in [*FIELDS, "VAL", "BOGUS", ""]
        for value in EDGE_VALUES
    ]
    batch += [encode_batch([Delete("F:a_f1", 2)])]
    batch += [encode_batch([Put("F:a_f1", 3, 0.0, np.array([float("nan")]))])]
    _feed(server, [batch])
    assert np.isnan(server.store.get("F:a_f1")[0])
    assert server.store.fields("F:a_f1") == {}


def test_known_bad_messages_are_dropped_and_change_nothing(tmp_path, caplog):
    """A few hand-made cases, so that a failure says plainly what broke."""
    server = _seeded(tmp_path)
    before = {name: server.store.get(name).copy() for name in SEED}

    def put(data) -> bytes:
        return msgpack.packb([[Put.KIND, "F:a_f1", 1, 0.0, data, False, 0.0]])

    bad = [
        [b"\x00\x01garbage"],
        [BATCH_TAG],
        [b"CRB1" + put(["<f8", 1, None]), b"\0" * 8],
        [BATCH_TAG + put(["<f8", 10**8, None])],
        [BATCH_TAG + put(["<f8", 2**40, None]), b"x"],
        [BATCH_TAG + put(["<f8", 1, None]), b"\0" * 7],
        [BATCH_TAG + put(None)],  # a put without data
        [BATCH_TAG + b"\xc1"],
    ]
    for frames in bad:
        server.handle(b"fuzzer", frames)
    assert caplog.text.count("dropped a malformed message") == len(bad)
    # Well-formed requests that the store must refuse.
    refused = [
        Put("F:a_f1", 1, 0.0, np.array([1, 2], dtype="<i4")),  # wrong dtype
        Put("F:b_f4", 2, 0.0, np.arange(5.0)),  # more than count
        Put("F:a_f1", 3, 0.0, np.zeros(0)),  # no elements
        SetField("F:a_f1", 5, "PREC", float("inf")),
        SetField("F:a_f1", 6, "PREC", float("nan")),
        SetField("F:a_f1", 7, "HHSV", float("-inf")),
        SetField("F:a_f1", 8, "HIHI", "high"),
        SetField("F:d_c10", 9, "HIHI", 1.0),
        SetField("F:a_f1", 10, "NELM", 3),
        Delete("F:nothing_f1", 11),
        Put("F:big_f17", 12, 0.0, np.zeros(1)),
    ]
    for msg in refused:
        server.handle(b"fuzzer", encode_batch([msg]))
    server._commit()
    replies = [msg for _, msg in server._out]
    assert [type(m) for m in replies] == [Reject] * len(refused), replies
    assert [m.req for m in replies] == [m.req for m in refused]
    for name, value in before.items():
        assert server.store.get(name).tobytes() == value.tobytes(), name
    assert server.store.fields("F:a_f1") == SEED_FIELDS["F:a_f1"]
