"""listening_tcp_ports (this process's listening TCP sockets, from /proc) and udp_port_held."""

from __future__ import annotations

import socket

import pytest

from carelay.broker.listening import listening_tcp_ports, udp_port_held


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


def _udp(reuse: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_a_udp_port_shared_as_ca_servers_share_it_is_free():
    with _udp(reuse=True) as other_ca_server:
        port = other_ca_server.getsockname()[1]
        assert udp_port_held(["127.0.0.1"], port) is None
        assert udp_port_held([f"127.0.0.1:{port}"], 1) is None


def test_a_udp_port_held_alone_is_named_on_each_interface_form():
    with _udp(reuse=False) as holder:
        port = holder.getsockname()[1]
        why = udp_port_held(["127.0.0.1"], port)
        assert why.startswith(f"UDP port {port} on 127.0.0.1 is held by a program"), why
        assert udp_port_held([], port) is not None  # every interface: 0.0.0.0 too
        assert udp_port_held([f"127.0.0.1:{port}"], 1) is not None
    assert "cannot bind UDP port" in udp_port_held(["192.0.2.1"], port)  # not ours
