"""The broker's rewrite of HOST_NAME messages and of HAGs (access by peer address)."""

from __future__ import annotations

import struct

import caproto
import pytest

from carelay.broker.access import address_token, rules_by_address
from carelay.broker.castream import CA_PROTO_IGNORED, CircuitStream, UnfollowableStream

TOKEN = address_token("127.0.0.1").encode()


def stream_of(*commands) -> bytes:
    circuit = caproto.VirtualCircuit(caproto.CLIENT, ("127.0.0.1", 5064), 0)
    return b"".join(bytes(b) for b in circuit.send(*commands))


def server_reads(data: bytes):
    """What a server circuit makes of ``data``."""
    circuit = caproto.VirtualCircuit(caproto.SERVER, ("127.0.0.1", 5064), 0)
    commands, _ = circuit.recv(data)
    return commands


def fed(data: bytes, cuts: list[int]) -> bytes:
    """``data`` after a CircuitStream saw it in reads ending at ``cuts``."""
    stream = CircuitStream(TOKEN)
    out = bytearray()
    start = 0
    for end in [*cuts, len(data)]:
        chunk = bytearray(data[start:end])
        stream.feed(chunk)
        out += chunk
        start = end
    return bytes(out)


CLAIMS = stream_of(
    caproto.VersionRequest(priority=0, version=13),
    caproto.HostNameRequest("opi1"),
    caproto.ClientNameRequest("alice"),
    caproto.CreateChanRequest(name="R:x_f1", cid=1, version=13),
)


def test_tokens_are_short_and_distinct():
    assert address_token("127.0.0.1") != address_token("127.0.0.2")
    assert len(address_token("255.255.255.255")) == 7  # fits libca's 8-byte payload


@pytest.mark.parametrize("cut", range(0, len(CLAIMS) + 1))
def test_the_claimed_host_becomes_the_peer_token_however_the_stream_is_cut(cut):
    commands = server_reads(fed(CLAIMS, [cut]))
    hosts = [c.name for c in commands if isinstance(c, caproto.HostNameRequest)]
    assert hosts == [TOKEN.decode()]
    assert [c.name for c in commands if isinstance(c, caproto.ClientNameRequest)] == ["alice"]
    assert [c.name for c in commands if isinstance(c, caproto.CreateChanRequest)] == ["R:x_f1"]


def test_byte_by_byte():
    assert fed(CLAIMS, list(range(1, len(CLAIMS)))) == fed(CLAIMS, [])


def test_a_payload_too_short_for_the_token_becomes_an_empty_host():
    header = struct.pack(">HHHHII", 21, 4, 0, 0, 0, 0)
    out = fed(header + b"ab\0\0", [])
    assert out[16:] == b"\0b\0\0"


def test_a_host_name_without_payload_is_ignored_or_the_circuit_closed():
    header = struct.pack(">HHHHII", 21, 0, 0, 0, 0, 0)
    out = fed(header, [])
    assert struct.unpack(">H", out[:2])[0] == CA_PROTO_IGNORED
    assert struct.unpack(">H", fed(header, [1])[:2])[0] == CA_PROTO_IGNORED
    with pytest.raises(UnfollowableStream):
        fed(header, [4])


def test_large_payloads_are_skipped_untouched():
    data = stream_of(caproto.VersionRequest(priority=0, version=13))
    big = struct.pack(">HHHHII", 4, 0xFFFF, 6, 0, 1, 2) + struct.pack(">II", 800_000, 100_000)
    payload = b"\x15\x00" * 400_000  # looks like HOST_NAME commands: must stay
    assert fed(data + big + payload + CLAIMS, [100, 5000]) == data + big + payload + fed(CLAIMS, [])


def test_hag_host_names_become_address_tokens():
    text = (
        "# HAG(commented) {nothing}\n"
        'HAG(opis) {localhost, "127.0.0.2", nowhere.invalid}\n'
        "HAG(none) {nowhere.invalid}\n"
        "ASG(DEFAULT) { RULE(1, READ) }\n"
    )
    rewritten, unresolved = rules_by_address(text)
    assert unresolved == ["nowhere.invalid", "nowhere.invalid"]
    t1, t2 = address_token("127.0.0.1"), address_token("127.0.0.2")
    assert f'HAG(opis) {{ "{t1}", "{t2}" }}' in rewritten
    assert 'HAG(none) { "none" }' in rewritten
    # Comments stay comments, as they were; the rest stays byte for byte.
    assert rewritten.startswith("# HAG(commented) {nothing}\n")
    assert "ASG(DEFAULT) { RULE(1, READ) }" in rewritten


def test_only_hag_definitions_are_rewritten_as_asLib_reads_the_file():  # noqa: N802
    """A comment that a lone carriage return does not end, a quoted name that looks like a
    HAG and a rule's HAG condition are left as they are; a HAG after them is rewritten."""
    text = (
        'UAG(u) {"HAG(fake) {localhost}", x} # HAG(c) {localhost}\n'  # quoted; a comment
        "ASG(DEFAULT) { RULE(1, READ) }\r# later\rHAG(hidden) {localhost}\r\n"
        "HAG(opis) {localhost}\n"
        "ASG(relay) { RULE(1, WRITE) { HAG(opis) } }\n"
    )
    rewritten, _ = rules_by_address(text)
    token = address_token("127.0.0.1")
    assert '"HAG(fake) {localhost}"' in rewritten
    assert "\r# later\rHAG(hidden) {localhost}\r\n" in rewritten  # still a comment
    assert f'HAG(opis) {{ "{token}" }}' in rewritten
    assert "RULE(1, WRITE) { HAG(opis) }" in rewritten
