"""The broker's circuit rules (pure) and its monitor, on plain local TCP sockets: no CA."""

from __future__ import annotations

import logging
import resource
import socket
import struct
import time

import pytest

from carelay.broker.circuits import (
    Circuit,
    CircuitMonitor,
    Limits,
    _Tally,
    choose_closures,
    client_limit,
)
from carelay.common.config import (
    BROKER_FD_HEADROOM,
    CA_BUFFER_SHARE,
    CA_SMALL_BUFFER,
    FD_SETSIZE,
    MIN_DEFAULT_CLIENTS,
    ConfigError,
    load_config,
)
from carelay.common.lifecycle import fit_fd_limit


def circuit(n: int, received: int | None = 100, silent: float = 0.0, age: float = 10.0):
    return Circuit(fd=n, inode=n, peer=f"10.0.0.1:{n}", bytes_received=received,
                   silent_for=silent, age=age)  # fmt: skip


def reasons(circuits, limits):
    return {c.fd: why for c, why in choose_closures(circuits, limits)}


LIMITS = Limits(max_clients=3, idle_timeout=600, stall_timeout=60, silent_grace=1)


def test_within_the_limits_nothing_is_closed():
    cs = [circuit(1), circuit(2, received=0, age=100), circuit(3, silent=599)]
    assert reasons(cs, LIMITS) == {}


def test_idle_is_no_data_and_no_acknowledgement_for_the_timeout():
    cs = [circuit(1, silent=600), circuit(2, received=0, silent=700, age=700)]
    assert reasons(cs, LIMITS) == {1: "idle", 2: "idle"}


def test_a_large_message_then_silence_is_a_stall():
    big = CA_SMALL_BUFFER + 1
    cs = [circuit(1, received=big, silent=60), circuit(2, received=big, silent=59)]
    assert reasons(cs, LIMITS) == {1: "stalled"}
    # A short idle timeout shortens the stall rule too.
    assert reasons(cs, Limits(3, idle_timeout=5)) == {1: "stalled", 2: "stalled"}


def test_over_the_limit_silent_circuits_go_first_oldest_first():
    cs = [
        circuit(1, age=50),
        circuit(2, received=0, age=30),
        circuit(3, received=0, age=40),
        circuit(4, age=20),
        circuit(5, received=0, age=0.5),  # may still speak: within the grace
    ]
    assert reasons(cs, LIMITS) == {3: "silent", 2: "silent"}


def test_over_the_limit_the_newest_are_refused():
    cs = [circuit(1, age=50), circuit(2, age=3), circuit(3, age=30), circuit(4, age=0)]
    cs.append(circuit(5, received=0, age=0.1))
    assert reasons(cs, LIMITS) == {5: "refused", 4: "refused"}


def test_closed_circuits_make_room_before_any_refusal():
    cs = [circuit(1, silent=601), circuit(2), circuit(3), circuit(4, age=0)]
    assert reasons(cs, LIMITS) == {1: "idle"}


def test_unknown_byte_counts_count_as_spoken():
    cs = [circuit(k, received=None, age=10 - k) for k in range(1, 5)]
    assert reasons(cs, LIMITS) == {4: "refused"}


def test_client_limit_leaves_room_for_the_brokers_own_descriptors():
    assert client_limit(None, FD_SETSIZE, 40) == FD_SETSIZE - 40 - BROKER_FD_HEADROOM
    assert client_limit(10, FD_SETSIZE, 40) == 10
    assert client_limit(2000, 256, 40) == 256 - 40 - BROKER_FD_HEADROOM
    assert client_limit(None, 50, 40) == 1
    # Unset, max_clients is what the memory share holds, within the descriptors.
    assert client_limit(None, FD_SETSIZE, 40, memory_room=100) == 100
    assert client_limit(None, FD_SETSIZE, 40, memory_room=5000) == FD_SETSIZE - 40 - 64
    assert client_limit(500, FD_SETSIZE, 40, memory_room=100) == 500


def test_default_max_clients_holds_their_buffers_in_a_share_of_max_bytes():
    c = load_config(max_bytes=2**30, max_elements=1000, max_pvs=10)
    assert c.circuit_bytes == 2 * (c.ca_max_array_bytes + 24 + CA_SMALL_BUFFER)
    assert c.memory_client_limit == int(2**30 * CA_BUFFER_SHARE) // c.circuit_bytes
    assert load_config(max_bytes=10**6).memory_client_limit == MIN_DEFAULT_CLIENTS


