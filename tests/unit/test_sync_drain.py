"""ShardSync.drain: what it counts as work for the loop (a lone heartbeat answer is not)."""

from __future__ import annotations

from types import SimpleNamespace

from carelay.broker.sync import ShardSync
from carelay.common.messages import Ack, Pong


def _pong() -> Pong:
    return Pong(1, 5, pvs=0, store_error="", pid=1, puts=0, saved_at=0.0, flush={})


def _drained(batches: list, ready: bool = False, asked: list | None = None) -> tuple[int, list]:
    sync = ShardSync.__new__(ShardSync)  # drain uses nothing but ``handle``
    handled: list = []
    sync.handle = lambda link, msg: handled.append(msg)
    left = iter([*batches, None])
    asked = [] if asked is None else asked

    def recv(ready: bool = False):
        asked.append(ready)
        return next(left)

    return sync.drain(SimpleNamespace(recv=recv), ready=ready), handled


def test_a_lone_heartbeat_answer_is_handled_but_not_counted_as_work():
    n, handled = _drained([[_pong()]])
    assert n == 0 and len(handled) == 1


def test_answers_count_and_a_pong_among_them_too():
    ack = Ack("a_f1", 7, 6)
    n, handled = _drained([[_pong()], [ack], [_pong(), ack]])
    assert n == 3
    assert [type(m) for m in handled] == [Pong, Ack, Pong, Ack]


def test_a_poll_that_found_the_socket_readable_spares_the_first_receive_its_question():
    """``ready`` goes to the first receive alone: after it, the socket is asked again."""
    asked: list = []
    n, _ = _drained([[Ack("a_f1", 7, 6)], [Ack("a_f1", 8, 7)]], ready=True, asked=asked)
    assert n == 2 and asked == [True, False, False]
    asked.clear()
    _drained([[Ack("a_f1", 7, 6)]], asked=asked)
    assert asked == [False, False]
