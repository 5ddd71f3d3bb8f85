"""UPDATE_RUN: a shard's published one-element Updates as one entry (common/runs.py)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carelay.common.messages import Ack, Update
from carelay.common.protocol import (
    BATCH_TAG,
    UPDATE_RUN,
    ProtocolError,
    UpdateRun,
    batches,
    decode_batch,
    encode_batch,
)
from carelay.common.runs import update_runs


def _upd(name: str, value, dtype="<f8", seq=1, stamp=1.0, **kw) -> Update:
    return Update(name, kw.pop("req", 0), seq, stamp, np.array([value], dtype=dtype), **kw)


def _expanded(msgs: list) -> list:
    return [m for msg in msgs for m in (msg.messages() if type(msg) is UpdateRun else [msg])]


def _decoded(msgs: list) -> list:
    return decode_batch([bytes(f) for f in encode_batch(update_runs(msgs))])


def test_a_stretch_of_published_scalars_is_one_entry_and_decodes_in_order():
    msgs = [_upd(f"R:p{k}_f1", float(k), seq=10 + k, stamp=100.0 + k, epoch=7) for k in range(5)]
    frames = encode_batch(update_runs(msgs))
    assert len(frames) == 1
    entries = msgpack.unpackb(frames[0][len(BATCH_TAG) :])
    assert [e[0] for e in entries] == [UPDATE_RUN]
    (run,) = decode_batch(frames)
    assert type(run) is UpdateRun and len(run) == 5 and run.epoch == 7
    assert run.seqs == [10, 11, 12, 13, 14] and run.stamps == [100.0 + k for k in range(5)]
    assert run.value(3).tolist() == [3.0] and run.value(3).dtype == np.dtype("<f8")
    assert run.messages() == msgs


def test_what_a_run_cannot_carry_breaks_it_and_keeps_its_place():
    big = Update("R:arr_f3", 0, 4, 1.0, np.array([1.0, 2.0, 3.0]))
    msgs = [
        _upd("R:a_f1", 1.0),
        _upd("R:b_f1", 2.0),
        _upd("R:c_f1", 3.0, req=9),  # an answer, not a publication
        _upd("R:d_i1", 4, dtype="<i4"),
        _upd("R:e_i1", 5, dtype="<i4"),
        _upd("R:f_f1", 6.0),  # a lone one stays an Update
        _upd("R:g_F5", 7.0, reset=True),
        _upd("R:h_f1", 8.0, created=True),
        big,
        Ack("R:a_f1", 3, 5),
        _upd("R:s_s1", b"text", dtype="|S40"),
        _upd("R:t_s1", b"more", dtype="|S40"),
    ]
    coalesced = update_runs(msgs)
    assert [type(m).__name__ for m in coalesced] == [
        "UpdateRun",
        "Update",
        "UpdateRun",
        "Update",
        "Update",
        "Update",
        "Update",
        "Ack",
        "UpdateRun",
    ]
    assert _expanded(coalesced) == msgs
    assert _expanded(_decoded(msgs)) == msgs


def test_a_run_stops_at_a_new_epoch():
    msgs = [_upd("R:a_f1", 1.0, epoch=1), _upd("R:b_f1", 2.0, epoch=1)]
    msgs.append(_upd("R:c_f1", 3.0, epoch=2))
    coalesced = update_runs(msgs)
    assert [len(m) if type(m) is UpdateRun else 1 for m in coalesced] == [2, 1]
    assert _expanded(_decoded(msgs)) == msgs


def test_a_run_counts_its_updates_in_a_batch():
    run = UpdateRun(np.dtype("<f8"), 0)
    for k in range(600):
        run.add(_upd(f"R:p{k}_f1", float(k)))
    assert [len(b) for b in batches([run, run])] == [1, 1]


def _entry(**changes) -> list:
    e = {
        "kind": UPDATE_RUN,
        "dtype": "<f8",
        "names": ["R:a_f1", "R:b_f1"],
        "seqs": np.array([1, 2], dtype="<u8").tobytes(),
        "stamps": np.array([1.0, 2.0]).tobytes(),
        "values": np.array([5.0, 6.0]).tobytes(),
        "epoch": 3,
    }
    e.update(changes)
    return list(e.values())


def test_a_well_formed_update_run_entry_decodes():
    (run,) = decode_batch([BATCH_TAG + msgpack.packb([_entry()], use_bin_type=True)])
    assert run.names == ["R:a_f1", "R:b_f1"] and run.values.tolist() == [5.0, 6.0]
    assert run.seqs == [1, 2] and run.epoch == 3


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dtype": "<f4"}, "not allowed"),
        ({"dtype": None}, "not allowed"),
        ({"names": "R:a_f1"}, "list of names"),
        ({"names": []}, "list of names, and some"),
        ({"names": ["R:a_f1", 2]}, "text"),
        ({"seqs": np.array([1], dtype="<u8").tobytes()}, "seq per name"),
        ({"seqs": [1, 2]}, "seq per name"),
        ({"stamps": np.array([1.0]).tobytes()}, "stamp"),
        ({"values": np.array([5, 6], dtype="<i4").tobytes()}, "value per name"),
        ({"values": None}, "value per name"),
        ({"epoch": -1}, "epoch"),
        ({"epoch": 1.0}, "epoch"),
        ({"epoch": True}, "epoch"),
    ],
)
def test_a_malformed_update_run_entry_is_refused_whole(changes, match):
    good = encode_batch([Ack("R:a_f1", 3, 5)])
    frames = [BATCH_TAG + msgpack.packb([_entry(**changes)], use_bin_type=True)]
    with pytest.raises(ProtocolError, match=match):
        decode_batch(frames)
    assert decode_batch(good) == [Ack("R:a_f1", 3, 5)]  # the codec is left as it was


def test_an_update_run_entry_of_the_wrong_length_is_refused():
    with pytest.raises(ProtocolError, match="7 fields"):
        decode_batch([BATCH_TAG + msgpack.packb([_entry()[:6]], use_bin_type=True)])


_scalars = st.one_of(
    st.builds(lambda v: ("<f8", v), st.floats(allow_nan=False)),
    st.builds(lambda v: ("<i4", v), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda v: ("|S40", v), st.binary(max_size=40).map(lambda b: b.rstrip(b"\0"))),
)
_updates = st.builds(
    lambda name, seq, stamp, scalar, req, epoch: _upd(
        name, scalar[1], dtype=scalar[0], seq=seq, stamp=stamp, req=req, epoch=epoch
    ),
    st.text(min_size=1, max_size=12),
    st.integers(0, 2**64 - 1),
    st.floats(allow_nan=False),
    _scalars,
    st.sampled_from([0, 0, 0, 5]),
    st.sampled_from([0, 0, 1]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_updates, min_size=1, max_size=30))
def test_property_runs_change_nothing_but_the_wire(msgs):
    assert _expanded(update_runs(msgs)) == msgs
    assert _expanded(_decoded(msgs)) == msgs
