"""WANTED: each front-end hears which PVs another front-end follows, and sends its plain
puts to those at once, the rest in batches (shard/follow.py, ShardLink.queue_write).

The shard side: front-ends A, B and C say HELLO with ``follow`` to a real ShardServer,
whose sends a socket records.  The broker side: a ShardLink without a socket."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from carelay.broker.link import ShardLink
from carelay.common.messages import Follow, Hello, Put, Wanted, Write
from carelay.shard.server import ShardServer
from tests.unit.recording_router import batch as _batch
from tests.unit.recording_router import recorded_shard

PREFIX = "W:"
A, B, C = b"front-end A", b"front-end B", b"front-end C"
X, Y = f"{PREFIX}x_f1", f"{PREFIX}y_f1"


@pytest.fixture
def server(tmp_path):
    return recorded_shard(tmp_path, PREFIX, {p: Hello(1, "", p.decode(), True) for p in (A, B, C)})


def _wanted(server: ShardServer, peer: bytes) -> list[tuple[str, bool]]:
    """The WANTED ``peer`` was sent since the last look."""
    got = [(m.name, m.on) for m in server._sock.to(peer) if type(m) is Wanted]
    server._sock.sent = [(p, msgs) for p, msgs in server._sock.sent if p != peer]
    return got


def _follow(server: ShardServer, peer: bytes, name: str, on: bool = True) -> None:
    _batch(server, peer, [Follow(0, name, on)])


def test_each_front_end_hears_when_another_follows_a_pv_and_when_none_does(server):
    _follow(server, A, X)
    assert _wanted(server, A) == []  # its own follow is nothing to it
    assert _wanted(server, B) == _wanted(server, C) == [(X, True)]
    _follow(server, B, X)
    assert _wanted(server, A) == [(X, True)]  # B follows it now
    assert _wanted(server, B) == _wanted(server, C) == []
    _follow(server, A, X, False)
    assert _wanted(server, B) == [(X, False)]  # nobody else follows it any longer
    assert _wanted(server, A) == _wanted(server, C) == []  # B still does
    _follow(server, B, X, False)
    assert _wanted(server, A) == _wanted(server, C) == [(X, False)]


def test_a_front_end_that_follows_again_what_it_follows_tells_nobody(server):
    _follow(server, A, X)
    _wanted(server, B), _wanted(server, C)
    _follow(server, A, X)
    assert _wanted(server, B) == _wanted(server, C) == []
    assert server.admission.follows.count == 1


def test_a_new_front_end_hears_what_the_others_follow_before_its_snapshot(server):
    _follow(server, A, X)
    d = b"front-end D"
    _batch(server, d, [Hello(1, "", "d", True)])
    got = server._sock.to(d)
    assert got[0] == Wanted(X, True, server.epoch)
    assert type(got[1]).__name__ == "SnapshotBegin"


def test_a_front_end_that_goes_away_lets_go_what_it_followed(server):
    _follow(server, A, X)
    _follow(server, A, Y)
    _wanted(server, B), _wanted(server, C)
    _batch(server, b"front-end A, reconnected", [Hello(2, "", A.decode(), True)])
    assert sorted(_wanted(server, B)) == [(X, False), (Y, False)]


def test_a_front_end_that_follows_nothing_makes_every_put_wanted(server):
    e = b"front-end E"
    _batch(server, e, [Hello(1, "", "e", False)])  # hears of every change
    assert _wanted(server, A) == _wanted(server, B) == [("", True)]
    server.admission.drop(e)
    server._send_replies()
    assert _wanted(server, A) == _wanted(server, B) == [("", False)]


def test_a_put_is_published_only_to_the_front_ends_that_hear_of_it(server):
    _batch(server, A, [Put(X, 1, 0.0, np.array([0.0])), Put(Y, 2, 0.0, np.array([0.0]))])
    _follow(server, B, X)
    server._sock.sent.clear()
    _batch(server, A, [Write(X, 0, 0.0, np.array([1.0])), Write(Y, 0, 0.0, np.array([2.0]))])
    updated = [n for m in server._sock.to(B) for n in getattr(m, "names", [m.name])]
    assert updated == [X]
    assert server._sock.to(C) == []  # follows neither
    follows = server.admission.follows
    assert follows.heard(A, X) and not follows.heard(B, X) and not follows.heard(A, Y)


# -- the broker side ------------------------------------------------------------------


@pytest.fixture
def link():
    return ShardLink(zmq.Context.instance(), 0, "inproc://none")


def test_a_plain_put_to_a_wanted_pv_goes_at_once_the_others_wait(link):
    link.queue_write(Y, 0, 0.0, np.array([1.0]))
    assert not link.urgent
    link.wanted.take(X, True)
    link.queue_write(X, 0, 0.0, np.array([2.0]))
    assert link.urgent
    link.send_queued()  # no socket: dropped
    link.wanted.take(X, False)
    link.queue_write(X, 0, 0.0, np.array([3.0, 4.0]))  # an array too
    assert not link.urgent


def test_every_pv_is_wanted_while_a_front_end_hears_every_change(link):
    link.wanted.take("", True)
    assert X in link.wanted and Y in link.wanted
    link.wanted.take("", False)
    assert X not in link.wanted


def test_a_new_hello_forgets_what_was_wanted(link):
    link.wanted.take(X, True)
    link.wanted.take("", True)
    link.hello_sent()  # the shard tells it all again
    assert X not in link.wanted
