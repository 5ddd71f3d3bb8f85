"""ShardSync.drain: what it counts as work for the loop (a lone heartbeat answer is not)."""

from __future__ import annotations

from types import SimpleNamespace

from carelay.broker.sync import ShardSync
from carelay.common.messages import Ack, Pong


def _pong() -> Pong:
    return Pong(1, 5, pvs=0, store_error="", pid=1, puts=0, saved_at=0.0, flush={})


def _drained(batches: list) -> tuple[int, list]:
    sync = ShardSync.__new__(ShardSync)  # drain uses nothing but ``handle``
    handled: list = []
    sync.handle = lambda link, msg: handled.append(msg)
    link = SimpleNamespace(recv=iter([*batches, None]).__next__)
    return sync.drain(link), handled


def test_a_lone_heartbeat_answer_is_handled_but_not_counted_as_work():
    n, handled = _drained([[_pong()]])
    assert n == 0 and len(handled) == 1


def test_answers_count_and_a_pong_among_them_too():
    ack = Ack("a_f1", 7, 6)
    n, handled = _drained([[_pong()], [ack], [_pong(), ack]])
    assert n == 3
    assert [type(m) for m in handled] == [Pong, Ack, Pong, Ack]
