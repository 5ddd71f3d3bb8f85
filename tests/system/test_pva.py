"""PV Access over the same shards as CA: a relay with ``pva = true``, real p4p clients
beside real CA clients (caproto's threading client and pyepics).

What one protocol puts, the other reads and monitors; a PVA put completes once the
shard applied it; types, metadata, buffers, pvlist and delpv work over PVA; bad puts are
refused with the reason, and change nothing.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from caproto import SubscriptionType

from tests.system.clients import connect, get, get_array, put
from tests.system.conftest import CA_PORT, using_shared, wait_for
from tests.system.pva import PVA_PORT, PvaRelay, pva_context, with_context

p4p = pytest.importorskip("p4p")


@pytest.fixture(scope="module")
def pva_relay(tmp_path_factory):
    relay = PvaRelay(tmp_path_factory.mktemp("pva"), shards=2)
    relay.shared = True
    yield relay
    relay.stop()


@pytest.fixture
def relay(pva_relay, request):
    yield from using_shared(pva_relay, request)


@pytest.fixture(scope="module")
def pva():
    ctx = pva_context()
    yield ctx
    ctx.close()


def _events(ctx, name):
    """A PVA monitor of ``name``: (the subscription, a queue of the values it got)."""
    got: queue.Queue = queue.Queue()
    sub = ctx.monitor(name, got.put, notify_disconnect=True)
    return sub, got


def _next_value(got: queue.Queue, want, timeout: float = 10.0):
    """The first value in ``got`` equal to ``want`` (skipping others); fails on timeout."""
    while True:
        v = got.get(timeout=timeout)
        if isinstance(v, Exception):
            continue
        if isinstance(want, str):  # numpy takes a p4p string (ntstr) for some other thing
            if v == want:
                return v
        elif np.array_equal(np.atleast_1d(v), np.atleast_1d(want)):
            return v


def test_the_supervisor_says_when_every_front_end_is_ready(relay):
    line = f"all front-ends ready: CA port {CA_PORT}, PVA port {PVA_PORT}"
    wait_for(lambda: line in relay.log(), what="the supervisor's line")


def test_put_creates_get_and_monitor(relay, pva):
    name = relay.name("create", "f1")
    pva.put(name, 2.5, timeout=5)
    assert pva.get(name, timeout=5) == 2.5
    sub, got = _events(pva, name)
    try:
        _next_value(got, 2.5)
        pva.put(name, 3.5, timeout=5)
        _next_value(got, 3.5)
    finally:
        sub.close()
    # Made by a PVA put, served to CA too.
    wait_for(lambda: get(name) == 3.5, what="CA to read the PVA put")


def test_types_over_pva(relay, pva):
    kinds = (("f", "f1"), ("i", "i1"), ("s", "s1"), ("c", "c16"))
    f, i, s, c = (relay.name(k, t) for k, t in kinds)
    pva.put(f, 1.25, timeout=5)
    pva.put(i, 7, timeout=5)
    pva.put(s, "hello", timeout=5)
    pva.put(c, "some text", timeout=5)
    raw = pva.get(f, timeout=5).raw
    assert raw.getID() == "epics:nt/NTScalar:1.0" and raw.type()["value"] == "d"
    assert pva.get(i, timeout=5).raw.type()["value"] == "i"
    assert pva.get(s, timeout=5) == "hello"
    assert pva.get(c, timeout=5) == "some text"
    wait_for(lambda: get(c, as_string=True) == "some text", what="CA to read the text")
    wait_for(lambda: get(i) == 7, what="CA to read the int")


def test_ca_put_to_pva_monitor(relay, pva):
    name = relay.name("ca2pva", "f1")
    # A PVA client waits on a name no one has put to yet: provisional, as on CA.
    sub, got = _events(pva, name)
    try:
        put(name, 4.0)
        _next_value(got, 4.0)
        put(name, 5.0)
        _next_value(got, 5.0)
    finally:
        sub.close()


def test_pva_put_to_ca_monitor(relay, pva, ca):
    name = relay.name("pva2ca", "f1")
    pv = connect(ca, name)  # provisional until the first put
    got: queue.Queue = queue.Queue()

    def on_event(_sub, response):
        got.put(response.data[0])

    sub = pv.subscribe(data_type="time")
    sub.add_callback(on_event)
    try:
        pva.put(name, 6.0, timeout=5)
        wait_for(lambda: 6.0 in list(got.queue), what="the CA monitor to see the PVA put")
        pva.put(name, 7.0, timeout=5)
        wait_for(lambda: 7.0 in list(got.queue), what="the CA monitor to see the next one")
    finally:
        sub.clear()


def test_a_proc_through_ca_reaches_pva_with_its_new_stamp(relay, pva):
    """``NAME.PROC`` through CA processes the PV for every front-end: the PVA monitor gets
    the event, with the new stamp, and a PVA get right after the put reads it."""
    name = relay.name("proc2pva", "f1")
    put(name, 4.0)
    sub, got = _events(pva, name)
    try:
        first = _next_value(got, 4.0)
        put(f"{name}.PROC", 1)
        processed = _next_value(got, 4.0)
        assert processed.timestamp > first.timestamp
        assert pva.get(name, timeout=5).timestamp == processed.timestamp
    finally:
        sub.close()


def test_put_with_callback_then_read_on_the_other(relay, pva):
    """Once a put with callback is done on one protocol, a read at once on the other
    gives the new value.  A PVA put completes once the shard applied it, which sends the
    CA broker the change first, and the CA broker takes what its shard sent before it
    answers a read.  A CA put with callback to a PV a PVA client holds completes only
    once the PVA front-end has shown the change: pvxs answers a PVA get from the value
    last posted, with no hook for the front-end to catch up first."""
    name = relay.name("cb", "f1")
    put(name, -1.0)
    wait_for(lambda: pva.get(name, timeout=5) == -1.0, what="PVA to know the PV")
    stale = []
    for k in range(100):
        put(name, float(k))  # CA put with callback
        if (got := pva.get(name, timeout=5)) != k:
            stale.append((float(k), float(got)))
        pva.put(name, k + 0.5, timeout=5)
        if (got := get(name)) != k + 0.5:
            stale.append((k + 0.5, got))
    assert stale == []


def test_metadata_both_ways(relay, pva):
    name = relay.name("meta", "f1")
    put(name, 1.0)
    sub, got = _events(pva, name)
    try:
        put(name + ".EGU", "degC")
        wait_for(
            lambda: pva.get(name, timeout=5).raw["display.units"] == "degC",
            what="display.units from a CA put to NAME.EGU",
        )

        def units_posted():
            while True:
                v = got.get(timeout=10)
                if not isinstance(v, Exception) and v.raw["display.units"] == "degC":
                    return True

        assert units_posted()
    finally:
        sub.close()
    pva.put(name, {"display.units": "mm", "display.precision": 3}, timeout=5)
    wait_for(lambda: get(name + ".EGU", as_string=True) == "mm", what="CA to read EGU")
    wait_for(lambda: get(name + ".PREC") == 3, what="CA to read PREC")
    put(name + ".HIHI", 10.0)
    put(name + ".DRVH", 20.0)

    def limits():
        raw = pva.get(name, timeout=5).raw
        return (raw["valueAlarm.highAlarmLimit"], raw["control.limitHigh"]) == (10.0, 20.0)

    wait_for(limits, what="HIHI and DRVH from CA as valueAlarm and control limits")
    pva.put(name, 15.0, timeout=5)
    raw = pva.get(name, timeout=5).raw
    assert raw["alarm.severity"] == 2 and raw["alarm.message"] == "HIHI"  # as CA shows it


def test_a_pva_put_of_a_drive_limit_brings_the_value_within_it(relay, pva):
    """control.limitHigh is DRVH: a PVA put of it clips a value past it at once, on both
    protocols, as a CA put of NAME.DRVH does."""
    name = relay.name("pvadrv", "f1")
    pva.put(name, 6.0, timeout=5)
    pva.put(name, {"control.limitHigh": 3.0, "control.limitLow": -3.0}, timeout=5)
    assert pva.get(name, timeout=5) == 3.0  # as soon as the put completed
    assert get(name) == 3.0


def test_an_alarm_limit_put_over_pva_stamps_the_alarm_it_brings_everywhere(relay, pva, ca):
    """valueAlarm.highAlarmLimit is HIHI, whose put processes an ao record (see
    tests/system/test_fields.py): the PVA monitor and a CA monitor, through the other
    front-end, get the alarm it brings with the stamp of that processing, which a get
    right after the put reads."""
    name = relay.name("pvapp", "f1")
    pva.put(name, 5.0, timeout=5)
    sub, got = _events(pva, name)
    alarms: queue.Queue = queue.Queue()

    def on_alarm(_sub, response):  # caproto holds it weakly: kept here
        alarms.put(response.metadata)

    ca_sub = connect(ca, name).subscribe(data_type="time", mask=SubscriptionType.DBE_ALARM)
    ca_sub.add_callback(on_alarm)
    try:
        first = _next_value(got, 5.0)
        alarms.get(timeout=10)  # the initial event
        pva.put(name, {"valueAlarm.highAlarmLimit": 4.0}, timeout=5)
        now = pva.get(name, timeout=5)
        assert now.raw["alarm.severity"] == 2 and now.timestamp > first.timestamp

        def alarmed():
            while True:
                v = got.get(timeout=10)
                if not isinstance(v, Exception) and v.raw["alarm.severity"] == 2:
                    return v

        assert alarmed().timestamp == now.timestamp
        md = alarms.get(timeout=10)
        assert md.severity == 2
        assert md.timestamp == pytest.approx(now.timestamp, abs=1e-6)  # CA's, in ns
    finally:
        sub.close()
        ca_sub.clear()


def test_buffer_appends_and_array_takes_the_length(relay, pva):
    buf = relay.name("buf", "F4")
    pva.put(buf, [1.0, 2.0], timeout=5)
    pva.put(buf, [3.0, 4.0, 5.0], timeout=5)
    assert list(pva.get(buf, timeout=5)) == [2.0, 3.0, 4.0, 5.0]
    wait_for(lambda: list(get_array(buf)) == [2.0, 3.0, 4.0, 5.0], what="CA to read the buffer")
    # A PVA put may carry more than the buffer holds (CA's may not): the last 4 stay.
    pva.put(buf, [6.0, 7.0, 8.0, 9.0, 10.0, 11.0], timeout=5)
    assert list(pva.get(buf, timeout=5)) == [8.0, 9.0, 10.0, 11.0]
    arr = relay.name("arr", "i5")
    pva.put(arr, [1, 2, 3], timeout=5)
    assert list(pva.get(arr, timeout=5)) == [1, 2, 3]
    pva.put(arr, [9, 8], timeout=5)
    assert list(pva.get(arr, timeout=5)) == [9, 8]
    wait_for(lambda: list(get_array(arr)) == [9, 8], what="CA to read the array")


def _pvlist(relay, pva) -> list[str]:
    """The names ``pvlist`` shows over PVA (its value alone: ``str`` of what p4p's get
    returns puts the time stamp and quotes around it)."""
    return pva.get(relay.prefix + "pvlist", timeout=5).raw["value"].split(",")


def test_pvlist_and_delpv(relay, pva):
    name = relay.name("gone", "f1")
    pva.put(name, 1.0, timeout=5)
    assert name in _pvlist(relay, pva)
    pva.put(relay.prefix + "delpv", name, timeout=5)
    assert name not in _pvlist(relay, pva)
    # As over CA: delpv reads the name it deleted last.
    assert pva.get(relay.prefix + "delpv", timeout=5).raw["value"] == name
    with pytest.raises(p4p.client.thread.RemoteError, match="no such PV"):
        pva.put(relay.prefix + "delpv", relay.name("never", "f1"), timeout=5)


def test_bad_puts_refused_with_reason_value_kept(relay, pva):
    f1 = relay.name("bad", "f1")
    pva.put(f1, 1.5, timeout=5)
    with pytest.raises(ValueError):  # text that is no number: p4p cannot send it as one
        pva.put(f1, "abc", timeout=5)
    assert pva.get(f1, timeout=5) == 1.5
    arr = relay.name("small", "f3")
    pva.put(arr, [1.0, 2.0], timeout=5)
    with pytest.raises(p4p.client.thread.RemoteError, match="4 elements for a PV of 3"):
        pva.put(arr, [1.0, 2.0, 3.0, 4.0], timeout=5)
    assert list(pva.get(arr, timeout=5)) == [1.0, 2.0]
    s1 = relay.name("text", "s1")
    pva.put(s1, "short", timeout=5)
    with pytest.raises(p4p.client.thread.RemoteError, match="at most 39 bytes"):
        pva.put(s1, "x" * 40, timeout=5)  # CA could not read it whole
    assert pva.get(s1, timeout=5) == "short"
    c10 = relay.name("note", "c10")
    pva.put(c10, "short", timeout=5)
    with pytest.raises(p4p.client.thread.RemoteError, match="20 characters for a PV of 10"):
        pva.put(c10, "x" * 20, timeout=5)  # refused, as on CA, not cut to 10
    assert pva.get(c10, timeout=5) == "short"
    with pytest.raises(p4p.client.thread.RemoteError, match="PREC takes a whole number"):
        pva.put(f1, {"display.precision": 99}, timeout=5)
    assert get(f1 + ".PREC") == 0

    # Each refusal is in the relay's own PVs too, which the CA brokers serve: they take
    # the PVA front-end's lines from its status file, once a second, so the wait is for
    # the last of them.
    def entered() -> str:
        return get(relay.prefix + "relay:ERRORS", as_string=True)

    wait_for(lambda: "PREC takes a whole number" in entered(), what="the last PVA refusal")
    errors = entered()
    assert f"pv {arr}" in errors and "4 elements for a PV of 3" in errors
    assert "PREC takes a whole number" in errors


def test_names_that_break_the_rule_do_not_exist(relay, pva):
    with pytest.raises(TimeoutError):
        pva.get(relay.prefix + "no_type_here", timeout=1)


def test_status_shows_the_pva_front_end(relay):
    def pva_row():
        rows = [line.split() for line in relay.status().stdout.splitlines()]
        return next((row for row in rows if row[:1] == ["pva"] and row[2] == "running"), None)

    row = wait_for(pva_row, what="carelay status to show pva running")
    assert row[5].isdigit()  # its PV count, from its own status file


def test_deleted_pv_is_made_again_by_a_pva_put(relay, pva):
    held, free = relay.name("held", "f1"), relay.name("free", "f1")
    sub, got = _events(pva, held)  # a client holds this one through the deletion
    try:
        for name in (held, free):
            # A client of its own: none holds ``free`` when it is deleted.
            with_context(lambda ctx, n=name: ctx.put(n, 1.0, timeout=5))
            wait_for(lambda n=name: get(n) == 1.0, what=f"the CA broker to know {name}")
            put(relay.prefix + "delpv", name)
            wait_for(
                lambda n=name: n not in str(pva.get(relay.prefix + "pvlist", timeout=5)),
                what=f"{name} gone from pvlist",
            )
            pva.put(name, 2.0, timeout=5)
            assert pva.get(name, timeout=5) == 2.0
        _next_value(got, 2.0)
    finally:
        sub.close()


def test_clients_that_connect_together_to_a_new_pv_are_all_served(relay, pva):
    """A monitor and four more clients connect at once to each of 20 PVs just made over
    CA, and each is served.  pvxs opens a PV that a monitor waits for while it holds the
    PV's lock, and waits there for the server's thread, which takes that lock for each
    client attaching: a channel opened by the loop while clients connected hung the PVA
    server for good (see broker/pva/channels.py)."""
    crowd = [pva_context() for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(crowd)) as pool:
            for k in range(20):
                name = relay.name(f"crowd{k}", "f1")
                put(name, float(k))
                sub, got = _events(pva, name)
                try:
                    gets = pool.map(lambda ctx, n=name: ctx.get(n, timeout=10), crowd)
                    assert list(gets) == [float(k)] * len(crowd)
                    _next_value(got, float(k))
                finally:
                    sub.close()
    finally:
        for ctx in crowd:
            ctx.close()


def test_new_clients_are_served_at_once_while_another_writes(relay, pva):
    """A client that connects while another one puts is served at once.  pvxs's thread
    waits in ``makeChannel`` for the loop to prepare the new channel; freeing a
    completed put's operation waits for that same thread: freed on the loop, the two
    waited for each other until the channel was refused (after a second), and the
    client, sent back to its search, was served 6-17 s later, while every put stood."""
    busy = relay.name("busy", "f1")
    pva.put(busy, 0.0, timeout=5)
    stop = threading.Event()
    errors: list = []

    def write() -> None:
        ctx, k = pva_context(), 0
        try:
            while not stop.is_set():
                k += 1
                ctx.put(busy, float(k), timeout=5)
        except Exception as e:
            errors.append(e)
        finally:
            ctx.close()

    start = len(relay.log())
    writer = threading.Thread(target=write)
    writer.start()
    try:
        for k in range(6):
            name = relay.name(f"joins{k}", "f1")
            # pvxs searches again after a refusal only seconds later: this put would fail.
            with_context(lambda ctx, n=name, v=float(k): ctx.put(n, v, timeout=4))
            assert pva.get(name, timeout=5) == float(k)
    finally:
        stop.set()
        writer.join()
    assert not errors
    assert "not opened" not in relay.log()[start:]
    assert "crashed" not in relay.log()[start:]


def test_a_put_refused_in_part_changes_nothing(relay, pva):
    """A text PV has no units: a put of a value with display.units is refused whole, its
    value not applied though it could be; fields no put can change are refused by name,
    and a put that changes nothing fails rather than completing having done nothing."""
    s1 = relay.name("partial", "s1")
    pva.put(s1, "old", timeout=5)
    with pytest.raises(p4p.client.thread.RemoteError, match="EGU"):
        pva.put(s1, {"value": "new", "display.units": "V"}, timeout=5)
    with pytest.raises(p4p.client.thread.RemoteError, match="EGU"):
        pva.put(s1, {"display.description": "d1", "display.units": "V"}, timeout=5)
    assert pva.get(s1, timeout=5) == "old"
    assert get(s1) == "old" and get(s1 + ".DESC", as_string=True) == ""
    f1 = relay.name("fixed", "f1")
    pva.put(f1, 1.0, timeout=5)
    for path, v in (("valueAlarm.active", False), ("control.minStep", 0.5)):
        with pytest.raises(p4p.client.thread.RemoteError, match=f"cannot put {path}"):
            pva.put(f1, {path: v}, timeout=5)
    with pytest.raises(p4p.client.thread.RemoteError, match="changes nothing"):
        pva.put(f1, {"alarm.severity": 3}, timeout=5)
    assert pva.get(f1, timeout=5) == 1.0


def test_a_get_after_a_put_the_deadband_holds_gives_it(relay, pva):
    """MDEL holds a small change back from CA monitors; a PVA get reads what pvxs was last
    shown, so every put is shown: the get gives the value and time stamp put."""
    name = relay.name("mdel", "f1")
    put(name, 1.0)
    put(name + ".MDEL", 5.0)
    put(name + ".ADEL", 5.0)
    pva.put(name, 2.0, timeout=5)
    assert pva.get(name, timeout=5) == 2.0
    before = pva.get(name, timeout=5).timestamp
    pva.put(name, 2.0, timeout=5)  # the same value again: a new time stamp
    assert pva.get(name, timeout=5).timestamp > before


def test_empty_text_clears_a_char_array(relay, pva):
    c16 = relay.name("txt", "c16")
    pva.put(c16, "abc", timeout=5)
    pva.put(c16, "", timeout=5)
    assert pva.get(c16, timeout=5) == ""
    wait_for(lambda: get_array(c16, as_string=True) == "", what="CA to read the text cleared")


def test_a_field_change_shows_no_buffer_value_again(relay, pva):
    """A buffer monitor takes each value update for new elements: a field change posts
    the metadata, with the value unmarked."""
    buf = relay.name("dup", "F5")
    pva.put(buf, [1.0, 2.0], timeout=5)
    sub, got = _events(pva, buf)
    try:
        _next_value(got, [1.0, 2.0])
        put(buf + ".EGU", "mV")

        def units_event():
            while True:
                v = got.get(timeout=10)
                if not isinstance(v, Exception) and v.raw["display.units"] == "mV":
                    return v

        assert "value" not in units_event().raw.changedSet()
    finally:
        sub.close()


def test_a_pvs_fields_are_channels_of_their_own(relay, pva):
    """``NAME.FIELD`` over PVA, as an IOC's PVA server serves a record's field: the field's
    value (an NTEnum for a menu field), with the PV's alarm and time stamp; read,
    monitored and put, each protocol seeing the other's change."""
    name = relay.name("fld", "f1")
    pva.put(name, 1.0, timeout=5)
    assert pva.get(name + ".RTYP", timeout=5) == "ao"
    assert pva.get(name + ".NAME", timeout=5) == name
    assert pva.get(name + ".EGU", timeout=5).raw.type()["value"] == "s"
    assert pva.get(name + ".PREC", timeout=5).raw.type()["value"] == "h"
    assert pva.get(name + ".UDF", timeout=5).raw.type()["value"] == "B"
    egu, egu_got = _events(pva, name + ".EGU")
    sevr, sevr_got = _events(pva, name + ".SEVR")
    try:
        _next_value(egu_got, "")
        put(name + ".EGU", "degC")  # through CA
        _next_value(egu_got, "degC")
        first = _next_value(sevr_got, 0)
        assert first.raw.getID().startswith("epics:nt/NTEnum:")
        assert list(first.raw["value.choices"]) == ["NO_ALARM", "MINOR", "MAJOR", "INVALID"]
        pva.put(name + ".HIHI", 5.0, timeout=5)
        pva.put(name + ".HHSV", "MINOR", timeout=5)  # by its choice
        assert get(name + ".HHSV") == 1
        pva.put(name + ".HHSV", 2, timeout=5)  # by its index: MAJOR
        # A PVA put of a field completes once its shard applied it: CA reads it at once,
        # and so does the PV's own channel (valueAlarm).
        assert get(name + ".HIHI") == 5.0
        assert pva.get(name, timeout=5).raw["valueAlarm.highAlarmLimit"] == 5.0
        put(name, 6.0)  # past HIHI: the field's monitor sees the alarm
        raised = _next_value(sevr_got, 2)
        assert raised.raw["alarm.severity"] == 2  # the PV's alarm, as the field carries it
    finally:
        egu.close()
        sevr.close()
    arr = relay.name("fldarr", "i8")
    pva.put(arr, [1, 2, 3], timeout=5)
    assert pva.get(arr + ".NELM", timeout=5) == 8
    nord, nord_got = _events(pva, arr + ".NORD")
    try:
        _next_value(nord_got, 3)
        put(arr, np.array([1, 2, 3, 4, 5]))
        _next_value(nord_got, 5)
    finally:
        nord.close()


