"""CA circuits a client can hold: bounded, refused at once, reaped when silent or stalled.

Through raw TCP sockets (what a careless or hostile client does) and real CA clients,
against the real relay:

- 1,100 idle sockets do not lock a new client out (PCAS ignores descriptors from
  FD_SETSIZE on, so before the broker bounded its circuits a caget hung);
- above max_clients a new circuit is closed at once, and the refusals are logged
  once per interval, not once each;
- a circuit that sends and acknowledges nothing for client_idle_timeout is closed,
  while clients that keep their circuits alive (sending, or receiving monitors) stay;
- 90 circuits that stall in the middle of a large message cannot grow the broker
  by more than max_clients large buffers, and are closed;
- a circuit that asks for more than max_channels channels is closed, while one that
  clears what it opens is served for ever.
"""

from __future__ import annotations

import collections
import contextlib
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import caproto as ca
import pytest

from tests.system.clients import Context, close, connect, get, put
from tests.system.conftest import CA_PORT, wait_for

#: A CA VERSION message (what every CA client sends first): command 0, priority 0,
#: minor version 13.
VERSION = struct.pack("!HHHHII", 0, 0, 0, 13, 0, 0)
#: CA command numbers.
CA_PROTO_WRITE = 4
DBR_DOUBLE = 6


