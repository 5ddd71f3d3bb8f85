"""The control PVs (``<prefix>pvlist``, ``<prefix>delpv``) and the names the relay refuses."""

from __future__ import annotations

import subprocess
import sys
import time

import epics
import numpy as np
import pytest
from caproto import AccessRights, AlarmSeverity, AlarmStatus, ChannelType

from tests.system.clients import Context, connect, get, get_array, put, pvlist, write_status
from tests.system.conftest import caproto_cli, wait_for


def delete(ca, relay, name):
    """Delete ``name`` through delpv with a put with callback; the CA status."""
    return write_status(connect(ca, relay.prefix + "delpv"), name.encode())


# -- pvlist ---------------------------------------------------------------------------------


def test_pvlist_lists_every_pv_and_nothing_else(make_relay, ca):
    relay = make_relay()
    assert pvlist(relay) == []
    names = [
        relay.name(stem, tc)
        for stem, tc in [("a", "f1"), ("b", "i4"), ("c", "C8"), ("d", "s1"), ("e", "c20")]
    ]
    values = [1.0, [1, 2], "log", "text", "more text"]
    for name, value in zip(names, values, strict=True):
        put(name, value)
    # One more attached but never put to: provisional, not listed.
    provisional = relay.name("z", "f1")
    assert (
        connect(ca, provisional).read(data_type="time").metadata.severity
        == AlarmSeverity.INVALID_ALARM
    )

    assert pvlist(relay) == sorted(names)
    r = caproto_cli("get", "-S", relay.prefix + "pvlist")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1].split(",") == sorted(names)
    # A char array, read-only.
    pl = connect(ca, relay.prefix + "pvlist")
    assert pl.channel.native_data_type == ChannelType.CHAR
    assert not write_status(pl, b"x").success
    assert pvlist(relay) == sorted(names)


def test_read_only_pvs_tell_clients_they_may_not_write(relay, ca):
    """CA tells each client, channel by channel, whether it may write: a display tool
    draws its widget by it, and libca refuses a put it may not make.  ``pvlist``,
    ``NAME.NELM``, ``NAME.NORD`` and the health PVs are read, never written."""
    name = relay.name("rights", "F4")
    put(name, [1.5])
    writable = [name, f"{name}.EGU", relay.prefix + "delpv"]
    for pv in ca.get_pvs(*writable, timeout=5):
        pv.wait_for_connection(timeout=5)
        assert pv.access_rights == AccessRights.READ | AccessRights.WRITE, pv.name
    read_only = {
        relay.prefix + "pvlist": b"x",
        f"{name}.NELM": [9],
        f"{name}.NORD": [3],
        relay.prefix + "relay:HEARTBEAT": [7],
    }
    for pv_name, data in read_only.items():
        pv = connect(ca, pv_name)
        assert pv.access_rights == AccessRights.READ, pv_name
        assert pv.read(timeout=5).status.success, pv_name
        assert write_status(pv, data).name == "ECA_NOWTACCESS", pv_name
    # libca says the same.
    pvlist_pv = epics.PV(relay.prefix + "pvlist")
    assert pvlist_pv.wait_for_connection(timeout=5)
    assert (pvlist_pv.read_access, pvlist_pv.write_access) == (True, False)
    assert list(get_array(name)) == [1.5]
    assert f"{name}.NELM" not in pvlist(relay) and name in pvlist(relay)


def test_pvlist_monitor_sees_a_new_pv(relay, ca):
    name = relay.name("watched", "f1")
    seen = []

    def on_update(sub, response):
        seen.append(bytes(response.data).rstrip(b"\0").decode())

    sub = connect(ca, relay.prefix + "pvlist").subscribe(data_count=0)
    sub.add_callback(on_update)
    wait_for(lambda: seen, what="the initial pvlist event")
    put(name, 1.0)
    wait_for(lambda: name in seen[-1].split(","), what=f"{name} in a pvlist event")
    sub.clear()


# -- delpv -----------------------------------------------------------------------------------


