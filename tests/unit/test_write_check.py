"""Puts that PCAS would convert into something else than they say (broker/writecheck.py),
judged on the circuit's stream before PCAS reads them (broker/castream.py): made into a
put PCAS refuses, or the circuit closed when the put's header has already gone to PCAS."""

from __future__ import annotations

import struct

import caproto as ca
import pytest

from carelay.broker import writecheck
from carelay.broker.castream import UnfollowableStream
from tests.unit.test_denied_streams import Circuit as Streams
from tests.unit.test_denied_streams import wire

T = ca.ChannelType


def _text(t: str) -> bytes:
    return t.encode().ljust(40, b"\0")


@pytest.mark.parametrize(
    "native, dtype, payload, why",
    [
        (6, 0, _text("abc"), "cannot convert text 'abc' to a number"),
        (6, 0, _text("1.5 volts"), "cannot convert text '1.5 volts' to a number"),
        (6, 0, _text(""), "cannot convert text '' to a number"),
        (5, 6, struct.pack(">d", 2.0**31), "2147483648.0 does not fit a 32-bit integer"),
        (5, 6, struct.pack(">d", -(2.0**31) - 1), "does not fit a 32-bit integer"),
        (5, 6, struct.pack(">d", float("nan")), "nan does not fit a 32-bit integer"),
        (5, 0, _text("3e9"), "3000000000.0 does not fit a 32-bit integer"),
        (1, 5, struct.pack(">i", 40000), "40000 does not fit a 16-bit integer"),
        # A char PV: PCAS wrapped 300 to 44, -1 to 255, 70000 to 112.
        (4, 5, struct.pack(">i", 300), "300 does not fit a char (0 to 255)"),
        (4, 5, struct.pack(">i", -1), "-1 does not fit a char (0 to 255)"),
        (4, 1, struct.pack(">h", 256), "256 does not fit a char (0 to 255)"),
        (4, 6, struct.pack(">d", -1.5), "-1.5 does not fit a char (0 to 255)"),
        (4, 6, struct.pack(">d", float("inf")), "inf does not fit a char (0 to 255)"),
    ],
)
def test_what_pcas_would_turn_into_another_value_is_refused(native, dtype, payload, why):
    assert why in writecheck.refusal(native, dtype, 1, payload)


@pytest.mark.parametrize(
    "native, dtype, payload",
    [
        (6, 0, _text(" 2.5 ")),
        (6, 0, _text("-1e3")),
        (6, 0, _text("0x10")),  # PCAS reads hex after 0x, as an IOC does
        (6, 0, _text("nan")),
        (5, 6, struct.pack(">d", 2.0**31 - 1)),
        (5, 6, struct.pack(">d", 1.5)),  # a fraction goes in cut, as PCAS and an IOC do
        (5, 0, _text("-2147483648")),
        (4, 5, struct.pack(">i", 255)),
        (4, 6, struct.pack(">d", 255.9)),  # cut to 255, as PCAS and an IOC do
        (4, 6, struct.pack(">d", -0.5)),  # cut to 0
        (5, 6, struct.pack(">d", 2.0**31 - 0.5)),  # cut to 2**31 - 1
    ],
)
def test_what_pcas_converts_faithfully_goes(native, dtype, payload):
    assert writecheck.refusal(native, dtype, 1, payload) is None


def test_only_number_channels_and_small_puts_are_judged():
    assert writecheck.judged(6, 0, 1) and writecheck.judged(5, 6, 100)
    assert not writecheck.judged(6, 6, 1)  # a double to a double: nothing to lose
    assert not writecheck.judged(0, 0, 1)  # text to text
    assert writecheck.judged(4, 5, 1) and not writecheck.judged(4, 4, 1)  # char to char
    assert not writecheck.judged(4, 0, 1)  # text to a char PV: goes as chars (below)
    assert not writecheck.judged(6, 0, 1000)  # 40 kB of text: left to PCAS


