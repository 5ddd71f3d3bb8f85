"""A PVA server that cannot start says which port: its UDP port, held by a program
that does not share it (a taken TCP port pvxs replaces by another)."""

from __future__ import annotations

import socket

import pytest

from carelay.broker.pva.run import server_failed

pytest.importorskip("p4p")


def test_a_udp_port_held_alone_is_named(monkeypatch):
    from p4p.server import Server, StaticProvider

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        monkeypatch.setenv("EPICS_PVAS_BROADCAST_PORT", str(port))
        monkeypatch.setenv("EPICS_PVAS_SERVER_PORT", "0")
        monkeypatch.setenv("EPICS_PVAS_INTF_ADDR_LIST", "127.0.0.1")
        with pytest.raises(Exception) as failed:  # noqa: B017 - whatever p4p raises
            Server(providers=[StaticProvider("x")], useenv=True)
    why = server_failed(failed.value, "127.0.0.1")
    assert "Address already in use" in why, why
    assert f"(UDP port {port} on 127.0.0.1, EPICS_PVAS_BROADCAST_PORT: held by" in why, why


def test_another_failure_is_said_as_it_is():
    assert server_failed(RuntimeError("no interface"), "") == "no interface"
    assert server_failed(RuntimeError(), "") == "RuntimeError"
