"""Puts refused for want of write access, as a circuit's two CA streams show them
(broker/castream.py), and how the broker bounds what it records of them."""

from __future__ import annotations

import ctypes
import logging
import socket
import struct

import caproto as ca
import pytest

from carelay.broker.access import ACCESS_DENIED, address_token, token_address
from carelay.broker.castream import Channels, ClientStream, ServerStream
from carelay.broker.errorlog import error_line
from carelay.broker.refusals import client_address
from carelay.broker.sockethooks import DeniedPuts

DOUBLE = ca.ChannelType.DOUBLE


def wire(*commands) -> bytes:
    return b"".join(bytes(c) for c in commands)


class Circuit:
    """Both streams of one circuit, fed in reads cut at ``cut``.  ``denied``: the puts
    refused for want of write access are recorded in ``self.denied`` (rights followed);
    ``limit`` and ``refused`` as Channels takes them."""

    def __init__(
        self, cut: int = 0, *, denied: bool = True, limit: int | None = None, refused=None
    ) -> None:
        self.denied: list[tuple] = []
        on_denied = (lambda *a: self.denied.append(a)) if denied else None
        self.channels = Channels("10.0.0.7", on_denied, limit, refused)
        self.reads = ClientStream(self.channels)
        self.writes = ServerStream(self.channels)
        self.cut = cut

    def _feed(self, stream, data: bytes) -> bytes:
        """``data`` fed to ``stream``; what it became there (a rewrite is in place)."""
        cuts = [self.cut] if 0 < self.cut < len(data) else []
        out = bytearray()
        start = 0
        for end in [*cuts, len(data)]:
            chunk = bytearray(data[start:end])
            stream.feed(chunk)
            out += chunk
            start = end
        return bytes(out)

    def client(self, *commands) -> bytes:
        return self._feed(self.reads, wire(*commands))

    def server(self, *commands) -> None:
        self._feed(self.writes, wire(*commands))

    def open(
        self,
        name: str,
        cid: int,
        sid: int,
        rights: int = 3,
        native: ca.ChannelType = DOUBLE,
        count: int = 1,
    ) -> None:
        self.client(ca.CreateChanRequest(name=name, cid=cid, version=13))
        self.server(
            ca.AccessRightsResponse(cid=cid, access_rights=rights),
            ca.CreateChanResponse(data_type=native, data_count=count, cid=cid, sid=sid),
        )

    def put(self, sid: int, notify: bool = False) -> None:
        kind = ca.WriteNotifyRequest if notify else ca.WriteRequest
        self.client(kind(data=[1.0], data_type=DOUBLE, data_count=1, sid=sid, ioid=9))


@pytest.mark.parametrize("cut", [0, 1, 2, 7, 15, 16, 17, 20, 40])
def test_a_put_to_a_read_only_channel_is_seen_however_the_streams_are_cut(cut):
    c = Circuit(cut)
    c.client(ca.VersionRequest(priority=0, version=13), ca.ClientNameRequest("alice"))
    c.open("R:ro_f1", cid=1, sid=11, rights=1)
    c.open("R:rw_f1", cid=2, sid=12, rights=3)
    c.put(12)
    c.put(11)
    c.put(11, notify=True)
    assert c.denied == [
        ("R:ro_f1", "alice", "10.0.0.7", False),
        ("R:ro_f1", "alice", "10.0.0.7", True),
    ]


def test_a_circuit_with_write_access_keeps_no_denied_channel():
    c = Circuit()
    c.open("R:a_f1", cid=1, sid=11, rights=3)
    assert c.channels.denied == {}


def test_rights_that_change_after_creation_count():
    c = Circuit()
    c.open("R:a_f1", cid=1, sid=11, rights=3)
    c.server(ca.AccessRightsResponse(cid=1, access_rights=1))  # the rules were reloaded
    c.put(11)
    c.server(ca.AccessRightsResponse(cid=1, access_rights=3))
    c.put(11)
    assert [d[0] for d in c.denied] == ["R:a_f1"]


def test_a_channel_gone_is_forgotten():
    c = Circuit()
    c.open("R:a_f1", cid=1, sid=11, rights=1)
    c.open("R:b_f1", cid=2, sid=12, rights=1)
    c.client(ca.ClearChannelRequest(sid=11, cid=1))
    c.server(ca.ClearChannelResponse(sid=11, cid=1))
    c.server(ca.ServerDisconnResponse(cid=2))
    c.client(ca.CreateChanRequest(name="R:c_f1", cid=3, version=13))
    c.server(ca.AccessRightsResponse(cid=3, access_rights=1), ca.CreateChFailResponse(cid=3))
    assert (c.channels.names, c.channels.sids, c.channels.denied) == ({}, {}, {})


def test_large_messages_are_skipped_and_followed_after():
    c = Circuit(5000)
    c.open("R:ro_F100000", cid=1, sid=11, rights=1)
    big = ca.WriteRequest(
        data=[0.0] * 100_000, data_type=DOUBLE, data_count=100_000, sid=11, ioid=1
    )
    assert struct.unpack_from(">H", bytes(big), 2)[0] == 0xFFFF  # an extended header
    c.client(big, ca.WriteRequest(data=[1.0], data_type=DOUBLE, data_count=1, sid=11, ioid=2))
    assert len(c.denied) == 2


def test_denied_puts_are_recorded_up_to_a_rate_then_summed_up(caplog):
    now = [0.0]
    recorded, counted = [], []
    puts = DeniedPuts(
        lambda *a: recorded.append(a), lambda: counted.append(1), 2, 60.0, lambda: now[0]
    )
    for k in range(5):
        puts.denied(f"R:x{k}_f1", "bob", "10.0.0.1", False)
    assert [r[0] for r in recorded] == ["R:x0_f1", "R:x1_f1"] and len(counted) == 3
    now[0] = 61.0
    with caplog.at_level(logging.WARNING, logger="carelay.broker"):
        puts.tick()
    (line,) = caplog.messages
    assert "refused 3 more puts" in line and ACCESS_DENIED in line and "R:x2_f1" in line


def test_a_search_names_its_address_without_a_user():
    line = error_line("refused PV name: x", "P:bad", None, "10.1.2.3:5555")
    assert "Z client 10.1.2.3:5555 pv P:bad: refused" in line


def test_the_address_of_a_search_is_read_without_dns():
    # caNetAddr: casnaInet, then a sockaddr_in (family, port and address in network order).
    raw = struct.pack("=iHH4s", 1, socket.AF_INET, socket.htons(5076), bytes([10, 1, 2, 3]))
    buf = ctypes.create_string_buffer(raw)

    class Addr:
        this = ctypes.addressof(buf)

    assert client_address(Addr()) == "10.1.2.3:5076"
    buf[0] = 0  # casnaUDF
    assert client_address(Addr()) is None
    assert client_address(object()) is None


@pytest.mark.parametrize("address", ["127.0.0.1", "10.255.0.7", "0.0.0.0", "255.255.255.255"])
def test_a_token_names_its_address_again(address):
    assert token_address(address_token(address)) == address


def test_what_is_no_token_names_no_address():
    assert token_address("") is None and token_address("none") is None