class Circuit(Streams):
    """A circuit of user alice whose judged puts refused are in ``self.refused``."""

    def __init__(self, denied: bool = False) -> None:
        self.refused: list[tuple] = []
        super().__init__(denied=denied, refused=lambda *a: self.refused.append(a))
        self.client(ca.ClientNameRequest("alice"))

    def write(self, sid: int, data, dtype: T, cut: int = 0, notify: bool = True) -> bytes:
        """A put as PCAS reads it, in reads cut at ``cut``."""
        kind = ca.WriteNotifyRequest if notify else ca.WriteRequest
        self.cut = cut
        return self.client(kind(data=data, data_type=dtype, data_count=len(data), sid=sid, ioid=1))


def _type(raw: bytes) -> int:
    return struct.unpack_from(">H", raw, 4)[0]


@pytest.mark.parametrize("cut", [0, 1])
def test_a_refused_put_becomes_one_pcas_refuses_and_is_told(cut):
    c = Circuit()
    c.open("R:t_f1", 1, 11, native=T.DOUBLE)
    raw = c.write(11, [b"abc"], T.STRING, cut)
    assert _type(raw) == writecheck.DBR_STS_STRING
    assert c.refused == [
        ("R:t_f1", "alice", "10.0.0.7", True, "cannot convert text 'abc' to a number")
    ]


def test_a_put_that_goes_is_left_as_it_is():
    c = Circuit()
    c.open("R:t_i1", 1, 11, native=T.LONG)
    c.open("R:t_f1", 2, 12, native=T.DOUBLE)
    assert _type(c.write(11, [7.0], T.DOUBLE)) == 6
    assert _type(c.write(12, [1e300], T.DOUBLE)) == 6  # not judged
    assert _type(c.write(11, [3e9], T.DOUBLE, notify=False)) == writecheck.DBR_STS_STRING
    assert c.refused[0][3:] == (False, "3000000000.0 does not fit a 32-bit integer")
    assert len(c.refused) == 1


def test_a_refused_put_whose_header_went_before_closes_the_circuit():
    c = Circuit()
    c.open("R:t_f1", 1, 11, native=T.DOUBLE)
    with pytest.raises(UnfollowableStream, match="refused put"):
        c.write(11, [b"abc"], T.STRING, cut=20)
    assert len(c.refused) == 1


@pytest.mark.parametrize("value", [float("nan"), 7.0])
def test_a_put_whose_payload_goes_on_past_the_read_is_judged_ahead(value):
    """The header of a put and part of its payload in one read, the rest still in the
    socket (PCAS's buffer full: a put of 2,048 doubles always comes so): the rest, looked
    at ahead, decides the put while its header is in this read.  A refused put becomes
    one PCAS refuses, instead of closing the circuit; one that goes is left as it is."""
    c = Circuit()
    c.open("R:t_i2048", 1, 11, native=T.LONG)
    data = [1.0] * 2047 + [value]
    raw = wire(
        ca.WriteNotifyRequest(data=data, data_type=T.DOUBLE, data_count=2048, sid=11, ioid=1)
    )
    first, rest = bytearray(raw[:16384]), bytes(raw[16384:])
    c.reads.feed(first)
    assert c.reads.pending_put() == len(rest)
    c.reads.judge_ahead(rest, first)
    assert c.reads.pending_put() == 0
    c.reads.feed(bytearray(rest))  # PCAS reads the rest: nothing judged again
    refused = value != value
    assert _type(bytes(first)) == (writecheck.DBR_STS_STRING if refused else T.DOUBLE)
    assert len(c.refused) == (1 if refused else 0)


def test_a_put_whose_rest_is_not_there_yet_is_judged_when_it_comes():
    c = Circuit()
    c.open("R:t_f1", 1, 11, native=T.DOUBLE)
    raw = wire(
        ca.WriteNotifyRequest(data=[b"abc"], data_type=T.STRING, data_count=1, sid=11, ioid=1)
    )
    c.reads.feed(bytearray(raw[:20]))
    assert c.reads.pending_put() == len(raw) - 20  # no peek brought it: as before
    with pytest.raises(UnfollowableStream, match="refused put"):
        c.reads.feed(bytearray(raw[20:]))