def test_fit_fd_limit_sets_the_soft_limit_to_fd_setsize():
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        limit = fit_fd_limit(FD_SETSIZE)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert soft == limit == (FD_SETSIZE if hard >= FD_SETSIZE else hard)
        assert hard == saved[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_fit_fd_limit_raises_the_soft_limit_as_far_as_the_hard_one():
    """The PVA front-end raises it: a descriptor per client, none below FD_SETSIZE."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        hard = saved[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert fit_fd_limit(4096) == want == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if hard != resource.RLIM_INFINITY:  # above the hard limit: the hard limit
            assert fit_fd_limit(hard + 1) == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_tally_logs_once_per_interval_and_counts_the_rest(caplog):
    tally = _Tally(interval=10)
    with caplog.at_level(logging.WARNING, logger="carelay.broker"):
        for k in range(5):
            tally.event(100.0 + k, f"refused {k}")
        tally.flush(105.0)
        assert [r.getMessage() for r in caplog.records] == ["refused 0"]
        tally.flush(110.0)
        tally.event(115.0, "refused 8")  # within the interval of the last line: counted
        tally.event(120.0, "refused 9")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused 0",
        "4 more like: refused 4",
        "refused 9 (and 1 more since the last line)",
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_clients", 0),
        ("max_clients", FD_SETSIZE),
        ("max_clients", "10"),
        ("max_clients", True),
        ("client_idle_timeout", 0.5),
        ("client_idle_timeout", float("nan")),
        ("client_idle_timeout", True),
        ("client_idle_timeout", "600"),
    ],
)
def test_invalid_circuit_keys_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(**{key: value})


def test_circuit_keys_defaults_and_values():
    c = load_config()
    assert c.max_clients is None and c.client_idle_timeout == 600.0
    c = load_config(max_clients=5, client_idle_timeout=2)
    assert c.max_clients == 5 and c.client_idle_timeout == 2.0


# -- the monitor, on a local TCP server standing in for PCAS ---------------------------


@pytest.fixture
def server():
    """A listening socket and what it accepts (kept open, as PCAS keeps its circuits)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    clients: list[socket.socket] = []

    def connect(data: bytes = b"") -> socket.socket:
        c = socket.create_connection(lsock.getsockname(), timeout=5)
        if data:
            c.sendall(data)
        clients.append(c)
        accepted.append(lsock.accept()[0])
        return c

    yield lsock.getsockname()[1], connect
    for s in (*accepted, *clients, lsock):
        s.close()


def ended(c: socket.socket) -> bool:
    c.settimeout(5)
    try:
        return c.recv(100) == b""
    except ConnectionResetError:
        return True


def test_monitor_refuses_the_newest_circuit_over_max_clients(server):
    port, connect = server
    clock = [100.0]
    mon = CircuitMonitor([port], Limits(2, idle_timeout=600), FD_SETSIZE, lambda: clock[0])
    try:
        first = [connect(b"hello"), connect(b"hello")]
        mon.poll()
        assert mon.circuits == 2
        clock[0] += 1
        newest = connect(b"hello")
        mon.poll()  # the new descriptor moved the lowest free one: a scan at once
        assert ended(newest)
        assert mon.circuits == 2
        for c in first:
            c.sendall(b"still here")
            c.settimeout(0.2)
            with pytest.raises(TimeoutError):
                c.recv(100)  # not closed
    finally:
        mon.close()


def test_monitor_closes_idle_circuits_and_keeps_busy_ones(server):
    port, connect = server
    mon = CircuitMonitor([port], Limits(10, idle_timeout=1), FD_SETSIZE)
    try:
        quiet = connect(b"hello")
        busy = connect(b"hello")
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:
            busy.sendall(b".")
            time.sleep(0.1)
        mon.scan(time.monotonic())
        assert ended(quiet)
        busy.settimeout(0.2)
        with pytest.raises(TimeoutError):
            busy.recv(100)
    finally:
        mon.close()


def test_monitor_ignores_sockets_that_are_no_circuits(server):
    port, connect = server
    other = socket.create_server(("127.0.0.1", 0))
    mon = CircuitMonitor([other.getsockname()[1]], Limits(1, idle_timeout=600), FD_SETSIZE)
    try:
        connect(b"x")
        connect(b"x")
        mon.scan(time.monotonic())
        assert mon.circuits == 0
    finally:
        mon.close()
        other.close()


def test_a_client_that_sent_much_and_waits_between_messages_is_no_stall():
    """A caproto client that made hundreds of channels (more than 16 KiB of requests) and
    then waits for their changes sends nothing: it is not in a message, so only the idle
    rule applies to it, not the stall rule's 60 s."""
    big = 20 * CA_SMALL_BUFFER
    between = Circuit(1, 1, "10.0.0.1:1", big, silent_for=61, age=100, mid_message=False)
    inside = Circuit(2, 2, "10.0.0.1:2", 40, silent_for=61, age=100, mid_message=True)
    unknown = Circuit(3, 3, "10.0.0.1:3", big, silent_for=61, age=100)  # not followed
    assert reasons([between, inside, unknown], LIMITS) == {2: "stalled", 3: "stalled"}
    idle = Circuit(1, 1, "10.0.0.1:1", big, silent_for=600, age=700, mid_message=False)
    assert reasons([idle], LIMITS) == {1: "idle"}


def test_a_stream_knows_when_it_stopped_inside_a_message():
    from carelay.broker.castream import StreamWalker

    header = struct.pack(">HHHHII", 4, 16, 6, 2, 1, 2)  # a WRITE of 16 payload bytes
    walker = StreamWalker()
    assert not walker.mid_message
    walker.feed(bytearray(header[:10]))  # a header cut
    assert walker.mid_message
    walker.feed(bytearray(header[10:] + bytes(8)))  # half its payload
    assert walker.mid_message
    walker.feed(bytearray(8))
    assert not walker.mid_message


def test_monitor_closes_a_circuit_stopped_inside_a_message_not_one_between(server):
    port, connect = server
    stuck_at: list = []

    def mid_message(fd: int) -> bool:
        s = socket.socket(fileno=fd)
        try:
            return s.getpeername() in stuck_at
        finally:
            s.detach()

    limits = Limits(10, idle_timeout=600, stall_timeout=1)
    mon = CircuitMonitor([port], limits, FD_SETSIZE, mid_message=mid_message)
    try:
        much = b"." * (2 * CA_SMALL_BUFFER)
        between, stuck = connect(much), connect(much)
        stuck_at.append(stuck.getsockname())
        time.sleep(1.2)  # the silence the rule waits for: the kernel's own clock
        mon.scan(time.monotonic())
        assert ended(stuck)
        between.settimeout(0.2)
        with pytest.raises(TimeoutError):
            between.recv(100)  # not closed
    finally:
        mon.close()