def test_a_field_put_with_callback_is_read_at_once_through_the_other(relay, pva):
    """As for a value: once a CA put with callback to ``NAME.HIHI`` is done, a PVA get of
    ``NAME.HIHI`` (a channel a monitor holds) gives it, and the reverse; and a field
    channel held alone keeps its PV followed (NORD moves with CA's puts)."""
    name = relay.name("fldcb", "f1")
    put(name, 1.0)
    sub, got = _events(pva, name + ".HIHI")
    try:
        _next_value(got, 0.0)
        stale = []
        for k in range(1, 51):
            put(name + ".HIHI", float(k))
            if (v := pva.get(name + ".HIHI", timeout=5)) != k:
                stale.append((float(k), float(v)))
            pva.put(name + ".HIHI", k + 0.5, timeout=5)
            if (v := get(name + ".HIHI")) != k + 0.5:
                stale.append((k + 0.5, v))
        assert stale == []
    finally:
        sub.close()
    arr = relay.name("fldnord", "f6")
    put(arr, np.array([1.0, 2.0]))
    sub, got = _events(pva, arr + ".NORD")
    try:
        _next_value(got, 2)
        for n in range(3, 7):
            put(arr, np.arange(float(n)))
            assert pva.get(arr + ".NORD", timeout=5) == n
    finally:
        sub.close()


