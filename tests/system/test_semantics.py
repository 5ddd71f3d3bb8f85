"""What a relay PV is and does, seen through real CA clients (pyepics and caproto).

Types, waveform-like arrays, ring buffers, creation on first attach, put
completion and refusal, time stamps and one monitor event per applied put.
The control PVs and refused names are in test_control.py.

Two facts about the clients shape these tests:

- caproto's threading client does not raise when a put with callback fails:
  ``pv.write(..., wait=True)`` returns the WriteNotifyResponse, whose
  ``status.success`` is 0 (ECA_PUTFAIL).  ``write_status`` below returns it.
- pyepics converts on the client side (a text put to a float PV never leaves
  it, an int is wrapped to 32 bits by ctypes), so a put the *relay* must
  refuse is sent with caproto and an explicit ``data_type``.
"""

from __future__ import annotations

import time

import epics
import numpy as np
import pytest
from caproto import AlarmSeverity, AlarmStatus, ChannelType

from tests.system.clients import connect, get, get_array, put, pvlist, write_status
from tests.system.conftest import caproto_cli, wait_for

#: How long a test waits for a monitor event that must NOT come.
NO_EXTRA_EVENT_WAIT = 0.4


def time_read(ca, name):
    """(value, posix stamp, severity, status) of a DBR_TIME read through caproto."""
    r = connect(ca, name).read(data_type="time", data_count=0, timeout=5)
    return r.data, r.metadata.timestamp, r.metadata.severity, r.metadata.status


# -- 1. types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "type_count, dbf, native, count",
    [
        ("f1", epics.dbr.DOUBLE, ChannelType.DOUBLE, 1),
        ("i1", epics.dbr.LONG, ChannelType.LONG, 1),
        ("c10", epics.dbr.CHAR, ChannelType.CHAR, 10),
        ("c1", epics.dbr.CHAR, ChannelType.CHAR, 1),
        ("s1", epics.dbr.STRING, ChannelType.STRING, 1),
        ("f4", epics.dbr.DOUBLE, ChannelType.DOUBLE, 4),
        ("i3", epics.dbr.LONG, ChannelType.LONG, 3),
        ("F5", epics.dbr.DOUBLE, ChannelType.DOUBLE, 5),
        ("I5", epics.dbr.LONG, ChannelType.LONG, 5),
        ("C5", epics.dbr.CHAR, ChannelType.CHAR, 5),
    ],
)
def test_native_field_type_and_count(relay, ca, type_count, dbf, native, count):
    name = relay.name("typed", type_count)
    pv = epics.PV(name)
    assert pv.wait_for_connection(timeout=5)
    assert epics.ca.field_type(pv.chid) == dbf
    assert pv.nelm == count
    chan = connect(ca, name).channel
    assert chan.native_data_type == native
    assert chan.native_data_count == count


def test_float_int_string_values(relay):
    f, i, s = relay.name("t", "f1"), relay.name("t", "i1"), relay.name("t", "s1")
    put(f, -21.125)
    put(i, -7)
    put(s, "a string of text")
    assert get(f) == -21.125
    assert get(i) == -7
    assert isinstance(get(i), int)
    assert get(s) == "a string of text"
    # DBR_STRING: 40 bytes with the terminator, so 39 characters.
    longest = "x" * 38 + "y"
    put(s, longest)
    assert get(s) == longest


def test_string_pv_keeps_the_bytes_put_utf8_or_not(relay, ca):
    """A string PV holds the bytes a client put, as an IOC's stringout does: text that is
    not UTF-8 (a degree sign in Latin-1) reads back as it was sent, never as '?'."""
    name = relay.name("latin1", "s1")
    pv = connect(ca, name)
    monitor = connect(ca, name).subscribe(data_type="time")
    seen: list = []

    def on_event(sub, response):  # a local: caproto keeps weak references to callbacks
        seen.append(response.data[0])

    monitor.add_callback(on_event)
    for raw in (b"25\xb0C", "25 °C".encode(), b"\xff" * 39):
        status = pv.write([raw], data_type=ChannelType.STRING, wait=True, timeout=3).status
        assert status.success, (raw, status)
        assert pv.read(data_type=ChannelType.STRING, timeout=3).data[0] == raw
        assert pv.read(data_type="time", timeout=3).data[0] == raw
        wait_for(lambda raw=raw: seen and seen[-1] == raw, what=f"a monitor event of {raw!r}")
    monitor.clear()


