"""``/metrics`` serves a few connections at once, each for a few seconds.

prometheus_client's server takes a thread per connection, for as long as the client
keeps it, with no bound: 1,000 sockets that sent half a request took 1,000 threads and
every descriptor of the broker (CA clients could no longer connect: "Too many open
files"), and closing them stalled the broker's loop for seconds.  A real server here,
and raw sockets that stall.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import urllib.request

import pytest

from carelay.broker import metrics
from carelay.broker.health import Health

STALLED = 60


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(metrics, "METRICS_TIMEOUT", 1.0)
    server = metrics.serve_metrics(Health(1, "test"), "127.0.0.1", 0)
    yield server
    server.shutdown()
    server.server_close()


def _stall(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-a: ")  # and nothing more
    return sock


def _closed(socks: list[socket.socket], want: int, timeout: float = 10.0) -> set:
    """The sockets the server closed, once ``want`` of them are (or ``timeout`` passed)."""
    closed: set = set()
    deadline = time.monotonic() + timeout
    while len(closed) < want and time.monotonic() < deadline:
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.05)
        closed.update(s for s in readable if s.recv(1) == b"")
    return closed


def _scrape(port: int) -> int:
    """The status of a scrape (the collector says nothing before its first snapshot)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        reply.read()
        return reply.status


def test_stalled_connections_take_a_few_threads_and_go(server):
    port = server.server_address[1]
    before = threading.active_count()
    socks = [_stall(port) for _ in range(STALLED)]
    try:
        # Those past the bound are closed at once, the others after METRICS_TIMEOUT.
        held = STALLED - metrics.METRICS_CONNECTIONS
        assert len(_closed(socks, held)) >= held
        assert threading.active_count() <= before + metrics.METRICS_CONNECTIONS
        assert len(_closed(socks, STALLED)) == STALLED, "one was kept past its timeout"
        assert _scrape(port) == 200  # served again
    finally:
        for s in socks:
            s.close()


def test_scrapes_are_served_one_after_another(server):
    port = server.server_address[1]
    for _ in range(3 * metrics.METRICS_CONNECTIONS):
        assert _scrape(port) == 200
