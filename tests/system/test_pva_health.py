"""The PVA front-end in the CA broker's health: ``relay:PVA_UP`` and /metrics.

1 while it serves; a MAJOR STATE alarm while it is alive but silent (SIGSTOP), as its
status file goes stale; 0 with no alarm on a relay without PVA.
"""

from __future__ import annotations

import os
import signal

import pytest

from bench.servers import free_port
from tests.system.clients import read_sevr, role_pid
from tests.system.conftest import CA_PORT, REPEATER_PORT, wait_for
from tests.system.pva import PVA_PORT, PVA_UDP_PORT, PvaRelay
from tests.system.test_metrics import scrape, value

pytest.importorskip("p4p")

METRICS_PORT = free_port({CA_PORT, REPEATER_PORT, PVA_PORT, PVA_UDP_PORT})
_MAJOR = 2


@pytest.fixture
def pva_relay(make_relay):
    return make_relay(shards=1, extra=["--metrics-port", str(METRICS_PORT)], kind=PvaRelay)


@pytest.mark.slow
def test_pva_up_follows_the_pva_front_end(pva_relay, ca):
    relay = pva_relay
    up = relay.prefix + "relay:PVA_UP"
    wait_for(lambda: read_sevr(ca, up) == (1.0, 0), what="PVA_UP 1")
    wait_for(lambda: value(scrape(METRICS_PORT), "carelay_pva_up") == 1.0, what="pva_up 1")
    pid = role_pid(relay, "pva")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: read_sevr(ca, up) == (0.0, _MAJOR), timeout=20, what="PVA_UP 0, MAJOR")
        assert value(scrape(METRICS_PORT), "carelay_pva_up") == 0.0
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: read_sevr(ca, up) == (1.0, 0), timeout=20, what="PVA_UP 1 again")


def test_a_relay_without_pva_says_0_with_no_alarm(relay, ca):
    assert read_sevr(ca, relay.prefix + "relay:PVA_UP") == (0.0, 0)
