"""A shard and a following broker: it is sent other front-ends' puts only to the PVs it
follows; creations, deletions and field changes go to it all the same (shard/follow.py).

No socket: peers hand batches to ``ShardServer.handle``; what the loop would send
collects in ``server._out``.
"""

from __future__ import annotations

import numpy as np
import pytest

from carelay.common.config import load_config
from carelay.common.messages import (
    Delete,
    Deleted,
    FieldChanged,
    Follow,
    Hello,
    Put,
    SetField,
    Update,
    Write,
)
from carelay.common.protocol import encode_batch
from carelay.shard.server import ShardServer
from tests.unit.shard_peers import handed

PREFIX = "F:"
A, B = b"following broker", b"other front-end"
X, Y = f"{PREFIX}x_f1", f"{PREFIX}y_f1"
BUF = f"{PREFIX}buf_F4"


@pytest.fixture
def server(tmp_path):
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path))
    s = ShardServer(config, 0)
    s.handle(A, encode_batch([Hello(1, "", "a", True)]))
    s.handle(B, encode_batch([Hello(1, "", "b")]))
    s._out.clear()
    return s


def _send(server: ShardServer, peer: bytes, msgs: list) -> dict[bytes, list]:
    """Hand ``msgs`` from ``peer`` to the shard; what each peer would be sent."""
    return handed(server, peer, msgs, (A, B))


def _values(msgs: list) -> list:
    return [(m.name, m.data.tolist()) for m in msgs if type(m) is Update]


def test_a_following_broker_hears_of_puts_only_to_what_it_follows(server):
    out = _send(server, B, [Put(X, 1, 0.0, np.array([1.0])), Put(Y, 2, 0.0, np.array([2.0]))])
    # Creations go to every front-end: they make its PV table.
    assert [(m.name, m.created) for m in out[A]] == [(X, True), (Y, True)]
    out = _send(server, B, [Write(X, 0, 0.0, np.array([3.0])), Write(Y, 0, 0.0, np.array([4.0]))])
    assert out[A] == []
    # Following X: answered with X as it stands now, then sent the puts to X alone.
    out = _send(server, A, [Follow(9, X, True)])
    (answer,) = out[A]
    assert (type(answer), answer.req, answer.reset) == (Update, 9, True)
    assert answer.data.tolist() == [3.0] and answer.seq == server.store.seq
    out = _send(server, B, [Write(X, 0, 0.0, np.array([5.0])), Write(Y, 0, 0.0, np.array([6.0]))])
    assert _values(out[A]) == [(X, [5.0])]
    # No longer followed: no longer sent.
    _send(server, A, [Follow(0, X, False)])
    out = _send(server, B, [Write(X, 0, 0.0, np.array([7.0]))])
    assert out[A] == []
    assert server.admission.follows.count == 0


def test_field_changes_and_deletions_reach_a_following_broker_all_the_same(server):
    _send(server, B, [Put(X, 1, 0.0, np.array([1.0]))])
    out = _send(server, B, [SetField(X, 2, "EGU", "mm")])
    assert [type(m) for m in out[A]] == [FieldChanged]
    out = _send(server, B, [Delete(X, 3)])
    assert [(type(m), m.name) for m in out[A]] == [(Deleted, X)]


def test_a_follow_of_a_pv_the_shard_does_not_hold_is_answered_as_deleted(server):
    (answer,) = _send(server, A, [Follow(4, X, True)])[A]
    assert (type(answer), answer.req, answer.restate) == (Deleted, 4, True)
    # Followed all the same: once it is made and put to, the broker hears of it.
    _send(server, B, [Put(X, 1, 0.0, np.array([1.0]))])
    out = _send(server, B, [Write(X, 0, 0.0, np.array([2.0]))])
    assert _values(out[A]) == [(X, [2.0])]


def test_a_followed_buffer_is_answered_whole_then_sent_what_is_appended(server):
    _send(server, B, [Put(BUF, 1, 0.0, np.array([1.0, 2.0]))])
    _send(server, B, [Put(BUF, 2, 0.0, np.array([3.0]))])
    (answer,) = _send(server, A, [Follow(5, BUF, True)])[A]
    assert answer.reset and answer.data.tolist() == [1.0, 2.0, 3.0]
    out = _send(server, B, [Put(BUF, 3, 0.0, np.array([4.0]))])
    assert _values(out[A]) == [(BUF, [4.0])]


def test_a_front_end_that_does_not_follow_hears_of_every_put(server):
    _send(server, A, [Put(X, 1, 0.0, np.array([1.0])), Put(Y, 2, 0.0, np.array([2.0]))])
    out = _send(server, A, [Write(X, 0, 0.0, np.array([3.0])), Write(Y, 0, 0.0, np.array([4.0]))])
    assert _values(out[B]) == [(X, [3.0]), (Y, [4.0])]
    # A FOLLOW from it is answered, and changes nothing of what it is sent.
    (answer,) = _send(server, B, [Follow(6, X, True)])[B]
    assert answer.req == 6 and answer.data.tolist() == [3.0]
    out = _send(server, A, [Write(Y, 0, 0.0, np.array([5.0]))])
    assert _values(out[B]) == [(Y, [5.0])]


def test_a_broker_that_reconnects_follows_nothing_until_it_says_so(server):
    _send(server, B, [Put(X, 1, 0.0, np.array([1.0]))])
    _send(server, A, [Follow(7, X, True)])
    again = b"following broker, new connection"
    server.handle(again, encode_batch([Hello(2, "", "a", True)]))
    server._out.clear()
    assert server.admission.follows.count == 0  # the old connection's follows went
    server.handle(B, encode_batch([Write(X, 0, 0.0, np.array([2.0]))]))
    server._commit()
    # Neither connection of the following broker hears of it (its sender is told how
    # many of its WRITEs are applied).
    assert [peer for peer, _ in server._out] == [B]
    server._out.clear()
    server.handle(again, encode_batch([Follow(8, X, True)]))
    server.handle(B, encode_batch([Write(X, 0, 0.0, np.array([3.0]))]))
    server._commit()
    assert [(peer, m.req, m.data.tolist()) for peer, m in server._out if peer != B] == [
        (again, 8, [2.0]),
        (again, 0, [3.0]),
    ]
