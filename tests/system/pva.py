"""PV Access for the system tests: the session's PVA ports, a relay with ``pva = true``
and p4p clients pointed at it.

Like the CA port (conftest.py), the ports are chosen once per session, before any
client starts, and never the default PVA ports 5075/5076: a TCP port for the server
(EPICS_PVAS_SERVER_PORT, which clients reach as a name server) and a UDP port for its
searches and beacons (EPICS_PVAS_BROADCAST_PORT).
"""

from __future__ import annotations

import os

from bench.servers import free_port
from tests.system.conftest import CA_PORT, REPEATER_PORT, Relay

PVA_PORT = int(os.environ.get("CARELAY_TEST_PVA_PORT") or free_port({CA_PORT, REPEATER_PORT}))
os.environ["CARELAY_TEST_PVA_PORT"] = str(PVA_PORT)
PVA_UDP_PORT = int(
    os.environ.get("CARELAY_TEST_PVA_UDP_PORT") or free_port({CA_PORT, REPEATER_PORT, PVA_PORT})
)
os.environ["CARELAY_TEST_PVA_UDP_PORT"] = str(PVA_UDP_PORT)
#: What the relay's PVA server reads (pvxs, useenv).
SERVER_ENV = {
    "EPICS_PVAS_SERVER_PORT": str(PVA_PORT),
    "EPICS_PVAS_BROADCAST_PORT": str(PVA_UDP_PORT),
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
}
os.environ.update(SERVER_ENV)
#: A client's configuration (useenv=False): the server by TCP, no broadcast search.
CLIENT_CONF = {
    "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{PVA_PORT}",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVA_BROADCAST_PORT": str(PVA_UDP_PORT),
    "EPICS_PVA_SERVER_PORT": str(PVA_PORT),
}


def pva_context():
    """A p4p client context on the session's PVA ports (close it when done)."""
    from p4p.client.thread import Context

    return Context("pva", conf=CLIENT_CONF, useenv=False)


def with_context(call):
    """``call`` with a new p4p client context (each one makes its channels anew)."""
    ctx = pva_context()
    try:
        return call(ctx)
    finally:
        ctx.close()


def read_then_write(name: str, new, timeout: float = 5.0):
    """What a new p4p client reads from ``name``; it then puts ``new`` to it."""

    def call(ctx):
        value = ctx.get(name, timeout=timeout)
        ctx.put(name, new, timeout=timeout)
        return value

    return with_context(call)


class PvaRelay(Relay):
    """A relay with ``--pva true``: ready once the CA broker and the PVA front-end are."""

    def __init__(self, tmp, shards: int = 2, extra: list[str] | None = None) -> None:
        super().__init__(tmp, shards, ["--pva", "true", *(extra or [])])

    def wait_ready(self, start: int = 0) -> None:
        self.wait_log(" broker: ready:", start=start)
        self.wait_log(" pva: ready:", start=start)
