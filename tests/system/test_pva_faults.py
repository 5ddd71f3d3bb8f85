"""The PVA front-end and the CA broker fail apart: a kill -9 of one leaves the other
serving, and the supervisor brings the killed one back."""

from __future__ import annotations

import os
import queue
import signal

import pytest

from tests.system.clients import connect, get, put, role_pid
from tests.system.conftest import wait_for
from tests.system.pva import PvaRelay, pva_context, read_then_write

pytest.importorskip("p4p")


@pytest.fixture
def pva_relay(make_relay):
    """A relay of the test's own, with PVA: the test kills its processes."""
    return make_relay(kind=PvaRelay)


def test_pva_killed_is_restarted_and_ca_goes_on(pva_relay, ca):
    relay = pva_relay
    name = relay.name("k9", "f1")
    put(name, 1.0)
    pv = connect(ca, name)
    events: queue.Queue = queue.Queue()

    def on_event(_sub, response):
        events.put(response.data[0])

    sub = pv.subscribe(data_type="time")
    sub.add_callback(on_event)
    held = pva_context()  # a client that stays through the kill
    seen: queue.Queue = queue.Queue()
    monitor = held.monitor(name, seen.put, notify_disconnect=True)
    units: queue.Queue = queue.Queue()
    field = held.monitor(name + ".EGU", units.put, notify_disconnect=True)  # a field's too
    wait_for(lambda: 1.0 in list(seen.queue), what="the PVA monitor to see the CA put")
    wait_for(lambda: "" in list(units.queue), what="the PVA field monitor's first event")
    old = role_pid(relay, "pva")
    assert old is not None
    offset = len(relay.log())
    os.kill(old, signal.SIGKILL)
    # CA is untouched: its monitor and its puts go on while the PVA front-end is gone.
    put(name, 2.0)
    wait_for(lambda: 2.0 in list(events.queue), what="the CA monitor to go on")
    relay.wait_log(" pva: ready:", start=offset)
    assert role_pid(relay, "pva") not in (None, old)
    assert read_then_write(name, 3.0) == 2.0
    wait_for(lambda: 3.0 in list(events.queue), what="the CA monitor to see the PVA put")
    sub.clear()
    # The client that stayed has reconnected by itself, its field channel too.
    wait_for(lambda: 3.0 in list(seen.queue), what="the held PVA monitor to reconnect")
    put(name + ".EGU", "V")
    wait_for(lambda: "V" in list(units.queue), what="the held field monitor to reconnect")
    field.close()
    monitor.close()
    held.close()


def test_broker_killed_leaves_pva_serving(pva_relay):
    relay = pva_relay
    name = relay.name("b9", "f1")
    ctx = pva_context()
    try:
        ctx.put(name, 1.0, timeout=5)
        broker = role_pid(relay, "broker")
        offset = len(relay.log())
        os.kill(broker, signal.SIGKILL)
        ctx.put(name, 2.0, timeout=5)
        assert ctx.get(name, timeout=5) == 2.0
        relay.wait_log(" broker: ready:", start=offset)
        wait_for(lambda: get(name) == 2.0, timeout=30, what="the restarted broker to serve it")
        ctx.put(name, 4.0, timeout=5)
    finally:
        ctx.close()
    wait_for(lambda: get(name) == 4.0, what="CA to read the PVA put")


def test_a_pva_put_during_a_short_shard_restart_waits_for_it(pva_relay):
    from tests.system.clients import name_on_shard

    relay = pva_relay
    name = name_on_shard(relay, 0, "grace")
    ctx = pva_context()
    severities: queue.Queue = queue.Queue()
    try:
        ctx.put(name, 1.5, timeout=5)
        # A field channel held through the restart: it shows the alarm the PV is in.
        sevr = ctx.monitor(name + ".SEVR", severities.put, notify_disconnect=True)
        _wait_severity(severities, 0)
        mark = len(relay.log())
        os.kill(role_pid(relay, "shard 0"), signal.SIGKILL)
        # The front-end saw the shard go (COMM alarm): the put below comes during the restart.
        wait_for(
            lambda: ctx.get(name, timeout=5).raw["alarm.message"] == "COMM",
            interval=0.01,
            what="the COMM alarm over PVA",
        )
        _wait_severity(severities, 3)  # INVALID while its shard is gone
        ctx.put(name, 2.5, timeout=10)
        assert ctx.get(name, timeout=5) == 2.5
        _wait_severity(severities, 0)  # and none once it is back
        put(name + ".EGU", "V")  # through CA, to the new shard process
        assert ctx.get(name + ".EGU", timeout=5) == "V"
        sevr.close()
    finally:
        ctx.close()
    assert "put to " not in relay.log()[mark:], "a put failed"
    wait_for(lambda: get(name) == 2.5, what="CA to read the put made during the restart")


def _wait_severity(events: queue.Queue, severity: int) -> None:
    """Take the events of a ``NAME.SEVR`` monitor until one shows ``severity``."""
    while True:
        v = events.get(timeout=20)
        if not isinstance(v, Exception) and int(v) == severity:
            return