def test_name_val_is_the_pv_itself(relay, pva):
    """``NAME.VAL`` over PVA is ``NAME``, as an IOC's PVA server serves a record's VAL:
    a put to it creates the PV, a monitor of it sees CA's puts, a get reads them."""
    name = relay.name("val", "f1")
    sub, got = _events(pva, name + ".VAL")  # provisional: no put yet
    try:
        pva.put(name + ".VAL", 1.5, timeout=5)
        _next_value(got, 1.5)
        assert get(name) == 1.5
        put(name, 2.5)
        _next_value(got, 2.5)
        assert pva.get(name + ".VAL", timeout=5) == 2.5
        raw = pva.get(name + ".VAL", timeout=5).raw
        assert raw.getID() == "epics:nt/NTScalar:1.0" and raw.type()["value"] == "d"
    finally:
        sub.close()


def test_puts_to_a_pvs_fields_over_pva_act_as_on_ca(relay, pva):
    """PROC processes the PV, RES empties a buffer, a read-only field or a bad value is
    refused with the reason and changes nothing."""
    name = relay.name("fldput", "f1")
    pva.put(name, 4.0, timeout=5)
    before = pva.get(name, timeout=5).timestamp
    pva.put(name + ".PROC", 1, timeout=5)
    assert pva.get(name, timeout=5).timestamp > before
    assert pva.get(name + ".PROC", timeout=5) == 0
    buf = relay.name("fldres", "F4")
    pva.put(buf, [1.0, 2.0], timeout=5)
    pva.put(buf + ".RES", 1, timeout=5)
    assert len(pva.get(buf, timeout=5)) == 0
    assert get(buf + ".NORD") == 0  # CA reads it emptied
    with pytest.raises(p4p.client.thread.RemoteError, match="NORD is not a writable field"):
        pva.put(name + ".NORD", 3, timeout=5)
    with pytest.raises(p4p.client.thread.RemoteError, match="PREC takes a whole number"):
        pva.put(name + ".PREC", 99, timeout=5)
    assert pva.get(name + ".PREC", timeout=5) == 0 and get(name + ".PREC") == 0
    with pytest.raises(p4p.client.thread.RemoteError, match="EGU holds at most 16"):
        pva.put(name + ".EGU", "x" * 17, timeout=5)
    pva.put(name + ".EGU", "mm", timeout=5)
    assert pva.get(name, timeout=5).raw["display.units"] == "mm"
    assert pva.get(name, timeout=5) == 4.0


def test_field_channels_of_what_does_not_exist_are_not_served(relay, pva):
    """No field of a PV that has had no put, no field a PV of its type has, no unknown
    field; a deleted PV's field channels close."""
    f1 = relay.name("nofld", "f1")
    s1 = relay.name("nofldtxt", "s1")
    pva.put(f1, 1.0, timeout=5)
    pva.put(s1, "x", timeout=5)
    missing = [relay.name("never", "f1") + ".EGU", f1 + ".XYZ", f1 + ".RES", s1 + ".EGU"]
    got = pva.get(missing, timeout=1, throw=False)  # searched for at once
    assert all(isinstance(g, TimeoutError) for g in got), dict(zip(missing, got, strict=True))
    sub, got = _events(pva, f1 + ".DESC")
    try:
        _next_value(got, "")
        put(relay.prefix + "delpv", f1)

        def disconnected():
            while True:
                if isinstance(got.get(timeout=10), p4p.client.thread.Disconnected):
                    return True

        assert disconnected()
    finally:
        sub.close()
    with pytest.raises(TimeoutError):
        pva.get(f1 + ".DESC", timeout=1)