def test_a_cleared_channel_is_no_longer_judged():
    c = Circuit()
    c.open("R:t_f1", 1, 11, native=T.DOUBLE)
    c.server(ca.ClearChannelResponse(sid=11, cid=1))
    assert c.channels.natives == {}


@pytest.mark.parametrize("text", ["1_5", "0x1p99999", "1e", "\xa01"])
def test_text_strtod_would_not_read_whole_is_refused_without_raising(text):
    """Python's float() takes "1_5" (strtod reads 1); a hex too large for a double must
    be refused, not raise."""
    payload = text.encode("latin-1").ljust(40, b"\0")
    assert "cannot convert text" in writecheck.refusal(6, 0, 1, payload)


def test_a_payload_shorter_than_its_count_is_refused():
    assert "2 elements in 8 bytes" in writecheck.refusal(5, 6, 2, struct.pack(">d", 1.0))


def test_a_judged_put_declaring_a_huge_payload_is_not_held():
    """A put to a number channel declaring 8 MiB: left to PCAS (which refuses it), and
    not one byte of it kept here."""
    c = Circuit()
    c.open("R:t_f1", 1, 11, native=T.DOUBLE)
    header = struct.pack(">HHHHIIII", 19, 0xFFFF, 0, 0xFFFF, 11, 1, 8 << 20, 1)
    c.reads.feed(bytearray(header))
    for _ in range(8):
        c.reads.feed(bytearray(1 << 20))
    assert len(c.reads._kept) == 0 and c.refused == []


def test_a_put_without_write_access_is_told_once_as_a_denial():
    """PCAS refuses it for want of write access before it converts anything: judging it
    too would enter it twice."""
    c = Circuit(denied=True)
    c.open("R:ro_f1", 1, 11, rights=1, native=T.DOUBLE)
    raw = c.write(11, [b"abc"], T.STRING)
    assert [d[0] for d in c.denied] == ["R:ro_f1"] and c.refused == []
    assert _type(raw) == 0  # left as it was: PCAS refuses it anyway


def _retyped(raw: bytes) -> tuple[int, int, bytes]:
    """(type, count, payload) of a put as PCAS reads it."""
    dtype, count = struct.unpack_from(">HH", raw, 4)
    return dtype, count, raw[16:]


@pytest.mark.parametrize(
    ("text", "chars", "count"),
    [
        (b"R:old_f1", 64, 9),  # a name to delpv: its bytes and the terminator
        (b"0123456789", 10, 10),  # fills the channel: no room for the terminator
        (b"0123456789a", 10, 11),  # more than it holds: PCAS says ECA_BADCOUNT
        (b"", 10, 1),
        (b"x" * 39, 40, 40),
    ],
)
def test_text_put_to_a_char_channel_goes_as_its_bytes(text, chars, count):
    """What EPICS caput sends without -S: PCAS read the text as one number (a name put
    to delpv reached the relay as an empty one)."""
    c = Circuit()
    c.open("R:t_c", 1, 11, native=T.CHAR, count=chars)
    dtype, n, payload = _retyped(c.write(11, [text], T.STRING))
    assert (dtype, n) == (T.CHAR, count)
    assert payload[: len(text)] == text and len(payload) >= count
    assert c.refused == []


def test_text_to_a_char_channel_whose_header_went_before_is_left_to_pcas():
    c = Circuit()
    c.open("R:t_c40", 1, 11, native=T.CHAR, count=40)
    assert _retyped(c.write(11, [b"hello"], T.STRING, cut=20))[:2] == (T.STRING, 1)


def test_text_to_a_char_channel_is_retyped_when_its_rest_is_looked_at_ahead():
    c = Circuit()
    c.open("R:t_c40", 1, 11, native=T.CHAR, count=40)
    raw = wire(
        ca.WriteNotifyRequest(data=[b"hello"], data_type=T.STRING, data_count=1, sid=11, ioid=1)
    )
    first, rest = bytearray(raw[:30]), bytes(raw[30:])
    c.reads.feed(first)
    assert c.reads.pending_put() == len(rest)
    c.reads.judge_ahead(rest, first)
    assert _retyped(bytes(first))[:2] == (T.CHAR, 6)