def test_char_array_holds_text(relay):
    name = relay.name("text", "c40")
    put(name, "hello world")
    # caget with the PV's full count: without one, pyepics may ask for the count of a
    # monitor event that lags behind the put (one element while the PV had no value).
    assert get(name, as_string=True, count=40) == "hello world"
    assert get_array(name, as_string=True) == "hello world"
    put(name, "hi")
    assert get_array(name, as_string=True) == "hi"
    r = caproto_cli("put", "-S", name, "from caproto")
    assert r.returncode == 0, r.stderr
    assert get_array(name, as_string=True) == "from caproto"


def test_char_bytes_read_as_numbers_keep_their_value(relay, ca):
    """DBR_CHAR is epicsUInt8: a byte of 195 reads 195 as DBR_LONG and DBR_DOUBLE too,
    in a read and in a monitor event (it read -61: pcaspy put bytes as signed chars)."""
    name = relay.name("bytes", "c4")
    pv = connect(ca, name)
    raw = [195, 255, 128, 1]
    assert write_status(pv, raw, data_type=ChannelType.CHAR).success
    events = []

    def on_event(sub, response):  # caproto holds callbacks weakly: not a lambda
        events.append(response.data.tolist())

    sub = pv.subscribe(data_type=ChannelType.LONG, data_count=0)
    sub.add_callback(on_event)
    assert pv.read(data_type=ChannelType.CHAR, data_count=0).data.tolist() == raw
    for data_type in (ChannelType.LONG, ChannelType.DOUBLE, ChannelType.INT):
        assert pv.read(data_type=data_type, data_count=0).data.tolist() == raw, data_type
    wait_for(lambda: raw in events, what=f"a DBR_LONG event of {raw}")
    sub.clear()


def test_text_put_as_a_string_to_a_char_pv_is_its_text(relay, ca):
    """What EPICS caput sends without -S (DBR_STRING): PCAS read it as one number, so
    'hello' failed and a name put to delpv reached the relay as an empty one."""
    name = relay.name("said", "c40")
    pv = connect(ca, name)
    assert write_status(pv, [b"hello"], data_type=ChannelType.STRING).success
    # As a char put of the text with its terminator (caput -S) stores it.
    assert bytes(pv.read(data_count=0).data) == b"hello\0"
    gone = relay.name("gone", "f1")
    put(gone, 1.0)
    delpv = connect(ca, relay.prefix + "delpv")
    assert write_status(delpv, [gone.encode()], data_type=ChannelType.STRING).success
    assert gone not in pvlist(relay)


def test_char_one_element(relay, ca):
    # pyepics drops the text of a string put to a count-1 char PV on its
    # client side; caproto sends it.
    name = relay.name("letter", "c1")
    r = caproto_cli("put", "-S", name, "x")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: get(name) == ord("x"), what="c1 holding 'x'")
    assert write_status(connect(ca, name), [ord("Q")]).success
    assert get(name) == ord("Q")


# -- 2. arrays behave like a waveform record ----------------------------------------------


def test_array_put_of_fewer_elements_stores_exactly_those(relay, ca):
    name = relay.name("wave", "f5")
    put(name, [1.0, 2.0, 3.0, 4.0, 5.0])
    put(name, [7.0, 8.0])
    # A read for count 0 gets the current length: pyepics ca.get, caproto data_count=0.
    np.testing.assert_array_equal(get_array(name), [7.0, 8.0])
    pv = connect(ca, name)
    np.testing.assert_array_equal(pv.read(data_count=0).data, [7.0, 8.0])
    # A client that asks for every element gets the capacity, nothing stale.
    np.testing.assert_array_equal(pv.read(data_count=5).data, [7.0, 8.0, 0.0, 0.0, 0.0])
    assert pv.channel.native_data_count == 5
    put(name, [9.0, 10.0, 11.0, 12.0, 13.0])
    np.testing.assert_array_equal(pv.read(data_count=0).data, [9.0, 10.0, 11.0, 12.0, 13.0])


