"""The PVA front-end's loop never frees a p4p operation (see broker/pva/channels.py).

Freeing a p4p ``ServerOperation`` waits for pvxs's server thread, which may itself be
waiting in ``makeChannel`` for the loop: freed on the loop, the two waited for each
other until the new channel was refused.  These tests play the two threads with an
operation that says on which thread it was freed.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("p4p")

from p4p.server.raw import ServOpWrap  # noqa: E402

from carelay.broker.pva import channels  # noqa: E402
from carelay.broker.pva.channels import Channel, free_operations  # noqa: E402
from carelay.broker.pva.front import PvaFrontEnd  # noqa: E402
from carelay.common.config import load_config  # noqa: E402


class Freed(list):
    """The names of the threads that freed operations, in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    def add(self, thread: str) -> None:
        with self.cond:
            self.append(thread)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self) >= n, timeout)


class FakeOp:
    """An operation that records the thread that freed it."""

    def __init__(self, freed: Freed) -> None:
        self.freed_on = freed
        self.told: list = []

    def done(self, value=None, error=None) -> None:
        self.told.append(error)

    def peer(self) -> str:
        return "127.0.0.1:5"

    def __del__(self) -> None:
        self.freed_on.add(threading.current_thread().name)


@pytest.fixture
def front(tmp_path):
    channels._freed.clear()
    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path)))
    yield f
    f.inbox.close()
    channels._freed.clear()


def _on(name: str, call) -> None:
    thread = threading.Thread(target=call, name=name)
    thread.start()
    thread.join()


def _waiting(freed: Freed) -> int:
    """How many of this test's operations (those that tell ``freed``) wait to be freed:
    an operation of an earlier test may join them when the collector frees its holder."""
    return sum(1 for op in channels._freed if getattr(op, "freed_on", None) is freed)


def _put(channel: Channel, op, got: list) -> None:
    """What pvxs's server thread does for a put: p4p's wrapper goes to ``_exec``."""
    channel._exec(op, lambda pv, o: got.append(o), channel, ServOpWrap(op, None, None))


def test_an_operation_the_loop_lets_go_is_freed_by_the_servers_thread(front):
    freed = Freed()
    channel = Channel(front, "P:a_f1")
    got: list = []
    _on("server", lambda: _put(channel, FakeOp(freed), got))
    _on("loop", front.inbox.run)
    (op,) = got
    assert not isinstance(op, ServOpWrap)  # p4p's wrapper stays on the server's thread
    assert op.peer() == "127.0.0.1:5"
    op.done(error="why")
    assert op.told == ["why"]

    def let_go() -> None:
        got.clear()  # the loop's last reference

    _on("loop", let_go)
    del op
    assert freed == []  # not on the loop: it waits to be freed
    assert _waiting(freed) == 1
    # The next put (the server's thread calls in) frees it there, and no other.
    _on("server", lambda: _put(channel, FakeOp(freed), got))
    assert freed == ["server"]
    assert len(channels._freed) == 0


def test_operations_left_waiting_are_freed_aside_at_a_sweep(front):
    freed = Freed()
    channel = Channel(front, "P:b_f1")
    got: list = []
    for _ in range(3):
        _on("server", lambda: _put(channel, FakeOp(freed), got))
    _on("loop", front.inbox.run)
    _on("loop", got.clear)
    assert freed == [] and _waiting(freed) == 3
    # No put comes to free them: the loop's sweep has the aside thread do it.
    channels.sweep()
    assert freed.wait(3)
    assert set(freed) == {"pva-aside"}


def test_an_empty_sweep_hands_nothing_aside(front, monkeypatch):
    handed: list = []
    monkeypatch.setattr(channels._aside, "_put", handed.append)
    free_operations()
    channels.sweep()
    assert handed == []


def test_operations_waiting_at_the_stop_are_freed_before_the_server_stops(front):
    freed = Freed()
    channels._freed.append(FakeOp(freed))
    free_operations()
    assert freed == ["MainThread"] and not channels._freed