def test_delpv_deletes_and_the_name_can_be_created_again(relay, ca):
    scalar, buf = relay.name("gone", "f1"), relay.name("gone", "F5")
    put(scalar, 2.5)
    put(buf, [1.0, 2.0, 3.0])
    assert {scalar, buf} <= set(pvlist(relay))

    # A monitor on the PV sees it go back to undefined.
    events = []

    def on_event(sub, response):
        events.append((response.metadata.severity, response.metadata.status))

    sub = connect(ca, scalar).subscribe(data_type="time")
    sub.add_callback(on_event)
    wait_for(lambda: events, what="the initial event")

    assert delete(ca, relay, scalar).success
    listed = pvlist(relay)
    assert scalar not in listed
    assert buf in listed
    wait_for(
        lambda: (AlarmSeverity.INVALID_ALARM, AlarmStatus.UDF) in events,
        what="an INVALID/UDF event",
    )
    md = connect(ca, scalar).read(data_type="time").metadata
    assert (md.severity, md.status) == (AlarmSeverity.INVALID_ALARM, AlarmStatus.UDF)
    # A fresh client in its own process sees it undefined as well.
    r = caproto_cli("get", "-d", "time", "--format", "{response.metadata.status}", scalar)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(int(AlarmStatus.UDF))
    sub.clear()

    # delpv through caproto-put and pyepics too.
    r = caproto_cli("put", "-c", "-S", relay.prefix + "delpv", buf)
    assert r.returncode == 0, r.stderr
    assert buf not in pvlist(relay)

    # Both come back with a put, the buffer empty before it.
    put(scalar, 7.5)
    put(buf, [9.0])
    assert get(scalar) == 7.5
    np.testing.assert_array_equal(get_array(buf), [9.0])
    assert {scalar, buf} <= set(pvlist(relay))
    assert epics.caput(relay.prefix + "delpv", buf, wait=True, timeout=5) == 1
    assert buf not in pvlist(relay)


def test_delpv_takes_the_longest_name_with_its_terminator(relay, ca):
    """A name of max_name_length characters, sent with the NUL that pyepics and
    caput -S add: delpv has room for both."""
    stem = "x" * (128 - len(relay.prefix) - len("_f1"))  # 128: the default max_name_length
    name = f"{relay.prefix}{stem}_f1"
    put(name, 1.0)
    assert name in pvlist(relay)
    assert write_status(connect(ca, relay.prefix + "delpv"), name.encode() + b"\0").success
    assert name not in pvlist(relay)


@pytest.mark.parametrize(
    "what", ["never existed", "provisional", "already deleted", "not a PV name"]
)
def test_delpv_of_a_name_that_does_not_exist_fails(relay, ca, what):
    name = relay.name("absent", "f1")
    if what == "provisional":
        connect(ca, name)  # attached, never put to
    elif what == "already deleted":
        put(name, 1.0)
        assert delete(ca, relay, name).success
    elif what == "not a PV name":
        name = "no such thing"
    keep = relay.name("kept", "f1")
    put(keep, 3.0)
    before = pvlist(relay)
    assert not delete(ca, relay, name).success
    assert pvlist(relay) == before
    assert get(keep) == 3.0


# -- refused names --------------------------------------------------------------------------


def test_names_outside_the_rule_are_not_served_and_logged_once(make_relay):
    relay = make_relay(extra=["--max-elements", "1000"])
    p = relay.prefix
    refused = [
        f"{p}bad!char_f1",  # a character outside the rule
        f"{p}no_type",  # no _<type><count>
        f"{p}temp_x1",  # no such type
        f"{p}temp_f",  # no count
        f"{p}temp_S1",  # no string buffers
        f"{p}temp_s2",  # a string has count 1
        f"{p}zero_f0",  # count 0
        f"{p}zero_F0",
        f"{p}lead_f01",  # leading zero
        f"{p}big_f1001",  # above --max-elements
        f"{p}big_C1001",
    ]
    served = f"{p}edge_f1000"

    # Searches from other processes (caproto-get gives up after -w seconds),
    # alongside the searches of this process's own context.
    clis = [
        subprocess.Popen(
            [sys.executable, "-m", "caproto.commandline.get", "--no-repeater", "-w", "1", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in refused
    ]
    own = Context()  # its own, so that its searches stop with this test
    try:
        pvs = own.get_pvs(*refused, served, timeout=1)
        pvs[-1].wait_for_connection(timeout=5)
        assert pvs[-1].channel.native_data_count == 1000
        deadline = time.monotonic() + 1.0
        for pv in pvs[:-1]:
            with pytest.raises(TimeoutError):
                pv.wait_for_connection(timeout=max(0.05, deadline - time.monotonic()))
    finally:
        own.disconnect()
    for name, cli in zip(refused, clis, strict=True):
        out, err = cli.communicate(timeout=30)
        # caproto-get exits 0 when its search times out; it says so.
        assert "Timed out while awaiting a response from the search" in out, (name, out, err)
    # Once more from a fresh process, for good measure.
    r = caproto_cli("get", "-w", "0.5", refused[0])
    assert "Timed out" in r.stdout, r.stdout

    log = relay.log()
    for name in refused:
        lines = [line for line in log.splitlines() if f"refused PV name {name}:" in line]
        assert len(lines) == 1, (name, lines)
    assert f"refused PV name {served}" not in log
    assert pvlist(relay) == []