def _caget(name: str) -> subprocess.CompletedProcess:
    """A fresh libca client (pyepics) reading ``name`` with a 5 s timeout."""
    code = (
        "import sys, epics\n"
        f"v = epics.caget({name!r}, timeout=5)\n"
        "print(v)\n"
        "sys.exit(0 if v is not None else 1)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _accept_queue() -> int:
    """Connections waiting for the CA server's accept() (the listening socket's backlog)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == CA_PORT:
            return int(cols[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on TCP port {CA_PORT}")


def _open_idle(n: int, batch: int = 4) -> list[socket.socket]:
    """``n`` sockets connected to the CA port, sending nothing.  A few at a time, each
    batch taken by the server's accept() before the next: PCAS listens with a backlog of
    5, and a connection beyond it would be dropped by the kernel, never reach PCAS."""
    socks = []
    while len(socks) < n:
        for _ in range(min(batch, n - len(socks))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", CA_PORT))
            socks.append(s)
        wait_for(lambda: _accept_queue() == 0, interval=0.002, what="the accept queue drained")
    return socks


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the relay has closed the circuit of ``s`` (without blocking); what it sent
    before is read and dropped."""
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        pass
    return True


def _ends_within(s: socket.socket, timeout: float) -> bool:
    """Whether the relay closes the circuit of ``s`` within ``timeout`` seconds (what it
    sends before is read and dropped)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def _broker_pid(relay) -> int:
    for pid in relay.children():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"broker" in cmd:
            return pid
    raise AssertionError("no broker process")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.slow
def test_idle_sockets_do_not_lock_out_a_new_client(make_relay):
    # Near FD_SETSIZE, where PCAS stops serving (the default may be lower, from memory).
    relay = make_relay(extra=["--max-clients", "900"])
    name = relay.name("flood", "f1")
    put(name, 4.5)
    _raise_fd_limit(1500)
    socks = _open_idle(1100)
    try:
        r = _caget(name)
        assert r.returncode == 0 and r.stdout.strip() == "4.5", r.stdout + r.stderr
        assert "sent nothing" in relay.log()
    finally:
        for s in socks:
            s.close()


def test_circuits_over_max_clients_are_refused_at_once_and_logged(make_relay):
    relay = make_relay(extra=["--max-clients", "3"])
    name = relay.name("full", "f1")
    ctxs = [Context() for _ in range(3)]
    raw = []
    try:
        pvs = [connect(ctx, name) for ctx in ctxs]
        assert pvs[0].write([2.5], wait=True, timeout=5).status.success
        start = len(relay.log())
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", CA_PORT), timeout=5)
            raw.append(s)
            s.sendall(VERSION)
            # Refused at once: at most the server's own VERSION, then the end.
            assert _ends_within(s, 5), "a circuit over max_clients stayed open"
        refusals = [
            line for line in relay.log()[start:].splitlines() if "refused CA circuit" in line
        ]
        assert len(refusals) == 1, refusals  # the other five are counted, not logged
        assert "max_clients (3) reached" in refusals[0]
        # The clients that hold the circuits are served as before.
        for pv in pvs:
            assert list(pv.read(timeout=5).data) == [2.5]
    finally:
        for s in raw:
            s.close()
        for ctx in ctxs:
            close(ctx)


#: A libca client (pyepics) that echoes after 1 s of quiet (EPICS_CA_CONN_TMO) sits idle
#: on a PV for ``seconds`` and prints how often it lost its connection, then the value.
IDLE_LIBCA = """
import os, sys, time, epics
drops = []
pv = epics.PV(
    sys.argv[1], auto_monitor=False, connection_callback=lambda conn, **kw: conn or drops.append(1)
)
assert pv.wait_for_connection(timeout=5)
time.sleep(float(sys.argv[2]))
print(len(drops), pv.get(use_monitor=False, timeout=5))
"""


@pytest.mark.slow
def test_silent_circuits_are_closed_and_live_clients_kept(make_relay):
    relay = make_relay(extra=["--client-idle-timeout", "2"])
    name = relay.name("alive", "f1")
    reader, writer = Context(), Context()
    idle = socket.create_connection(("127.0.0.1", CA_PORT), timeout=5)
    try:
        idle.sendall(VERSION)  # a CA client, which then falls silent
        events = []

        def on_event(sub, response):  # held here: caproto keeps only a weak reference
            events.append(float(response.data[0]))

        pv_w = connect(writer, name)
        assert pv_w.write([0.0], wait=True, timeout=5).status.success
        pv_r = connect(reader, name)
        sub = pv_r.subscribe()
        sub.add_callback(on_event)
        wait_for(lambda: events, what="the first monitor event")
        env = {**os.environ, "EPICS_CA_CONN_TMO": "1"}
        libca = subprocess.Popen(
            [sys.executable, "-c", IDLE_LIBCA, name, "6"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # The writer sends, the reader only receives (and acknowledges) for three
        # idle timeouts; the raw circuit sends nothing.
        deadline = time.monotonic() + 6
        k = 0
        while time.monotonic() < deadline:
            k += 1
            pv_w.write([float(k)], wait=False)
            time.sleep(0.2)
        wait_for(lambda: _closed_by_server(idle), timeout=10, what="the idle circuit closed")
        wait_for(lambda: events[-1] == float(k), what="the last monitor event")
        closes = [line for line in relay.log().splitlines() if "closed CA circuit" in line]
        assert len(closes) == 1 and "nothing sent or acknowledged" in closes[0], closes
        assert pv_w.write([-1.0], wait=True, timeout=5).status.success
        assert list(pv_r.read(timeout=5).data) == [-1.0]
        out, _ = libca.communicate(timeout=60)
        assert out.split()[-2:] == ["0", "-1.0"], out  # never dropped, still served
    finally:
        idle.close()
        close(reader)
        close(writer)


def _stall_large_write(count: int, fraction: float) -> socket.socket:
    """A circuit that sends the header of a WRITE of ``count`` doubles and ``fraction`` of
    its payload, then nothing."""
    s = socket.create_connection(("127.0.0.1", CA_PORT), timeout=5)
    payload = count * 8
    # Extended header: postsize 0xffff and count 0 say the 32-bit sizes follow.
    header = struct.pack("!HHHHIIII", CA_PROTO_WRITE, 0xFFFF, DBR_DOUBLE, 0, 1, 0, payload, count)
    with contextlib.suppress(OSError):  # refused while sending
        s.sendall(VERSION + header + bytes(int(payload * fraction)))
    return s


@pytest.mark.slow
def test_stalled_large_messages_pin_bounded_memory_and_are_closed(make_relay):
    count, max_clients = 250_000, 10
    relay = make_relay(
        extra=[
            "--max-clients",
            str(max_clients),
            "--max-elements",
            str(count),
            "--max-pvs",
            "100",
            # Short, so that the stall rule closes the stalled circuits soon; this test's
            # own libca circuit reads while they are opened, so it does not idle out.
            "--client-idle-timeout",
            "10",
        ]
    )
    pid = _broker_pid(relay)
    name = relay.name("after", "f1")
    put(name, 1.5)  # this client's circuit is one of the max_clients
    before = _rss(pid)
    socks = []
    for k in range(90):
        socks.append(_stall_large_write(count, 0.9))
        if k % 10 == 9:
            # A read now and then keeps this client's circuit from idling out while the
            # stalled ones are opened, however long a loaded machine takes for that.
            assert get(name) == 1.5
    large_buffer = count * 8 + 16384
    # Each circuit that PCAS reads a large message from takes a large buffer, which PCAS
    # keeps for later ones; only circuits within max_clients get to keep theirs.
    bound = (max_clients + 4) * large_buffer + 16 * 2**20
    try:
        assert get(name) == 1.5  # the client within max_clients is served meanwhile
        grown = _rss(pid) - before
        assert grown <= bound, f"broker grew by {grown} bytes, bound {bound}"
        assert "refused CA circuit" in relay.log()
        wait_for(
            lambda: all(_closed_by_server(s) for s in socks),
            timeout=40,
            what="every stalled circuit closed",
        )
        assert "perhaps in the middle of a message" in relay.log()
        grown = _rss(pid) - before
        assert grown <= bound, f"broker grew by {grown} bytes, bound {bound}"
        # A new client is served once the stalled circuits are gone.
        r = _caget(name)
        assert r.returncode == 0 and r.stdout.strip() == "1.5", r.stdout + r.stderr
    finally:
        for s in socks:
            s.close()


class _RawCircuit:
    """A CA circuit spoken by hand: requests as caproto writes them, the server's replies
    counted by command (and the server id of each channel it makes kept)."""

    def __init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", CA_PORT), timeout=5)
        self.buf = bytearray()
        self.seen: collections.Counter = collections.Counter()
        self.sids: dict[int, int] = {}  # cid -> sid
        self.send(
            ca.VersionRequest(priority=0, version=13),
            ca.HostNameRequest("raw"),
            ca.ClientNameRequest("raw"),
        )

    def send(self, *commands) -> None:
        self.sock.sendall(b"".join(bytes(c) for c in commands))

    def create(self, name: str, cids) -> None:
        self.send(*(ca.CreateChanRequest(name=name, cid=cid, version=13) for cid in cids))

    def clear(self, cids) -> None:
        self.send(*(ca.ClearChannelRequest(sid=self.sids[cid], cid=cid) for cid in cids))

    def _take(self) -> None:
        while len(self.buf) >= 16:
            command, size, _t, _c, p1, p2 = struct.unpack_from("!HHHHII", self.buf)
            if len(self.buf) < 16 + size:
                return
            if command == CA_PROTO_CREATE_CHAN:
                self.sids[p1] = p2
            self.seen[command] += 1
            del self.buf[: 16 + size]

    def wait(self, command: int, count: int, timeout: float = 10) -> None:
        """Read until the server has sent ``count`` replies ``command`` in all."""
        self.sock.settimeout(timeout)
        while self.seen[command] < count:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("the relay closed the circuit")
            self.buf += data
            self._take()


CA_PROTO_CLEAR_CHANNEL = 12
CA_PROTO_CREATE_CHAN = 18


def test_a_circuit_asking_for_more_than_max_channels_is_closed(make_relay):
    """Opened and cleared by the hundred, a circuit's channels stay within max_channels and
    it is served; the one channel past it closes the circuit, logged once, and nobody else
    notices."""
    relay = make_relay(shards=1, extra=["--max-channels", "40"])
    name = relay.name("chan", "f1")
    put(name, 2.5)
    raw = _RawCircuit()
    try:
        for k in range(3):
            cids = range(40 * k, 40 * (k + 1))
            raw.create(name, cids)
            raw.wait(CA_PROTO_CREATE_CHAN, 40 * (k + 1))
            raw.clear(cids)
            raw.wait(CA_PROTO_CLEAR_CHANNEL, 40 * (k + 1))
        # A clearing of an id the server does not hold is confirmed too: no room made.
        raw.create(name, range(200, 240))
        raw.wait(CA_PROTO_CREATE_CHAN, 160)
        raw.send(*(ca.ClearChannelRequest(sid=9_000_000 + k, cid=200) for k in range(5)))
        raw.wait(CA_PROTO_CLEAR_CHANNEL, 125)
        start = len(relay.log())
        raw.create(name, [240])
        assert _ends_within(raw.sock, 5), "a circuit past max_channels stayed open"
    finally:
        raw.sock.close()
    wait_for(lambda: "asked for more than 40 channels" in relay.log()[start:], what="the log")
    assert "(max_channels)" in relay.log()[start:]
    assert get(name) == 2.5
