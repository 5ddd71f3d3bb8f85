"""The read gate: an answer that completes a put to a PV another front-end watches waits
until that front-end has shown the change, or is lagging.  And the APPLIED that orders a
broker's WRITEs among the others' changes: kept back until that broker is sent more.

No network: front-ends A (a CA broker) and W (a PVA front-end that watches) hand batches
to a real ShardServer; what it sends goes to a socket that records it.
"""

from __future__ import annotations

import numpy as np
import pytest

from carelay.common.messages import (
    Ack,
    Applied,
    Confirm,
    Delete,
    Deleted,
    Hello,
    Ping,
    Pong,
    Put,
    Shown,
    Update,
    Watch,
    Write,
)
from carelay.shard.server import ShardServer
from tests.unit.recording_router import batch as _batch
from tests.unit.recording_router import recorded_shard

PREFIX = "G:"
A, W, B = b"ca broker A", b"pva front-end W", b"ca broker B"
X, Y = f"{PREFIX}x_f1", f"{PREFIX}y_f1"


@pytest.fixture
def server(tmp_path):
    s = recorded_shard(
        tmp_path, PREFIX, {A: Hello(1, "", "a"), W: Hello(1, "", "w"), B: Hello(1, "", "b")}
    )
    _batch(s, A, [Put(X, 2, 0.0, np.array([0.0])), Put(Y, 3, 0.0, np.array([0.0]))])
    s._sock.sent.clear()
    return s


def _write(value: float, req: int, name: str = X) -> Write:
    return Write(name, req, 0.0, np.array([value]))


def _token(server: ShardServer, peer: bytes) -> int:
    """The token of the last CONFIRM sent to ``peer``."""
    return [m for m in server._sock.to(peer) if type(m) is Confirm][-1].token


def _kinds(msgs) -> list[str]:
    return [type(m).__name__ for m in msgs]


def test_an_answer_to_a_put_on_a_watched_pv_waits_until_the_watcher_showed_it(server):
    _batch(server, W, [Watch(0, X, True)])
    _batch(server, A, [_write(1.0, 7)])
    sock = server._sock
    # The watcher gets the change, then a CONFIRM; the writer's answer waits.
    assert _kinds(sock.to(W)) == ["Update", "Confirm"]
    assert [type(m) for m in sock.to(A)] == []
    assert server.gate.due() < float("inf")
    token = sock.to(W)[-1].token
    _batch(server, W, [Shown(0, token)])
    (ack, applied) = sock.to(A)
    assert type(ack) is Ack and ack.req == 7 and type(applied) is Applied
    assert server.gate.due() == float("inf")


def test_puts_to_pvs_nobody_watches_and_puts_without_callback_do_not_wait(server):
    _batch(server, W, [Watch(0, X, True)])
    _batch(server, A, [_write(1.0, 7, name=Y), _write(2.0, 0)])
    sock = server._sock
    assert _kinds(sock.to(A)) == ["Ack", "Applied"]
    assert "Confirm" not in _kinds(sock.to(W))
    # The watcher's own puts never wait for itself.
    _batch(server, W, [_write(3.0, 8)])
    assert [m.req for m in sock.to(W) if type(m) is Ack] == [8]


def test_what_follows_a_held_answer_waits_behind_it_in_order(server):
    _batch(server, W, [Watch(0, X, True)])
    _batch(server, A, [_write(1.0, 7)])
    # A's later answers and the changes of others wait too: A's stream keeps its order.
    _batch(server, A, [_write(2.0, 8, name=Y), Ping(9)])
    _batch(server, B, [_write(5.0, 0, name=Y)])
    assert server._sock.to(A) == []
    _batch(server, W, [Shown(0, _token(server, W))])
    got = server._sock.to(A)
    assert _kinds(got) == ["Ack", "Applied", "Ack", "Pong", "Applied", "Update"]
    assert [m.req for m in got if type(m) in (Ack, Pong)] == [7, 8, 9]
    assert got[-1].req == 0 and got[-1].data.tolist() == [5.0]


def test_a_second_put_waits_for_its_own_confirm(server):
    _batch(server, W, [Watch(0, X, True)])
    _batch(server, A, [_write(1.0, 7)])
    first = _token(server, W)
    _batch(server, A, [_write(2.0, 8)])
    second = _token(server, W)
    assert second > first
    _batch(server, W, [Shown(0, first)])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7]
    _batch(server, W, [Shown(0, second)])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7, 8]


def test_creations_and_deletions_wait_too(server):
    name = f"{PREFIX}new_f1"
    _batch(server, W, [Watch(0, name, True)])
    _batch(server, A, [Put(name, 7, 0.0, np.array([1.0]), callback=True)])
    assert server._sock.to(A) == []
    _batch(server, W, [Shown(0, _token(server, W))])
    (created,) = server._sock.to(A)
    assert type(created) is Update and created.created and created.req == 7
    _batch(server, A, [Delete(name, 8)])
    assert [type(m) for m in server._sock.to(A)] == [Update]
    _batch(server, W, [Shown(0, _token(server, W))])
    assert type(server._sock.to(A)[-1]) is Deleted