@pytest.mark.parametrize(
    "type_count, first, second", [("i6", [1, 2, 3, 4], [-5]), ("c6", [1, 2, 3], [9, 8])]
)
def test_int_and_char_arrays_keep_the_put_length(relay, ca, type_count, first, second):
    name = relay.name("wave", type_count)
    put(name, first)
    assert list(connect(ca, name).read(data_count=0).data) == first
    put(name, second)
    assert list(connect(ca, name).read(data_count=0).data) == second
    assert list(get_array(name)) == second


# -- 3. buffers ----------------------------------------------------------------------------


def test_float_buffer_appends_every_put(relay, ca):
    name = relay.name("log", "F5")
    put(name, [1.0])
    # Starts empty: the first put is all there is, no padding.
    np.testing.assert_array_equal(get_array(name), [1.0])
    pv = connect(ca, name)
    np.testing.assert_array_equal(pv.read(data_count=0).data, [1.0])
    put(name, [2.0, 3.0])
    assert write_status(pv, 4.0).success  # a scalar put
    r = caproto_cli("put", name, "5")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(get_array(name), [1.0, 2.0, 3.0, 4.0, 5.0])
    # Past the capacity the oldest fall off the left.
    put(name, [6.0, 7.0])
    np.testing.assert_array_equal(get_array(name), [3.0, 4.0, 5.0, 6.0, 7.0])
    assert write_status(pv, [8.0, 9.0, 10.0, 11.0, 12.0]).success
    np.testing.assert_array_equal(pv.read(data_count=0).data, [8.0, 9.0, 10.0, 11.0, 12.0])
    # One CA put carries at most the channel's count: CA refuses more, nothing stored.
    assert write_status(pv, [float(k) for k in range(6)]).name == "ECA_BADCOUNT"
    np.testing.assert_array_equal(pv.read(data_count=0).data, [8.0, 9.0, 10.0, 11.0, 12.0])


def test_one_element_puts_are_never_dropped(relay):
    name = relay.name("ticks", "F10")
    for k in range(50):
        put(name, [float(k)])
    np.testing.assert_array_equal(get_array(name), np.arange(40.0, 50.0))


def test_one_element_puts_without_wait_are_all_appended(relay):
    name = relay.name("burst", "F100")
    for k in range(60):
        assert epics.caput(name, [float(k)]) == 1
    wait_for(lambda: len(get_array(name)) == 60, what="60 appended values")
    np.testing.assert_array_equal(get_array(name), np.arange(60.0))


def test_int_buffer(relay, ca):
    name = relay.name("counts", "I4")
    put(name, [1])
    put(name, [2, 3])
    assert write_status(connect(ca, name), [4, 5, 6]).success
    assert list(get_array(name)) == [3, 4, 5, 6]


def test_char_buffer_appends_text_without_terminator(relay, ca):
    name = relay.name("out", "C6")
    put(name, "ab")
    put(name, "cd")
    assert get_array(name, as_string=True) == "abcd"
    assert list(connect(ca, name).read(data_count=0).data) == list(b"abcd")
    r = caproto_cli("put", "-S", name, "efg")
    assert r.returncode == 0, r.stderr
    assert get_array(name, as_string=True) == "bcdefg"


# -- 4. creation on first attach ----------------------------------------------------------


def test_monitors_started_before_the_first_put_receive_it(relay, ca):
    name = relay.name("early", "f1")
    seen_pyepics, seen_caproto = [], []

    def on_pyepics(value=None, severity=None, status=None, **kw):
        seen_pyepics.append((float(value), severity, status))

    def on_caproto(sub, response):
        md = response.metadata
        seen_caproto.append((float(response.data[0]), md.severity, md.status))

    mon = epics.PV(name, callback=on_pyepics, form="time")
    assert mon.wait_for_connection(timeout=5)
    sub = connect(ca, name).subscribe(data_type="time")
    sub.add_callback(on_caproto)  # caproto keeps a weak reference: on_caproto stays alive here
    wait_for(lambda: seen_pyepics and seen_caproto, what="the first monitor events")
    udf = (0.0, AlarmSeverity.INVALID_ALARM, AlarmStatus.UDF)
    assert seen_pyepics[0] == udf
    assert seen_caproto[0] == udf
    assert name not in pvlist(relay)

    put(name, 4.5)
    wait_for(
        lambda: (4.5, 0, 0) in seen_pyepics and (4.5, 0, 0) in seen_caproto,
        what="the first put in both monitors",
    )
    assert name in pvlist(relay)
    sub.clear()
    mon.clear_callbacks()


