"""listening_tcp_ports: this process's listening TCP sockets, read from /proc."""

from __future__ import annotations

import socket

import pytest

from carelay.broker.listening import listening_tcp_ports


def test_a_listening_socket_is_found_and_a_bound_one_is_not():
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound,
    ):
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound.bind(("127.0.0.1", 0))
        ports = listening_tcp_ports()
        assert listening.getsockname()[1] in ports
        assert bound.getsockname()[1] not in ports


def test_ipv6_listeners_count_too():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        try:
            s.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        s.listen()
        assert s.getsockname()[1] in listening_tcp_ports()


def test_no_such_process_gives_nothing():
    assert listening_tcp_ports(2**22 + 1) == []
