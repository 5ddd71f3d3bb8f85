"""Each CA circuit's channels, counted from both of its streams (broker/castream.py): a
CREATE_CHAN past ``max_channels`` is never read, and only what PCAS confirms frees room."""

from __future__ import annotations

import ctypes
import errno
import socket

import caproto as ca
import pytest

from carelay.broker.castream import TooManyChannels
from carelay.common.config import load_config
from tests.unit.test_denied_streams import Circuit as Streams

DOUBLE = ca.ChannelType.DOUBLE


class Circuit(Streams):
    """A circuit of at most ``limit`` channels, each to R:x_f1."""

    def __init__(self, limit: int, denied: bool = False, cut: int = 0) -> None:
        super().__init__(cut, denied=denied, limit=limit)

    def ask(self, cid: int) -> None:
        self.client(ca.CreateChanRequest(name="R:x_f1", cid=cid, version=13))

    def made(self, cid: int, sid: int) -> None:
        self.server(
            ca.AccessRightsResponse(cid=cid, access_rights=3),
            ca.CreateChanResponse(data_type=DOUBLE, data_count=1, cid=cid, sid=sid),
        )

    def channel(self, cid: int, sid: int) -> None:
        self.open("R:x_f1", cid, sid)

    def clear(self, cid: int, sid: int) -> None:
        self.client(ca.ClearChannelRequest(sid=sid, cid=cid))
        self.server(ca.ClearChannelResponse(sid=sid, cid=cid))


def _full() -> Circuit:
    """A circuit at its limit of 2 channels (server ids 11 and 12)."""
    c = Circuit(2)
    c.channel(1, 11)
    c.channel(2, 12)
    return c


@pytest.mark.parametrize("cut", [0, 1, 15, 16, 17, 30])
@pytest.mark.parametrize("denied", [False, True])
def test_the_channel_past_the_limit_is_refused_however_the_stream_is_cut(cut, denied):
    c = Circuit(3, denied, cut)
    for k in range(3):
        c.channel(cid=k, sid=100 + k)
    with pytest.raises(TooManyChannels, match=r"more than 3 channels .*max_channels"):
        c.ask(cid=3)


def test_requests_not_yet_answered_count():
    """A client that sends its CREATE_CHANs in one burst is stopped within the burst."""
    c = Circuit(2)
    c.ask(1)
    c.ask(2)
    with pytest.raises(TooManyChannels):
        c.ask(3)


def test_cleared_channels_make_room_for_ever():
    c = Circuit(2)
    for k in range(50):
        c.channel(cid=k, sid=1000 + k)
        c.clear(cid=k, sid=1000 + k)
    c.channel(cid=98, sid=2098)
    c.channel(cid=99, sid=2099)
    assert c.channels.open == 2


def test_a_clearing_makes_room_for_the_channel_asked_for_after_it():
    """PCAS handles a circuit's messages in order: a CREATE_CHAN read with the clearing
    before it, before PCAS has confirmed the clearing, fits."""
    c = _full()
    c.client(
        ca.ClearChannelRequest(sid=11, cid=1),
        ca.CreateChanRequest(name="R:x_f1", cid=3, version=13),
    )
    assert c.channels.open == 2
    c.server(ca.ClearChannelResponse(sid=11, cid=1))  # the echo, later
    assert c.channels.open == 2
    with pytest.raises(TooManyChannels):
        c.ask(4)


def test_clearing_ids_that_pcas_does_not_hold_makes_no_room():
    """PCAS confirms the clearing of an unknown id too: that is no channel gone."""
    c = _full()
    for sid in (13, 14, 99):
        c.clear(1, sid)  # a real cid, a made-up sid
    with pytest.raises(TooManyChannels):
        c.ask(3)


def test_refused_and_dropped_channels_make_room():
    c = Circuit(2)
    c.channel(1, 11)
    c.ask(2)
    c.server(ca.CreateChFailResponse(cid=2))
    c.ask(3)
    c.made(3, 13)
    c.server(ca.ServerDisconnResponse(cid=1))  # its PV deleted
    assert c.channels.open == 1
    c.channel(4, 14)
    with pytest.raises(TooManyChannels):
        c.ask(5)


