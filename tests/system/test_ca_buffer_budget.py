"""Large CA buffers that circuits made PCAS take are counted against ``max_bytes``.

PCAS takes a large buffer (EPICS_CA_MAX_ARRAY_BYTES) for a circuit that sends a message
over its small one, and keeps it for later circuits once that circuit closes: memory the
relay holds as surely as a PV's values.  A relay with a small ``max_bytes`` and a few raw
circuits, each stuck in most of a large message, must refuse a PV that would have fitted
before them, say why, keep serving the PV that exists, and show the share in
MAX_BYTES_USED.  The header of a large message alone, sent by circuits that send nothing
more, takes such a buffer too, and so does a read of a large value (the send side).
"""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest

from carelay.common.config import CA_ARRAY_OVERHEAD, CA_LARGE_BUFFER_EXTRA
from tests.system.clients import Context, close, connect, get, put, write_status
from tests.system.conftest import CA_PORT, wait_for

#: A CA VERSION message (what every CA client sends first): minor version 13.
VERSION = struct.pack("!HHHHII", 0, 0, 0, 13, 0, 0)
CA_PROTO_WRITE = 4
DBR_DOUBLE = 6
MAX_ELEMENTS = 100_000
#: PCAS's large buffer for this relay: EPICS_CA_MAX_ARRAY_BYTES (from max_elements, as the
#: pvlist of max_pvs 100 is smaller) and room for a header.
LARGE_BUFFER = MAX_ELEMENTS * 8 + CA_ARRAY_OVERHEAD + CA_LARGE_BUFFER_EXTRA
MAX_BYTES = 4_000_000
LIMITS = ["--max-bytes", str(MAX_BYTES), "--max-elements", str(MAX_ELEMENTS), "--max-pvs", "100"]
STUCK = 4


def _stuck_in_large_write(fraction: float = 0.9) -> socket.socket:
    """A circuit that sends the header of a WRITE of MAX_ELEMENTS doubles and ``fraction``
    of its payload, then nothing (closed by the stall rule after a minute at the soonest)."""
    s = socket.create_connection(("127.0.0.1", CA_PORT), timeout=5)
    payload = MAX_ELEMENTS * 8
    # Extended header: postsize 0xffff and count 0 say the 32-bit sizes follow.
    header = struct.pack(
        "!HHHHIIII", CA_PROTO_WRITE, 0xFFFF, DBR_DOUBLE, 0, 1, 0, payload, MAX_ELEMENTS
    )
    with contextlib.suppress(OSError):
        s.sendall(VERSION + header + bytes(int(payload * fraction)))
    return s


def test_pinned_ca_buffers_take_their_share_of_max_bytes(make_relay):
    """On the CA broker, and on the PVA front-end, which holds no CA buffers but counts
    the brokers' (before, it counted none and created PVs up to MAX_BYTES_USED 160 %)."""
    p4p = pytest.importorskip("p4p")
    from tests.system.pva import PvaRelay, pva_context

    relay = make_relay(extra=LIMITS, kind=PvaRelay)
    ctx, pva = Context(), pva_context()
    socks: list[socket.socket] = []
    try:
        early = relay.name("early", "f1")
        put(early, 2.5)
        used = connect(ctx, relay.prefix + "relay:MAX_BYTES_USED")
        before = used.read(timeout=5).data[0]
        # A ring buffer of 50,000 doubles: charged 800 kB, far below max_bytes.  Served
        # (provisional) now; created by its first put.
        late_name = relay.name("late", "F50000")
        late = connect(ctx, late_name)
        socks = [_stuck_in_large_write() for _ in range(STUCK)]
        pinned = 100.0 * STUCK * LARGE_BUFFER / MAX_BYTES
        wait_for(
            lambda: used.read(timeout=5).data[0] >= before + pinned,
            timeout=15,
            what=f"MAX_BYTES_USED up by the {STUCK} pinned buffers",
        )
        status = write_status(late, [1.0])
        assert not status.success, f"creation allowed with {STUCK} buffers pinned"
        refusal = f"refused PV name {late_name}: max_bytes ({MAX_BYTES}) would be exceeded; "
        assert refusal + "CA buffers hold" in relay.log()
        assert get(early) == 2.5
        put(early, 3.5)  # puts to a PV that exists are untouched
        assert get(early) == 3.5

        # Over PVA: the name is refused (no channel) once the PVA front-end has read the
        # broker's status file (once a second), with the same reason.
        pva_name = relay.name("latepva", "F50000")

        def refused() -> bool:
            try:
                pva.put(pva_name, [1.0], timeout=2)
            except (TimeoutError, p4p.client.thread.RemoteError):
                return True
            pva.put(relay.prefix + "delpv", pva_name, timeout=5)
            return False

        wait_for(refused, timeout=20, what="the PVA creation refused for the CA buffers")
        why = f"{pva_name}: max_bytes ({MAX_BYTES}) would be exceeded; CA buffers hold"
        assert why in relay.log(), relay.log()[-3000:]
        assert pva_name not in get(relay.prefix + "pvlist", as_string=True)
    finally:
        for s in socks:
            s.close()
        close(ctx)
        pva.close()


def test_a_header_alone_and_a_large_read_pin_buffers_too(make_relay):
    relay = make_relay(extra=LIMITS)
    ctx = Context()
    socks: list[socket.socket] = []
    buffer = 100.0 * LARGE_BUFFER / MAX_BYTES
    try:
        used = connect(ctx, relay.prefix + "relay:MAX_BYTES_USED")
        # Created by a small put (caproto reads nothing on its own): charged 320 kB, 8 %.
        big = connect(ctx, relay.name("big", "f20000"))
        assert write_status(big, [1.5]).success

        def used_at_least(share):
            return lambda: used.read(timeout=5).data[0] >= share - 0.01

        wait_for(used_at_least(8.0), timeout=15, what="MAX_BYTES_USED at the PV's 8 %")
        assert used.read(timeout=5).data[0] < 8.0 + buffer / 2  # no buffer pinned yet
        socks = [_stuck_in_large_write(0.0) for _ in range(2)]
        wait_for(used_at_least(8.0 + 2 * buffer), timeout=15, what="two headers counted")
        # A read of all 20,000 elements: one reply of 160 kB, over the small send buffer.
        assert len(big.read(data_count=20_000, timeout=5).data) == 20_000
        wait_for(used_at_least(8.0 + 3 * buffer), timeout=15, what="the reply counted")
    finally:
        for s in socks:
            s.close()
        close(ctx)
