"""A burst of puts to a monitored PV, as a script writing fast while a display watches.

The broker posts at most TURN_POST_CAP events of one PV in one turn of its loop and
merges the rest into one event when the turn ends (an IOC's CA server merges them
too, once a subscription's queue is full): the monitor still gets the burst's last
value with its own stamp, and its events in order.  ``carelay_events_merged_total``
counts the merged ones.
"""

from __future__ import annotations

import ctypes

import epics
import pytest

from bench.servers import free_port
from tests.system.clients import connect, put
from tests.system.conftest import CA_PORT, wait_for
from tests.system.test_metrics import scrape, value

pytestmark = pytest.mark.system

BURST = 1000


def _burst(name: str, first: float) -> float:
    """BURST puts without callback of first, first + 1, ... on one pyepics channel, sent
    with one flush as a C client sends them; returns the last value."""
    chid = epics.ca.create_channel(name, connect=True, auto_cb=False)
    libca = epics.ca.libca
    data = ctypes.c_double()
    for i in range(BURST):
        data.value = first + i
        ret = libca.ca_array_put(epics.ca.dbr.DOUBLE, 1, chid, ctypes.byref(data))
        assert ret == epics.ca.dbr.ECA_NORMAL, epics.ca.message(ret)
    libca.ca_flush_io()
    return first + BURST - 1


def test_a_burst_to_a_monitored_pv_ends_with_its_last_value_in_order(make_relay, ca):
    port = free_port({CA_PORT})
    relay = make_relay(extra=["--metrics-port", str(port)])
    name = relay.name("burst", "f1")
    put(name, 0.0)
    pv = connect(ca, name)
    seen: list = []

    def on_event(sub, response):
        seen.append((response.data[0].item(), response.metadata.timestamp))

    sub = pv.subscribe(data_type="time")
    sub.add_callback(on_event)  # caproto keeps a weak reference: this frame keeps it
    wait_for(lambda: seen, what="the first event")
    merged = value(scrape(port), "carelay_events_merged_total") or 0

    last = _burst(name, 1.0)
    wait_for(lambda: seen[-1][0] == last, what=f"the burst's last value {last} in an event")
    values = [v for v, _ in seen]
    stamps = [t for _, t in seen]
    assert values == sorted(set(values)), f"events out of order or repeated: {values}"
    assert stamps == sorted(stamps), "stamps out of order"
    # The last event carries the last value's own stamp, the one a read gets.
    read = pv.read(data_type="time")
    assert read.data[0] == last and read.metadata.timestamp == stamps[-1]
    # The broker did not build an event per put: most were merged.
    wait_for(
        lambda: (value(scrape(port), "carelay_events_merged_total") or 0) >= merged + BURST // 2,
        what="the merged events counted",
    )
    sub.clear()
