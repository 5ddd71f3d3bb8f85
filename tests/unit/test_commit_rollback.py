"""A commit that fails undoes exactly what it could not save, and says so exactly.

A creation, a deletion or a field change is answered only once it is durable; when the
store cannot be written, it is undone and refused.  What else the same batch did stays as
it was told: a value put answered as applied stays applied (and is saved once the store
heals), one answered as refused is not applied, and every front-end's mirror ends up as
the shard holds the PV.
"""

from __future__ import annotations

import numpy as np
import pytest

from carelay.common.messages import (
    Ack,
    Delete,
    FieldChanged,
    Hello,
    Put,
    Reject,
    SetField,
    Update,
)
from carelay.common.protocol import encode_batch
from tests.unit.driven_shard import PREFIX, handle, shard_with_store
from tests.unit.shard_peers import handed
from tests.unit.test_autosave_faults import _broken, _saved, _write

A, B = b"front-end A", b"front-end B"
#: The peer ``handle`` speaks as (it made the fixture's PVs), served too.
FIRST = b"b"
PEERS = (A, B, FIRST)
SCALAR = f"{PREFIX}a_f1"
BUFFER = f"{PREFIX}b_F4"


@pytest.fixture
def server(tmp_path):
    s = shard_with_store(tmp_path)
    handle(s, Put(SCALAR, 1, 0.0, np.array([1.0])), Put(BUFFER, 2, 0.0, np.array([1.0])))
    yield s
    s.autosave.close()
    s.db.close()


def _kinds(out) -> list[tuple[str, int]]:
    return [(type(m).__name__, m.req) for m in out]


def _healed_and_stopped(server, monkeypatch) -> dict:
    """The store writable again, a clean stop: what it holds."""
    monkeypatch.undo()
    assert server.autosave.stop(), "the stop left values unsaved"
    return _saved(server.db.path)


def test_a_refused_deletion_keeps_the_held_value_to_be_saved(server, monkeypatch):
    """A value put while the disk is full is held; a deletion refused then must not drop
    it from what the autosave writes once the disk has room again."""
    _broken(server, monkeypatch)
    handle(server, _write(SCALAR, 2.0))
    assert _kinds(handle(server, Delete(SCALAR, 3))) == [("Reject", 3)]
    assert server.store.get(SCALAR).tolist() == [2.0]
    assert SCALAR in server.store.dirty
    assert _healed_and_stopped(server, monkeypatch)[SCALAR] == [2.0]


def test_a_put_answered_before_a_refused_field_change_stays_applied(server, monkeypatch):
    _broken(server, monkeypatch)
    out = handle(server, _write(SCALAR, 5.0, req=10), SetField(SCALAR, 11, "EGU", "mm"))
    assert _kinds(out) == [("Ack", 10), ("Reject", 11)]
    assert "autosave failed" in out[1].reason
    assert server.store.get(SCALAR).tolist() == [5.0]
    assert server.store.fields(SCALAR) == {}
    assert _healed_and_stopped(server, monkeypatch)[SCALAR] == [5.0]


def test_puts_after_a_refused_field_change_stay_applied_and_answered(server, monkeypatch):
    """The buffer's appended element and the scalar's plain put (which the broker's mirror
    shows already) are kept; only the field change is undone."""
    _broken(server, monkeypatch)
    out = handle(
        server,
        SetField(BUFFER, 12, "DESC", "x"),
        Put(BUFFER, 13, 0.0, np.array([9.0])),
        SetField(SCALAR, 14, "EGU", "mm"),
        _write(SCALAR, 7.0),
    )
    assert _kinds(out) == [("Reject", 12), ("Update", 13), ("Reject", 14)]
    assert server.store.get(BUFFER).tolist() == [1.0, 9.0]
    assert server.store.get(SCALAR).tolist() == [7.0]
    assert server.store.fields(BUFFER) == {} and server.store.fields(SCALAR) == {}
    saved = _healed_and_stopped(server, monkeypatch)
    assert saved == {SCALAR: [7.0], BUFFER: [1.0, 9.0]}


def test_a_refused_field_change_brings_back_the_fields_it_replaced(server, monkeypatch):
    handle(server, SetField(SCALAR, 3, "EGU", "V"))
    _broken(server, monkeypatch)
    out = handle(server, SetField(SCALAR, 4, "EGU", "mm"), SetField(SCALAR, 5, "PREC", 3))
    assert _kinds(out) == [("Reject", 4), ("Reject", 5)]
    assert server.store.fields(SCALAR) == {"EGU": "V"}


