"""The caproto context the system tests use outlives a server it cannot reach yet."""

from __future__ import annotations

import socket
import threading

import caproto.threading.client
import pytest

from tests.system.clients import Context, _Closed, close


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def circuit_to(ctx, port: int):
    """Open a circuit as caproto's search-results thread does after a search reply from
    127.0.0.1:``port`` (an old protocol version: no handshake is awaited)."""
    address = ("127.0.0.1", port)
    ctx.broadcaster.server_protocol_versions[address] = 11
    return ctx.get_circuit_manager(address, 0)


def test_plain_context_fails_on_a_refused_connection():
    """The fault the tests' context exists for: caproto raises in the thread that opens
    circuits, which then dies."""
    ctx = caproto.threading.client.Context()
    try:
        with pytest.raises(ConnectionRefusedError):
            circuit_to(ctx, free_port())
    finally:
        close(ctx)


def test_context_connects_once_the_server_listens_again():
    port = free_port()
    listening = threading.Event()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

        def listen_soon() -> None:
            server.bind(("127.0.0.1", port))
            server.listen()
            listening.set()

        timer = threading.Timer(0.5, listen_soon)
        ctx = Context()
        try:
            timer.start()
            cm = circuit_to(ctx, port)
            assert listening.is_set()
            assert cm.socket.getpeername() == ("127.0.0.1", port)
        finally:
            timer.cancel()
            close(ctx)


def test_context_gives_up_after_its_patience():
    ctx = Context()
    ctx.patience = 0.3
    try:
        with pytest.raises(ConnectionRefusedError):
            circuit_to(ctx, free_port())
    finally:
        close(ctx)


def test_a_context_closed_while_it_tries_again_ends_its_thread_quietly(monkeypatch):
    """A test closes its contexts while the relay is down: the search thread, trying a
    circuit again, ends without an unhandled error (which pytest would report)."""
    ctx = Context()
    try:
        ctx._close_event.set()
        with pytest.raises(_Closed):
            circuit_to(ctx, free_port())

        def closed_meanwhile(self):
            raise _Closed

        # The search loop (the thread's target) ends on it, quietly.
        monkeypatch.setattr(
            caproto.threading.client.Context, "_process_search_results_loop", closed_meanwhile
        )
        assert ctx._process_search_results_loop() is None
    finally:
        close(ctx)