def test_a_client_id_used_twice_counts_twice():
    """PCAS makes a channel for each CREATE_CHAN, whatever its client id."""
    c = Circuit(2)
    c.channel(1, 11)
    c.channel(1, 12)
    with pytest.raises(TooManyChannels):
        c.ask(1)


def test_without_access_security_names_are_kept_but_no_rights():
    c = Circuit(10)
    c.channel(1, 11)
    assert c.channels.names == {1: "R:x_f1"}
    assert c.channels.read_only == set() and c.channels.open == 1


def test_no_limit_counts_without_refusing():
    c = Circuit(0)
    c.channels.limit = None
    for k in range(100):
        c.ask(k)
    assert c.channels.open == 100


def test_the_default_is_four_channels_per_pv_at_least_a_thousand():
    assert load_config(max_pvs=10_000).channel_limit == 40_000
    assert load_config(max_pvs=10).channel_limit == 1000
    assert load_config(max_pvs=10, max_channels=5).channel_limit == 5


def _recv_through_hook(fd: int, size: int = 4096) -> tuple[int, int]:
    """``sockethooks._recv`` as PCAS calls it: (what it returns, errno)."""
    from carelay.broker import sockethooks

    buf = ctypes.create_string_buffer(size)
    n = sockethooks._recv(fd, ctypes.addressof(buf), size, 0)
    return n, sockethooks._libc.__errno_location().contents.value  # as the C caller sees it


def test_the_hook_closes_a_circuit_past_the_limit_and_says_so(monkeypatch):
    from carelay.broker import sockethooks

    closed = []
    monkeypatch.setattr(sockethooks, "_max_channels", 2)
    monkeypatch.setattr(sockethooks, "_on_denied", None)
    monkeypatch.setattr(sockethooks, "_on_channel_limit", lambda *a: closed.append(a))
    server, client = socket.socketpair()
    with server, client:
        sockethooks._follow(server.fileno())
        client.sendall(b"".join(bytes(ca.CreateChanRequest("R:x_f1", k, 13)) for k in (1, 2)))
        assert _recv_through_hook(server.fileno())[0] > 0
        client.sendall(bytes(ca.CreateChanRequest("R:x_f1", 3, 13)))
        assert _recv_through_hook(server.fileno()) == (-1, errno.ECONNRESET)
        assert closed == [("", 2)]  # a socket pair has no IPv4 peer address
        assert server.fileno() not in sockethooks._circuits


def test_what_is_kept_of_a_circuit_goes_when_its_client_closes_it():
    from carelay.broker import sockethooks

    server, client = socket.socketpair()
    with server:
        sockethooks._follow(server.fileno())
        client.close()
        assert _recv_through_hook(server.fileno())[0] == 0
        assert server.fileno() not in sockethooks._circuits


def test_circuits_closed_for_what_they_sent_are_logged_within_a_budget(monkeypatch, caplog):
    """A client that reconnects and sends the same bad stream again and again cannot fill
    the log: C_LOG_LINES lines a window, the rest counted."""
    from carelay.broker import sockethooks
    from carelay.common.logbudget import LogBudget

    monkeypatch.setattr(sockethooks, "_rewrite_hosts", True)
    monkeypatch.setattr(sockethooks, "_max_channels", None)
    budget = LogBudget(2, 60.0, "{count} more", sockethooks.log)
    monkeypatch.setattr(sockethooks, "_closures", budget)
    host_name_without_payload = bytes(16)[:0] + b"\x00\x15" + bytes(14)
    for _ in range(5):
        server, client = socket.socketpair()
        with server, client:
            sockethooks._follow(server.fileno())
            client.sendall(host_name_without_payload[:4])
            assert _recv_through_hook(server.fileno())[0] == 4
            client.sendall(host_name_without_payload[4:])
            assert _recv_through_hook(server.fileno()) == (-1, errno.ECONNRESET)
    closing = [r for r in caplog.records if "closing a CA circuit" in r.getMessage()]
    assert len(closing) == 2 and budget.unlogged == 3
