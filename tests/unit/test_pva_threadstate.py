"""p4p's threads keep their Python thread state between calls into a Channel.

p4p calls a Channel's handler from its own threads; a thread state made for one call
and deleted after it costs each PVA put a map and an unmap of its frame stack.  Seen
from Python: a ``threading.local`` set during one call is still there at the next.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("p4p")

from carelay.broker.pva.channels import Channel, _run  # noqa: E402
from tests.unit.p4p_loopback import served  # noqa: E402

_PUTS = 5


class _Front:
    """What a Channel asks of the front-end: an inbox (here run at once, on the p4p
    thread) and ``on_put``, which notes whether that thread was seen before."""

    def __init__(self) -> None:
        self.inbox = self
        self.local = threading.local()
        self.calls = self.seen_before = 0

    def push(self, call, *args) -> None:
        call(*args)

    def on_put(self, channel, op) -> None:
        self.calls += 1
        if getattr(self.local, "seen", False):
            self.seen_before += 1
        self.local.seen = True
        op.done()

    def on_first_connect(self, channel) -> None:
        pass

    def on_last_disconnect(self, channel) -> None:
        pass


def test_a_p4p_thread_keeps_its_state_between_puts():
    front = _Front()
    channel = Channel(front, "TS:x")
    channel.prepare("d", {"value": 0.0})
    assert channel.opening(timeout=1.0)
    with served([{"TS:x": channel}]) as ctx:
        for i in range(_PUTS):
            ctx.put("TS:x", float(i), timeout=5.0)
    assert front.calls == _PUTS
    # The first call makes the thread's state; every later one finds it.
    assert front.seen_before == _PUTS - 1


def test_run_fails_the_operation_on_an_error():
    class Op:
        error = None

        def done(self, error=None):
            self.error = error

    def broken():
        raise RuntimeError("boom")

    op = Op()
    _run(op, broken, ())
    assert op.error == "relay error: boom"