def test_a_watcher_that_does_not_answer_in_time_is_lagging_until_it_answers(server, caplog):
    gate = server.gate
    _batch(server, W, [Watch(0, X, True)])
    _batch(server, A, [_write(1.0, 7)])
    assert not gate.expire(gate.due() - 0.01)
    assert gate.expire(gate.due())
    server._send_replies()
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7]
    assert "did not show a change" in caplog.text
    # Lagging: a later answer goes at once, and the watcher is still asked to confirm.
    _batch(server, A, [_write(2.0, 8)])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7, 8]
    assert type(server._sock.to(W)[-1]) is Confirm
    # Its answer ends the lag: answers wait for it again.
    _batch(server, W, [Shown(0, _token(server, W))])
    _batch(server, A, [_write(3.0, 9)])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7, 8]


def test_a_watcher_gone_or_unwatching_holds_nothing(server):
    _batch(server, W, [Watch(0, X, True)])
    _batch(server, A, [_write(1.0, 7)])
    # W reconnects (a new connection of the same front-end): the old one is fenced.
    _batch(server, b"W again", [Hello(2, "", "w")])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7]
    assert server.gate.watches == {}
    _batch(server, b"W again", [Watch(0, X, True), Watch(0, X, False)])
    _batch(server, A, [_write(2.0, 8)])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7, 8]


def test_a_watcher_that_is_held_itself_gets_its_confirm_after_what_it_waits_for(server):
    # B watches Y, W watches X.  W's put to Y waits for B; A's put to X then waits for W,
    # whose stream is held: W's CONFIRM goes after the change it confirms, behind it.
    _batch(server, B, [Watch(0, Y, True)])
    _batch(server, W, [Watch(0, X, True)])
    _batch(server, W, [_write(1.0, 5, name=Y)])
    _batch(server, A, [_write(2.0, 7)])
    assert _kinds(server._sock.to(W)) == []
    _batch(server, B, [Shown(0, _token(server, B))])
    got = server._sock.to(W)
    assert _kinds(got) == ["Ack", "Applied", "Update", "Confirm"]
    assert got[2].data.tolist() == [2.0]
    _batch(server, W, [Shown(0, got[-1].token)])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7]


def test_a_lagging_watcher_that_answers_an_older_confirm_stays_lagging(server):
    gate = server.gate
    _batch(server, W, [Watch(0, X, True)])
    _batch(server, A, [_write(1.0, 7)])
    old = _token(server, W)
    gate.expire(gate.due())
    server._send_replies()
    _batch(server, A, [_write(2.0, 8)])
    newest = _token(server, W)
    # Still behind: it answers the CONFIRM from before its lag, not the newest one.
    _batch(server, W, [Shown(0, old)])
    _batch(server, A, [_write(3.0, 9)])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7, 8, 9]
    assert newest < _token(server, W)
    # Once it answers the newest CONFIRM it was sent, answers wait for it again.
    _batch(server, W, [Shown(0, _token(server, W))])
    _batch(server, A, [_write(4.0, 10)])
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7, 8, 9]


def test_every_answer_held_for_a_watcher_goes_once_it_is_lagging(server):
    gate = server.gate
    _batch(server, W, [Watch(0, X, True), Watch(0, Y, True)])
    _batch(server, A, [_write(1.0, 7)])
    _batch(server, B, [_write(2.0, 8, name=Y)])
    # A's answer expires first; B's, held for the same watcher, goes with it.
    assert gate.expire(gate.held[A][0].deadline)
    server._send_replies()
    assert [m.req for m in server._sock.to(A) if type(m) is Ack] == [7]
    assert [m.req for m in server._sock.to(B) if type(m) is Ack] == [8]
    assert gate.held == {}


# -- APPLIED kept back ----------------------------------------------------------------
# It goes to a broker only with the next message that broker is sent
# (Outbox._tell_applied): a broker that only writes wakes for nothing, and one sent
# another front-end's change still learns first how many of its WRITEs came before it.


def test_a_broker_that_only_writes_is_sent_nothing(server):
    _batch(server, A, [_write(1.0, 0)])
    _batch(server, A, [_write(2.0, 0), _write(3.0, 0, name=Y)])
    assert server._sock.to(A) == []


def test_another_brokers_change_comes_after_the_applied_of_the_writes_before_it(server):
    _batch(server, A, [_write(1.0, 0)])
    _batch(server, A, [_write(2.0, 0)])
    _batch(server, B, [_write(5.0, 0)])
    got = server._sock.to(A)
    assert _kinds(got) == ["Applied", "Update"]
    assert got[0].writes == 2
    assert type(got[1]) is Update and got[1].data.tolist() == [5.0]


def test_an_applied_kept_back_goes_with_the_next_answer(server):
    _batch(server, A, [_write(1.0, 0), _write(2.0, 0, name=Y)])
    _batch(server, A, [Ping(9)])
    got = server._sock.to(A)
    assert [type(m) for m in got] == [Applied, Pong]
    assert got[0].writes == 2 and got[1].req == 9


def test_an_applied_kept_back_is_not_sent_twice(server):
    _batch(server, A, [_write(1.0, 0)])
    _batch(server, A, [Ping(9)])
    _batch(server, A, [Ping(10)])
    assert _kinds(server._sock.to(A)) == ["Applied", "Pong", "Pong"]