def test_provisional_name_reads_udf_and_leaves_nothing(relay, ca):
    name = relay.name("typo", "f1")
    value, _, severity, status = time_read(ca, name)
    assert severity == AlarmSeverity.INVALID_ALARM
    assert status == AlarmStatus.UDF
    tv = epics.PV(name, form="time", auto_monitor=False)
    assert tv.wait_for_connection(timeout=5)
    tv.get_timevars(timeout=5)
    assert (tv.severity, tv.status) == (AlarmSeverity.INVALID_ALARM, AlarmStatus.UDF)
    assert name not in pvlist(relay)

    # A client in a process of its own reads it and goes away: still nothing.
    other = relay.name("typo", "i1")
    r = caproto_cli("get", "-d", "time", "--format", "{response.metadata.severity}", other)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(int(AlarmSeverity.INVALID_ALARM))
    assert other not in pvlist(relay)
    assert f"created PV {other}" not in relay.log()
    # ...until a put makes it real.
    r = caproto_cli("put", "-c", other, "3")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: other in pvlist(relay), what=f"{other} in pvlist")
    relay.wait_log(f"created PV {other}")
    assert get(other) == 3
    assert name not in pvlist(relay)


# -- 5. put completion and refusal ----------------------------------------------------------


def test_put_with_callback_completes_after_the_value_is_applied(relay):
    name = relay.name("done", "f1")
    for v in (1.5, 2.5, -3.0):
        assert epics.caput(name, v, wait=True, timeout=5) == 1
        assert get(name) == v
    buf = relay.name("done", "F3")
    for v in (1.0, 2.0):
        assert epics.caput(buf, [v], wait=True, timeout=5) == 1
        assert get_array(buf)[-1] == v


def test_read_after_a_plain_put_on_the_same_client_sees_it(relay):
    name = relay.name("plain", "i1")
    put(name, 0)
    for v in range(1, 21):
        assert epics.caput(name, v) == 1
        assert get(name) == v


def test_caproto_put_with_callback(relay, ca):
    name = relay.name("notify", "f1")
    r = caproto_cli("put", "-c", name, "6.25")
    assert r.returncode == 0, r.stderr
    assert get(name) == 6.25
    assert write_status(connect(ca, name), [7.75]).success
    assert get(name) == 7.75


@pytest.mark.parametrize("text", ["xyz", "not a number", "-"])
def test_text_put_to_a_float_fails_and_keeps_the_value(relay, ca, text):
    name = relay.name("num", "f1")
    put(name, 1.25)
    pv = connect(ca, name)
    assert not write_status(pv, [text], data_type=ChannelType.STRING).success
    assert get(name) == 1.25
    # A text that CA can convert does go in.
    assert write_status(pv, ["2.5"], data_type=ChannelType.STRING).success
    assert get(name) == 2.5


def test_text_put_to_int_and_buffer_fails_and_changes_nothing(relay, ca):
    i, buf = relay.name("num", "i1"), relay.name("num", "F4")
    put(i, 12)
    put(buf, [1.0, 2.0])
    assert not write_status(connect(ca, i), ["xyz"], data_type=ChannelType.STRING).success
    assert not write_status(connect(ca, buf), ["xyz"], data_type=ChannelType.STRING).success
    assert get(i) == 12
    np.testing.assert_array_equal(get_array(buf), [1.0, 2.0])


def test_caproto_put_of_text_to_a_float_keeps_the_value(relay):
    name = relay.name("num", "f1")
    put(name, 1.25)
    r = caproto_cli("put", "-c", name, "xyz")
    assert "New" not in r.stdout, r.stdout
    assert get(name) == 1.25


