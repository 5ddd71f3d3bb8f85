"""A p4p server on loopback (a free TCP port, a UDP port of its own) and a client of it,
for the unit tests that need real PVA traffic without a relay."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(providers: list) -> Iterator:
    """A p4p Server of ``providers`` and a client Context pointed at it, until the block
    ends (both closed then)."""
    from p4p.client.thread import Context
    from p4p.server import Server

    udp = str(_free_udp_port())
    server_conf = {
        "EPICS_PVAS_SERVER_PORT": "0",
        "EPICS_PVAS_BROADCAST_PORT": udp,
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    }
    with Server(providers=providers, conf=server_conf, useenv=False) as server:
        port = server.conf()["EPICS_PVAS_SERVER_PORT"]
        client_conf = {
            "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{port}",
            "EPICS_PVA_ADDR_LIST": "127.0.0.1",
            "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_BROADCAST_PORT": udp,
        }
        ctx = Context("pva", conf=client_conf, useenv=False)
        try:
            yield ctx
        finally:
            ctx.close()
