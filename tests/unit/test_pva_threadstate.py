"""p4p's threads keep their Python thread state between calls into a Channel.

p4p calls a Channel's handler from its own threads; a thread state made for one call
and deleted after it costs each PVA put a map and an unmap of its frame stack.  Seen
from Python: a ``threading.local`` set during one call is still there at the next.
"""

from __future__ import annotations

import socket
import threading

import pytest

pytest.importorskip("p4p")

from p4p.client.thread import Context  # noqa: E402
from p4p.server import Server  # noqa: E402

from carelay.broker.pva.channels import Channel, _run  # noqa: E402

_PUTS = 5


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    udp = str(_free_udp_port())
    server_conf = {
        "EPICS_PVAS_SERVER_PORT": "0",
        "EPICS_PVAS_BROADCAST_PORT": udp,
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    }
    with Server(providers=[{"TS:x": channel}], conf=server_conf, useenv=False) as server:
        port = server.conf()["EPICS_PVAS_SERVER_PORT"]
        client_conf = {
            "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{port}",
            "EPICS_PVA_ADDR_LIST": "127.0.0.1",
            "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_BROADCAST_PORT": udp,
        }
        ctx = Context("pva", conf=client_conf, useenv=False)
        try:
            for i in range(_PUTS):
                ctx.put("TS:x", float(i), timeout=5.0)
        finally:
            ctx.close()
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