@pytest.mark.parametrize(
    "type_count, data, data_type",
    [
        ("f1", ["abc"], ChannelType.STRING),
        ("i1", [2.0**31], ChannelType.DOUBLE),
        ("i1", [-(2.0**31) - 1], ChannelType.DOUBLE),
        ("f1", ["1.5 volts"], ChannelType.STRING),
    ],
    ids=["abc-as-hex", "double-above-int32", "double-below-int32", "number-then-text"],
)
def test_put_pcas_converts_is_refused(relay, ca, type_count, data, data_type):
    name = relay.name("conv", type_count)
    put(name, 5)
    status = write_status(connect(ca, name), data, data_type=data_type)
    assert get(name) == 5
    assert not status.success


def test_a_put_pcas_would_convert_is_refused_with_its_reason_and_the_circuit_serves_on(relay, ca):
    """Refused on its way into PCAS: a put with callback fails, a plain put is not
    applied, the log and LAST_ERROR say why, and the client's circuit serves on."""
    name = relay.name("conv", "i1")
    put(name, 5)
    pv = connect(ca, name)
    start = len(relay.log())
    assert not write_status(pv, [2.0**31], data_type=ChannelType.DOUBLE).success
    pv.write([b"12 apples"], data_type=ChannelType.STRING, wait=False)
    assert list(pv.read(timeout=5).data) == [5]
    assert write_status(pv, [7], data_type=ChannelType.LONG).success
    assert get(name) == 7
    wait_for(
        lambda: "cannot convert text '12 apples' to a number" in relay.log()[start:],
        what="the plain put's refusal logged",
    )
    log = relay.log()[start:]
    assert f"refused put with callback to {name} from " in log
    assert "2147483648.0 does not fit a 32-bit integer" in log


def test_a_refused_put_larger_than_one_read_fails_and_the_circuit_serves_on(relay, ca):
    """2,048 doubles (16 KiB) to an i PV, one of them NaN: the put never fits one read of
    PCAS's, so its header goes before the end of its payload.  What the socket already
    holds of the rest decides it in time: it fails, and the circuit serves on.  Before,
    the circuit was closed (caproto's write raised)."""
    name = relay.name("wide", "i2048")
    pv = connect(ca, name)
    assert write_status(pv, list(range(2048)), data_type=ChannelType.LONG).success
    bad = [1.0] * 2047 + [float("nan")]
    assert not write_status(pv, bad, data_type=ChannelType.DOUBLE).success
    assert list(pv.read(timeout=5).data[:3]) == [0, 1, 2]
    good = [2.0] * 2048
    assert write_status(pv, good, data_type=ChannelType.DOUBLE).success
    assert list(pv.read(timeout=5).data[-2:]) == [2, 2]
    assert "nan does not fit a 32-bit integer" in relay.log()
    assert "whose header went before" not in relay.log()


@pytest.mark.parametrize("text", ["2147483648", "-2147483649", "1e12"])
def test_int_out_of_range_fails_and_keeps_the_value(relay, ca, text):
    name = relay.name("wide", "i1")
    put(name, 12)
    assert not write_status(connect(ca, name), [text], data_type=ChannelType.STRING).success
    assert get(name) == 12


def test_a_number_a_char_cannot_hold_fails_and_keeps_the_bytes(relay, ca):
    """PCAS cast a number put to a c or C PV to a byte: 300 went in as 44, -1 as 255,
    silently (an i PV refuses what it cannot hold)."""
    name = relay.name("flags", "c4")
    pv = connect(ca, name)
    assert write_status(pv, [65, 66], data_type=ChannelType.CHAR).success
    for bad, data_type in (([300, 1], ChannelType.LONG), ([-1.5], ChannelType.DOUBLE)):
        assert not write_status(pv, bad, data_type=data_type).success, bad
        assert pv.read(data_type=ChannelType.CHAR, data_count=0).data.tolist() == [65, 66]
    assert write_status(pv, [255, 0.9], data_type=ChannelType.DOUBLE).success  # 255, 0
    assert pv.read(data_type=ChannelType.LONG, data_count=0).data.tolist() == [255, 0]
    assert "300 does not fit a char (0 to 255)" in relay.log()