def test_a_field_change_then_a_deletion_refused_undo_both_and_keep_the_puts_between(
    server, monkeypatch
):
    _broken(server, monkeypatch)
    out = handle(
        server,
        SetField(SCALAR, 3, "EGU", "mm"),
        _write(SCALAR, 4.0, req=4),
        Delete(SCALAR, 5),
    )
    assert _kinds(out) == [("Reject", 3), ("Ack", 4), ("Reject", 5)]
    assert server.store.get(SCALAR).tolist() == [4.0]
    assert server.store.fields(SCALAR) == {}
    assert _healed_and_stopped(server, monkeypatch)[SCALAR] == [4.0]


def test_a_refused_creation_refuses_the_puts_that_followed_it(server, monkeypatch):
    new = f"{PREFIX}new_F4"
    _broken(server, monkeypatch)
    out = handle(server, Put(new, 3, 0.0, np.array([1.0])), Put(new, 4, 0.0, np.array([2.0])))
    assert _kinds(out) == [("Reject", 3), ("Reject", 4)]
    assert new not in server.store and new not in server.store.dirty


def test_a_refused_deletion_and_recreation_bring_the_pv_back_to_all(server, monkeypatch):
    """Front-end A deletes and puts again (a re-creation); B, which had the PV, writes
    through its mirror in the same batch.  All of it is undone: both hear how it stands."""
    for peer, broker in ((A, "a"), (B, "b")):
        server.handle(peer, encode_batch([Hello(1, "", broker)]))
    server._out.clear()
    _broken(server, monkeypatch)
    server.handle(A, encode_batch([Delete(SCALAR, 3), Put(SCALAR, 4, 0.0, np.array([8.0]))]))
    out = handed(server, B, [_write(SCALAR, 9.0, req=5)], PEERS)
    assert [(type(m), m.req) for m in out[A][:2]] == [(Reject, 3), (Reject, 4)]
    assert (type(out[B][0]), out[B][0].req) == (Reject, 5)
    assert server.store.get(SCALAR).tolist() == [1.0]
    for peer in (A, B):
        restated = [m for m in out[peer] if type(m) is Update]
        assert restated, f"{peer!r} was not told how {SCALAR} stands"
        assert restated[-1].reset and restated[-1].req == 0
        assert restated[-1].data.tolist() == [1.0]


def test_every_request_is_answered_when_a_follower_hears_none_of_it(tmp_path, monkeypatch):
    """A's only fellow front-end, B, follows PVs (a PVA front-end), not this one: the puts
    published to nobody must not lend their identity to the answers a failed commit looks
    at (each request gets its answer, not silence until A's deadline)."""
    server = shard_with_store(tmp_path)
    try:
        server.handle(A, encode_batch([Hello(1, "", "a")]))
        server.handle(B, encode_batch([Hello(1, "", "b", follow=True)]))
        handed(server, A, [Put(SCALAR, 1, 0.0, np.array([1.0]))], (A, B))
        _broken(server, monkeypatch)
        reqs = list(range(100, 110))
        msgs = [Put(SCALAR, r, 0.0, np.array([float(r)])) for r in reqs]
        out = handed(server, A, [*msgs, SetField(SCALAR, 999, "EGU", "mm")], (A, B))
        assert sorted(m.req for m in out[A]) == [*reqs, 999]
        assert [type(m) for m in out[A]] == [Update] * len(reqs) + [Reject]
        assert server.store.get(SCALAR).tolist() == [109.0]
        assert out[B] == []
    finally:
        server.autosave.close()
        server.db.close()


def test_a_refused_field_change_is_not_published_and_the_put_beside_is(server, monkeypatch):
    """The other front-end hears the value put that stays, not the field change undone."""
    for peer, broker in ((A, "a"), (B, "b")):
        server.handle(peer, encode_batch([Hello(1, "", broker)]))
    server._out.clear()
    _broken(server, monkeypatch)
    out = handed(
        server,
        A,
        [SetField(SCALAR, 3, "EGU", "mm"), Put(SCALAR, 4, 0.0, np.array([6.0]))],
        PEERS,
    )
    assert [(type(m), m.req) for m in out[A]] == [(Reject, 3), (Update, 4)]
    assert [type(m) for m in out[B]] == [Update]
    assert out[B][0].data.tolist() == [6.0]
    assert not any(type(m) in (FieldChanged, Ack) for m in out[B])