@pytest.mark.parametrize("type_count, text, kept", [("f1", "xyz", 1.25), ("i1", "1e12", 12)])
def test_a_refused_put_without_callback_keeps_the_value(relay, ca, type_count, text, kept):
    # The refusals above, for puts that wait for no answer (a number to a scalar takes a
    # short way through the broker): the value stays, and the next number goes in.
    name = relay.name("quiet", type_count)
    put(name, kept)
    pv = connect(ca, name)
    pv.write([text], data_type=ChannelType.STRING, wait=False)
    # A read on the same circuit is answered after the put before it was handled.
    assert pv.read().data[0] == kept
    pv.write([7], wait=False)
    assert pv.read().data[0] == 7
    assert get(name) == 7


def test_int_in_range_from_a_double_is_accepted(relay, ca):
    name = relay.name("edge", "i1")
    pv = connect(ca, name)
    for v in (2**31 - 1, -(2**31)):
        assert write_status(pv, [float(v)], data_type=ChannelType.DOUBLE).success
        assert get(name) == v


# -- 6. time stamps and monitor events --------------------------------------------------------


def test_time_stamp_is_when_the_shard_applied_the_put(relay, ca):
    # epicsTimeStamp -> float: allow for the rounding of the conversion only.
    eps = 1e-3
    for type_count, value in (("f1", 3.5), ("F8", [1.0, 2.0]), ("c16", "stamped")):
        name = relay.name("stamp", type_count)
        for _ in range(2):
            before = time.time()
            put(name, value)
            after = time.time()
            _, stamp, severity, status = time_read(ca, name)
            assert before - eps <= stamp <= after + eps, (before, stamp, after)
            assert (severity, status) == (AlarmSeverity.NO_ALARM, AlarmStatus.NO_ALARM)
            tv = epics.PV(name, form="time", auto_monitor=False)
            assert tv.wait_for_connection(timeout=5)
            assert before - eps <= tv.get_timevars(timeout=5)["timestamp"] <= after + eps


def test_every_applied_put_posts_exactly_one_event(relay, ca):
    name = relay.name("events", "f1")
    put(name, -1.0)
    seen_pyepics, seen_caproto = [], []

    def on_pyepics(value=None, **kw):
        seen_pyepics.append(float(value))

    def on_caproto(sub, response):
        seen_caproto.append(float(response.data[0]))

    mon = epics.PV(name, callback=on_pyepics)
    assert mon.wait_for_connection(timeout=5)
    sub = connect(ca, name).subscribe()
    sub.add_callback(on_caproto)
    wait_for(lambda: seen_pyepics and seen_caproto, what="the initial monitor events")

    values = [float(k) for k in range(25)]
    for v in values:
        put(name, v)
    expected = [-1.0, *values]
    for seen in (seen_pyepics, seen_caproto):
        wait_for(lambda seen=seen: len(seen) >= len(expected), what=f"{len(expected)} events")
    # A put that is refused changes nothing and posts nothing.
    assert not write_status(connect(ca, name), ["xyz"], data_type=ChannelType.STRING).success
    with pytest.raises(AssertionError):
        wait_for(
            lambda: len(seen_pyepics) > len(expected) or len(seen_caproto) > len(expected),
            timeout=NO_EXTRA_EVENT_WAIT,
            what="an extra event",
        )
    assert seen_pyepics == expected
    assert seen_caproto == expected
    sub.clear()
    mon.clear_callbacks()


def test_buffer_append_posts_one_event_with_the_whole_buffer(relay, ca):
    name = relay.name("events", "F3")
    put(name, [0.0])
    seen = []

    def on_caproto(sub, response):
        seen.append(list(response.data))

    sub = connect(ca, name).subscribe(data_count=0)
    sub.add_callback(on_caproto)
    wait_for(lambda: seen, what="the initial event")
    for v in (1.0, 2.0, 3.0):
        put(name, [v])
    wait_for(lambda: len(seen) >= 4, what="4 events")
    with pytest.raises(AssertionError):
        wait_for(lambda: len(seen) > 4, timeout=NO_EXTRA_EVENT_WAIT, what="an extra event")
    assert seen == [[0.0], [0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]
    sub.clear()
