"""PV fields (``NAME.FIELD``) through real CA clients, pyepics and caproto.

Every field is set and read back as ``NAME.FIELD``; DBR_CTRL/DBR_GR reads give
units, precision and limits; the alarm limits give DBR_TIME/DBR_STS reads and
monitors their status and severity (with HYST); DBE_ALARM and DBE_PROPERTY
subscriptions get exactly the events they ask for; DRVH/DRVL clip, MDEL/ADEL
hold back monitor events, NORD/NELM/RES work on buffers; configured defaults,
a relay restart, a shard restart and delpv; and every bad input fails with a
CA error and changes nothing.

How these tests are written:

- A put that must fail is made with caproto's threading client: pyepics does
  not report a failed put-callback status.  ``write_status`` returns the CA
  status the server answered (``.success`` is 0 on failure).
- PCAS converts a put to the field's own type before the relay sees it: text
  'abc' to PREC arrives as 0xabc = 2748 (out of 0..17, so refused), text that
  is no number at all ('xyz') is refused by PCAS itself.
- Events on one CA circuit arrive in the order the server posted them, so a
  subscription is shown to have missed an event by a later event that must
  come: no fixed waits for events that must not come.
- caproto keeps weak references to callbacks: each stays a local of its test.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import epics
import numpy as np
import pytest
from caproto import AlarmSeverity, AlarmStatus, ChannelType, SubscriptionType

from carelay.common.sharding import shard_for
from tests.system.clients import Context, connect, get, get_array, put, write_status
from tests.system.conftest import CARELAY, Relay, unique, using_shared, wait_for

OK = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
HIHI = (AlarmStatus.HIHI, AlarmSeverity.MAJOR_ALARM)
HIGH = (AlarmStatus.HIGH, AlarmSeverity.MINOR_ALARM)
LOW = (AlarmStatus.LOW, AlarmSeverity.MINOR_ALARM)
LOLO = (AlarmStatus.LOLO, AlarmSeverity.MAJOR_ALARM)

#: Configured defaults of the relay that ``config_relay`` starts.
CONFIG = """\
[fields."temperature_*"]
EGU = "degC"
PREC = 2
HIHI = 30.0
DESC = "a temperature"
"""


# -- helpers ----------------------------------------------------------------------------


def read(ca, name, **kw):
    """A fresh read through caproto: the response."""
    return connect(ca, name).read(timeout=5, **kw)


def value_of(ca, name):
    """The value of ``name`` read through caproto at its current length, as a list."""
    return [x.item() for x in read(ca, name, data_count=0).data]


def field_text(ca, name, field):
    """A string field read through caproto and through pyepics (which must agree)."""
    via_caproto = read(ca, f"{name}.{field}").data[0].decode()
    assert get(f"{name}.{field}") == via_caproto
    return via_caproto


def field_number(ca, name, field):
    """A numeric field read through caproto and through pyepics (which must agree)."""
    via_caproto = read(ca, f"{name}.{field}").data[0].item()
    assert get(f"{name}.{field}") == via_caproto
    return via_caproto


class _Severities(list):
    """The severities a ``NAME.SEVR`` monitor posted, as numbers (held by the list: caproto
    keeps its callbacks weakly)."""

    def event(self, sub, response):
        self.append(int(response.data[0]))


def severity_events(ca, name):
    """A monitor of ``name.SEVR`` as DBR_ENUM, and the severities it posts."""
    severities = _Severities()
    sub = connect(ca, f"{name}.SEVR").subscribe(data_type=ChannelType.ENUM)
    sub.add_callback(severities.event)
    sub.severities = severities  # keeps the bound method's owner alive with the sub
    return sub, severities


def set_field(ca, name, field, value, **kw):
    """Put one field through caproto with callback; it must succeed."""
    data = value if isinstance(value, list) else [value]
    status = write_status(connect(ca, f"{name}.{field}"), data, **kw)
    assert status.success, f"put {name}.{field} = {value!r}: {status}"


def alarm(ca, name):
    """(status, severity) of a DBR_TIME read through caproto, checked against DBR_STS."""
    md = read(ca, name, data_type="time").metadata
    sts = read(ca, name, data_type="status").metadata
    assert (sts.status, sts.severity) == (md.status, md.severity)
    return AlarmStatus(md.status), AlarmSeverity(md.severity)


def pyepics_alarm(name):
    """(status, severity) of a DBR_TIME read through pyepics."""
    pv = epics.PV(name, form="time", auto_monitor=False)
    assert pv.wait_for_connection(timeout=5)
    tv = pv.get_timevars(timeout=5)
    return AlarmStatus(tv["status"]), AlarmSeverity(tv["severity"])


def not_served(relay, ca, *names: str) -> None:
    """No server answers the search for any of ``names``; the relay logs each refusal."""
    pvs = ca.get_pvs(*names, timeout=1.0)
    for name in names:
        relay.wait_log(f"refused PV name {name}: ", timeout=10)
    with pytest.raises(AssertionError):
        wait_for(lambda: any(pv.connected for pv in pvs), timeout=1.0, what="a connection")


def delete(ca, relay, name):
    status = write_status(
        connect(ca, relay.prefix + "delpv"), name.encode(), data_type=ChannelType.CHAR
    )
    assert status.success, f"delpv {name}: {status}"


class Events:
    """A caproto subscription's events, as (value, metadata), in order."""

    def __init__(self, pv, **kw):
        self.seen: list = []
        self.sub = pv.subscribe(**kw)
        self.sub.add_callback(self.on_event)  # a bound method of self: alive while self is

    def on_event(self, sub, response):
        value = response.data[0]
        value = value.decode() if isinstance(value, bytes) else value.item()
        self.seen.append((value, response.metadata))

    def wait(self, n: int, what: str):
        wait_for(lambda: len(self.seen) >= n, what=f"{n} events: {what}")
        return self.seen

    def values(self):
        return [v for v, _ in self.seen]

    def clear(self):
        self.sub.clear()


# -- NAME.VAL ----------------------------------------------------------------------------


def test_val_is_the_value(relay, ca):
    name = relay.name("val", "f1")
    put(f"{name}.VAL", 3.5)
    assert get(name) == 3.5
    assert get(f"{name}.VAL") == 3.5
    val = connect(ca, f"{name}.VAL")
    assert val.channel.native_data_type == ChannelType.DOUBLE
    assert write_status(val, [4.25]).success
    assert get(name) == 4.25
    # A monitor of NAME.VAL sees a put to NAME, and the other way round.
    events = Events(val)
    events.wait(1, "the initial value")
    put(name, 5.5)
    assert events.wait(2, "the put to NAME")[1][0] == 5.5
    events.clear()
    assert read(ca, f"{name}.VAL").data[0] == 5.5

    arr = relay.name("val", "f4")
    put(f"{arr}.VAL", [1.0, 2.0])
    np.testing.assert_array_equal(read(ca, arr, data_count=0).data, [1.0, 2.0])
    text = relay.name("val", "s1")
    put(f"{text}.VAL", "some text")
    assert get(text) == "some text"


# -- every field: set and read back ----------------------------------------------------------

NUMERIC_FIELDS = {
    "DESC": "thirty-nine characters: all CA carries!",
    "EGU": "mbar",
    "PREC": 4,
    "HOPR": 100.0,
    "LOPR": -100.0,
    "DRVH": 50.0,
    "DRVL": -50.0,
    "HIHI": 40.0,
    "HIGH": 30.0,
    "LOW": -30.0,
    "LOLO": -40.0,
    "HYST": 1.5,
    "MDEL": 0.5,
    "ADEL": 2.0,
}
SEVERITY_FIELDS = {"HHSV": "INVALID", "HSV": "MAJOR", "LSV": "NO_ALARM", "LLSV": "MINOR"}


@pytest.mark.parametrize("type_count", ["f1", "i1", "f4", "F4", "I3"])
def test_every_field_set_and_read_back(relay, ca, type_count):
    name = relay.name("all", type_count)
    put(name, 1 if type_count.endswith("1") else [1])
    assert len(NUMERIC_FIELDS["DESC"]) == 39
    # Before anything is set: built-in defaults.
    assert field_text(ca, name, "DESC") == ""
    assert field_text(ca, name, "EGU") == ""
    for field in ("PREC", "HOPR", "LOPR", "DRVH", "HIHI", "HYST", "MDEL", "ADEL"):
        assert field_number(ca, name, field) == 0, field
    for field in SEVERITY_FIELDS:
        assert get(f"{name}.{field}", as_string=True) == "NO_ALARM"

    for field, value in NUMERIC_FIELDS.items():
        set_field(ca, name, field, value)
    # A longout's (an i scalar's) double fields hold whole numbers: HYST 1.5 reads 1.
    whole = type_count == "i1"
    for field, value in NUMERIC_FIELDS.items():
        if isinstance(value, str):
            assert field_text(ca, name, field) == value, field
        else:
            want = int(value) if whole and isinstance(value, float) else value
            assert field_number(ca, name, field) == want, field
    # Once a limit is set its severity is MAJOR/MINOR/MINOR/MAJOR, as an ai record's.
    defaults = {"HHSV": "MAJOR", "HSV": "MINOR", "LSV": "MINOR", "LLSV": "MAJOR"}
    for field, value in defaults.items():
        assert get(f"{name}.{field}", as_string=True) == value, field
        r = read(ca, f"{name}.{field}", data_type="control")
        assert r.metadata.enum_strings[r.data[0]].decode() == value, field
    # Severities go in as text (caproto and pyepics) or as their index.
    for field, value in SEVERITY_FIELDS.items():
        set_field(ca, name, field, value, data_type=ChannelType.STRING)
        assert get(f"{name}.{field}", as_string=True) == value, field
    put(f"{name}.HHSV", "MINOR")
    assert get(f"{name}.HHSV", as_string=True) == "MINOR"
    set_field(ca, name, "HHSV", 2)
    assert get(f"{name}.HHSV", as_string=True) == "MAJOR"
    # pyepics puts go in too.
    put(f"{name}.EGU", "Pa")
    put(f"{name}.HOPR", 250.5)
    assert field_text(ca, name, "EGU") == "Pa"
    assert field_number(ca, name, "HOPR") == (250 if whole else 250.5)


@pytest.mark.parametrize("type_count", ["f1", "i1"])
def test_ctrl_and_graphic_reads_give_units_precision_and_limits(relay, ca, type_count):
    name = relay.name("ctrl", type_count)
    put(name, 7)
    md = read(ca, name, data_type="control").metadata
    assert md.units == b""
    assert (md.upper_disp_limit, md.lower_disp_limit, md.upper_alarm_limit) == (0, 0, 0)

    settings = {
        "EGU": "V",
        "PREC": 3,
        "HOPR": 100.0,
        "LOPR": -100.0,
        "HIHI": 40.0,
        "HIGH": 30.0,
        "LOW": -30.0,
        "LOLO": -40.0,
    }
    for field, value in settings.items():
        set_field(ca, name, field, value)
    for data_type in ("control", "graphic"):
        r = read(ca, name, data_type=data_type)
        md = r.metadata
        assert r.data[0] == 7
        assert md.units == b"V"
        assert (md.upper_disp_limit, md.lower_disp_limit) == (100.0, -100.0)
        assert (md.upper_alarm_limit, md.upper_warning_limit) == (40.0, 30.0)
        assert (md.lower_warning_limit, md.lower_alarm_limit) == (-30.0, -40.0)
        if type_count == "f1":
            assert md.precision == 3
    # PCAS answers control limits from the display limits' getters: HOPR/LOPR.
    md = read(ca, name, data_type="control").metadata
    assert (md.upper_ctrl_limit, md.lower_ctrl_limit) == (100.0, -100.0)
    # An event says what a read says, drive limits set or not (events swapped them: a
    # Phoebus widget's range fell to DRVL..DRVH, 0..0, after a put).
    set_field(ca, name, "DRVH", 50.0)
    set_field(ca, name, "DRVL", -5.0)
    events = Events(connect(ca, name), data_type="control")
    events.wait(1, "the first DBR_CTRL event")
    put(name, 8)
    events.wait(2, "a DBR_CTRL event of a put")
    events.clear()
    read_md = read(ca, name, data_type="control").metadata
    for _, event in events.seen:
        for limit in ("disp_limit", "ctrl_limit", "alarm_limit", "warning_limit"):
            for side in ("upper", "lower"):
                key = f"{side}_{limit}"
                assert getattr(event, key) == getattr(read_md, key), (key, events.seen)

    # DBR_CTRL carries 7 bytes of units: cut before a character, not in the middle of one
    # (the ninth byte of "温度°C" is in its "°": what a client got was not UTF-8).
    set_field(ca, name, "EGU", "温度°C".encode())  # as its UTF-8 bytes: caproto sends them
    assert read(ca, name, data_type="control").metadata.units == "温度".encode()
    assert read(ca, f"{name}.EGU").data[0] == "温度°C".encode()
    set_field(ca, name, "EGU", "V")

    pv = epics.PV(name, form="ctrl", auto_monitor=False)
    assert pv.wait_for_connection(timeout=5)
    cv = pv.get_ctrlvars(timeout=5)
    assert cv["units"] == "V"
    assert (cv["upper_disp_limit"], cv["lower_disp_limit"]) == (100.0, -100.0)
    assert (cv["upper_ctrl_limit"], cv["lower_ctrl_limit"]) == (100.0, -100.0)
    assert (cv["upper_alarm_limit"], cv["upper_warning_limit"]) == (40.0, 30.0)
    assert (cv["lower_warning_limit"], cv["lower_alarm_limit"]) == (-30.0, -40.0)
    if type_count == "f1":
        assert cv["precision"] == 3


# -- alarms ----------------------------------------------------------------------------------


def set_limits(ca, name, **limits):
    for field, value in limits.items():
        set_field(ca, name, field, value)


def test_alarm_severity_after_crossing_each_limit_and_coming_back(relay, ca):
    name = relay.name("alarm", "f1")
    put(name, 0.0)
    set_limits(ca, name, HIHI=10.0, HIGH=5.0, LOW=-5.0, LOLO=-10.0)
    steps = [
        (0.0, OK),
        (4.9, OK),
        (5.0, HIGH),  # at the limit is past it, as in an ai record
        (6.0, HIGH),
        (10.0, HIHI),
        (11.0, HIHI),
        (7.0, HIGH),
        (0.0, OK),
        (-6.0, LOW),
        (-11.0, LOLO),
        (-7.0, LOW),
        (1.0, OK),
    ]
    for value, expected in steps:
        put(name, value)
        assert alarm(ca, name) == expected, value
        assert pyepics_alarm(name) == expected, value

    # Severities of one's own: MINOR for HIHI, none for HIGH, INVALID for LOLO.
    set_field(ca, name, "HHSV", "MINOR", data_type=ChannelType.STRING)
    set_field(ca, name, "HSV", "NO_ALARM", data_type=ChannelType.STRING)
    set_field(ca, name, "LLSV", "INVALID", data_type=ChannelType.STRING)
    for value, expected in [
        (11.0, (AlarmStatus.HIHI, AlarmSeverity.MINOR_ALARM)),
        (6.0, OK),
        (-11.0, (AlarmStatus.LOLO, AlarmSeverity.INVALID_ALARM)),
        (0.0, OK),
    ]:
        put(name, value)
        assert alarm(ca, name) == expected, value


def test_sevr_and_stat_read_and_monitor_the_alarm(relay, ca):
    """``NAME.SEVR`` and ``NAME.STAT``, as an IOC's records have them: the alarm the
    value is in, as an enum (its name as a string), read-only, a monitor posted on each
    change of it."""
    name = relay.name("sevr", "f1")

    def as_text(field):
        return read(ca, f"{name}.{field}", data_type=ChannelType.STRING).data[0].decode()

    # Never put: undefined.
    assert (as_text("SEVR"), as_text("STAT")) == ("INVALID", "UDF")
    put(name, 0.0)
    set_limits(ca, name, HIHI=10.0, HIGH=5.0)
    assert (as_text("SEVR"), as_text("STAT")) == ("NO_ALARM", "NO_ALARM")
    sub, events = severity_events(ca, name)
    wait_for(lambda: events == [0], what="the first SEVR event")
    put(name, 11.0)
    assert (field_number(ca, name, "SEVR"), field_number(ca, name, "STAT")) == (2, 3)
    assert (as_text("SEVR"), as_text("STAT")) == ("MAJOR", "HIHI")
    # Every field carries the PV's alarm, as an IOC record's fields carry the record's.
    assert alarm(ca, f"{name}.HIHI") == HIHI
    put(name, 6.0)
    assert (as_text("SEVR"), as_text("STAT")) == ("MINOR", "HIGH")
    put(name, 6.5)  # the same alarm: no event
    set_field(ca, name, "HHSV", "MINOR", data_type=ChannelType.STRING)
    put(name, 11.0)  # HIHI, MINOR: the status changed, the severity did not: no event
    assert (as_text("SEVR"), as_text("STAT")) == ("MINOR", "HIHI")
    put(name, 0.0)
    wait_for(lambda: events[-1:] == [0], what="SEVR back to NO_ALARM")
    assert events == [0, 2, 1, 0]
    sub.clear()
    assert write_status(connect(ca, f"{name}.SEVR"), [0]).name == "ECA_NOWTACCESS"


def test_alarm_hysteresis_holds_an_alarm_until_hyst_past_its_limit(relay, ca):
    name = relay.name("hyst", "f1")
    put(name, 0.0)
    set_limits(ca, name, HIHI=10.0, HIGH=5.0, LOW=-5.0, LOLO=-10.0, HYST=2.0)
    steps = [
        (11.0, HIHI),
        (9.0, HIHI),  # held: not 2 below HIHI yet
        (7.5, HIGH),
        (4.0, HIGH),  # held
        (2.5, OK),
        (4.0, OK),  # rising again within HYST of HIGH raises nothing
        (-11.0, LOLO),
        (-9.0, LOLO),
        (-7.5, LOW),
        (-4.0, LOW),
        (-2.5, OK),
    ]
    for value, expected in steps:
        put(name, value)
        assert alarm(ca, name) == expected, value
    # A field put that moves no limit keeps an alarm held by HYST.
    put(name, 11.0)
    put(name, 9.0)
    assert alarm(ca, name) == HIHI
    set_field(ca, name, "DESC", "in the hysteresis band")
    set_field(ca, name, "HYST", 3.0)
    assert alarm(ca, name) == HIHI
    # Moving the limit starts afresh: 9 is below the new HIHI.
    set_field(ca, name, "HIHI", 9.5)
    assert alarm(ca, name) == HIGH


def test_alarm_limits_of_arrays_and_buffers_check_each_puts_elements(relay, ca):
    arr = relay.name("alarm", "f4")
    put(arr, [0.0])
    set_limits(ca, arr, HIHI=10.0, LOLO=-10.0)
    for value, expected in [
        ([1.0, 11.0, 2.0], HIHI),
        ([0.0, 1.0], OK),
        ([-11.0, 0.0, 3.0], LOLO),
        ([9.0, -9.0], OK),
    ]:
        put(arr, value)
        assert alarm(ca, arr) == expected, value
    buf = relay.name("alarm", "I5")
    put(buf, [0])
    set_limits(ca, buf, HIGH=5)
    put(buf, [1, 6])
    assert alarm(ca, buf) == HIGH
    # The 6 is still in the buffer; this put's elements are what count.
    put(buf, [2])
    assert alarm(ca, buf) == OK
    assert value_of(ca, buf) == [0, 1, 6, 2]
    # A field change re-checks that put's elements too, not the whole buffer.
    set_field(ca, buf, "DESC", "a buffer")
    set_field(ca, buf, "HIGH", 4)
    assert alarm(ca, buf) == OK
    set_field(ca, buf, "HIGH", 2)
    assert alarm(ca, buf) == HIGH


def test_a_limit_change_rechecks_the_alarm_without_a_put(relay, ca):
    name = relay.name("recheck", "i1")
    put(name, 7)
    assert alarm(ca, name) == OK
    set_field(ca, name, "HIGH", 5)
    assert alarm(ca, name) == HIGH
    set_field(ca, name, "HIHI", 7)
    assert alarm(ca, name) == HIHI
    set_field(ca, name, "HHSV", "NO_ALARM", data_type=ChannelType.STRING)
    assert alarm(ca, name) == HIGH
    set_field(ca, name, "HIGH", 8)
    assert alarm(ca, name) == OK


def test_dbe_alarm_subscription_gets_only_limit_crossings(relay, ca):
    name = relay.name("alarmmon", "f1")
    put(name, 0.0)
    set_limits(ca, name, HIHI=10.0, HIGH=5.0)
    events = Events(connect(ca, name), data_type="time", mask=SubscriptionType.DBE_ALARM)
    events.wait(1, "the initial event")
    for v in (1.0, 2.0, 6.0, 7.0, 8.0, 12.0, 13.0, 6.5, 0.0, 1.0, 3.0, 11.0):
        put(name, v)
    events.wait(6, "five crossings")
    got = [(v, (md.status, md.severity)) for v, md in events.seen]
    assert got == [(0.0, OK), (6.0, HIGH), (12.0, HIHI), (6.5, HIGH), (0.0, OK), (11.0, HIHI)]
    events.clear()


def test_time_monitor_carries_alarm_and_time_stamp_of_each_put(relay, ca):
    name = relay.name("timemon", "f1")
    put(name, 0.0)
    set_limits(ca, name, EGU="V", HIHI=10.0)
    events = Events(connect(ca, name), data_type="time")
    events.wait(1, "the initial event")
    put(name, 11.0)
    v, md = events.wait(2, "the put of 11")[1]
    now = read(ca, name, data_type="time").metadata
    assert v == 11.0
    assert (md.status, md.severity) == HIHI
    assert md.timestamp == now.timestamp
    put(name, 1.0)
    v, md = events.wait(3, "the put of 1")[2]
    assert (v, md.status, md.severity) == (1.0, *OK)
    events.clear()


# -- property monitors ----------------------------------------------------------------------


def test_property_monitor_sees_a_unit_change_and_no_value_put(relay, ca):
    """DBE_PROPERTY events come for the fields an IOC marks prop(YES): those DBR_CTRL
    carries, and the alarm severities."""
    name = relay.name("prop", "f1")
    put(name, 1.0)
    events = Events(connect(ca, name), data_type="control", mask=SubscriptionType.DBE_PROPERTY)
    first = events.wait(1, "the initial event")[0][1]
    assert first.units == b""
    egu_seen = []

    def on_egu(value=None, **kw):
        egu_seen.append(value)

    egu_mon = epics.PV(f"{name}.EGU", callback=on_egu)
    assert egu_mon.wait_for_connection(timeout=5)
    wait_for(lambda: egu_seen, what="the initial NAME.EGU event")

    put(name, 2.0)  # a value put: no property event
    # Nor a change of a field that DBR_CTRL does not carry, as on an IOC (no prop(YES)).
    for field, value in (("DESC", "about"), ("HYST", 0.5), ("MDEL", 0.1), ("ADEL", 0.1)):
        set_field(ca, name, field, value)
    set_field(ca, name, "EGU", "mm")
    set_field(ca, name, "PREC", 3)
    seen = events.wait(3, "two field changes")
    assert [(md.units, md.precision) for _, md in seen] == [(b"", 0), (b"mm", 0), (b"mm", 3)]
    assert seen[1][0] == 2.0
    wait_for(lambda: egu_seen[-1] == "mm", what="'mm' on the NAME.EGU monitor")
    assert egu_seen == ["", "mm"]
    events.clear()
    egu_mon.clear_callbacks()
    egu_mon.disconnect()


# -- drive limits, deadbands -------------------------------------------------------------------


def test_scan_is_passive_and_udf_says_whether_the_pv_has_had_a_value(relay, ca):
    """``NAME.SCAN`` and ``NAME.UDF``, read-only, as a record's: a relay PV is processed
    by each put (Passive), and is undefined until its first put (UDF 1, then 0, with a
    monitor event)."""
    name = relay.name("udf", "f1")
    assert field_number(ca, name, "UDF") == 1  # provisional: never put
    assert read(ca, f"{name}.UDF").data_type == ChannelType.CHAR
    udf = Events(connect(ca, f"{name}.UDF"))
    assert udf.wait(1, "the first UDF event") and udf.values() == [1]
    put(name, 1.5)
    udf.wait(2, "UDF after the first put")
    assert udf.values() == [1, 0]
    assert field_number(ca, name, "UDF") == 0
    udf.clear()
    assert field_number(ca, name, "SCAN") == 0
    assert get(f"{name}.SCAN", as_string=True) == "Passive"
    r = read(ca, f"{name}.SCAN", data_type="control")
    assert [t.decode() for t in r.metadata.enum_strings][:3] == ["Passive", "Event", "I/O Intr"]
    for field, value in (("SCAN", 6), ("UDF", 1)):
        assert not write_status(connect(ca, f"{name}.{field}"), [value]).success, field
    assert (field_number(ca, name, "SCAN"), field_number(ca, name, "UDF")) == (0, 0)
    assert get(name) == 1.5
    # Deleted: undefined again, as a PV never put.
    delete(ca, relay, name)
    assert field_number(ca, name, "UDF") == 1


def test_proc_processes_the_pv_as_a_passive_record(relay, ca):
    """``NAME.PROC``: a put of any value processes the PV, as it does a passive record: its
    value put again, through the drive limits as they stand, and stamped now, with the
    monitor events a put of that value makes (none for an unchanged number with MDEL 0,
    one with MDEL < 0, one each time for an array).  It reads 0, a DBR_CHAR; a buffer has
    none; a PV never put is not processed."""
    name, array = relay.name("proc", "f1"), relay.name("proc", "f3")
    buf, never = relay.name("proc", "F4"), relay.name("proc_never", "f1")
    put(name, 5.0)
    put(array, [1.0, 2.0])
    put(buf, [1.0])
    before = read(ca, name, data_type="time").metadata.timestamp
    set_field(ca, name, "PROC", 1)  # with callback: complete once processed
    assert read(ca, name, data_type="time").metadata.timestamp > before
    assert get(name) == 5.0
    assert field_number(ca, name, "PROC") == 0
    assert read(ca, f"{name}.PROC").data_type == ChannelType.CHAR

    events = Events(connect(ca, name), data_type="time", mask=SubscriptionType.DBE_VALUE)
    events.wait(1, "the initial event")
    set_field(ca, name, "PROC", 0)  # any value processes
    put(name, 6.0)  # events come in the order posted: none came for the PROC
    events.wait(2, "the put after PROC")
    assert events.values() == [5.0, 6.0]
    set_field(ca, name, "MDEL", -1.0)
    set_field(ca, name, "PROC", 1)
    events.wait(3, "PROC with MDEL < 0")
    assert events.values() == [5.0, 6.0, 6.0]
    assert events.seen[2][1].timestamp > events.seen[1][1].timestamp
    put(f"{name}.PROC", 1)  # through pyepics
    events.wait(4, "PROC through pyepics")
    events.clear()

    arr = Events(connect(ca, array), data_count=0)
    arr.wait(1, "the array's initial event")
    set_field(ca, array, "PROC", 1)
    arr.wait(2, "the array's event on PROC")
    assert value_of(ca, array) == [1.0, 2.0]
    arr.clear()

    assert not write_status(connect(ca, f"{never}.PROC"), [1]).success
    relay.wait_log(f"put to {never}.PROC failed: {never} does not exist yet")
    assert field_number(ca, never, "UDF") == 1
    not_served(relay, ca, f"{buf}.PROC")
    assert value_of(ca, buf) == [1.0]


def test_drive_limits_clip_scalar_array_and_buffer_puts(relay, ca):
    scalar, array, buf, integer = (
        relay.name("drv", "f1"),
        relay.name("drv", "f4"),
        relay.name("drv", "F4"),
        relay.name("drv", "i1"),
    )
    for name in (scalar, array, buf, integer):
        put(name, 0 if name in (scalar, integer) else [0])
        set_limits(ca, name, DRVH=10.0, DRVL=-10.0)
    for value, stored in [(20.0, 10.0), (-20.0, -10.0), (5.5, 5.5)]:
        assert write_status(connect(ca, scalar), [value]).success
        assert get(scalar) == stored
    put(array, [-20.0, 0.0, 20.0, 9.5])
    assert value_of(ca, array) == [-10.0, 0.0, 10.0, 9.5]
    put(buf, [30.0, -30.0])
    assert value_of(ca, buf) == [0.0, 10.0, -10.0]
    put(integer, 99)
    assert get(integer) == 10
    # DRVH <= DRVL: no clipping, as in an ao record.
    set_field(ca, scalar, "DRVH", -10.0)
    put(scalar, 1000.0)
    assert get(scalar) == 1000.0


def test_a_new_drive_limit_brings_the_value_within_it_at_once(relay, ca):
    """A put to DRVH or DRVL processes an ao record, whose value then goes within them: a
    scalar's or an array's past a new limit is clipped at once, stamped anew, with its
    monitor event; one within them, a buffer's elements (history), and a value when DRVH
    <= DRVL (no clipping) stay as they are."""
    scalar, array = relay.name("newdrv", "f1"), relay.name("newdrv", "i3")
    buf, inside = relay.name("newdrv", "F3"), relay.name("newdrv_in", "f1")
    put(scalar, 6.0)
    put(array, [1, 5, 9])
    put(buf, [1.0, 5.0, 9.0])
    put(inside, 2.0)
    before = read(ca, scalar, data_type="time").metadata.timestamp
    events = Events(connect(ca, scalar), mask=SubscriptionType.DBE_VALUE)
    events.wait(1, "the initial event")
    set_field(ca, scalar, "DRVH", 3.0)
    assert get(scalar) == 3.0  # as soon as the put to DRVH completed
    assert read(ca, scalar, data_type="time").metadata.timestamp > before
    events.wait(2, "the clipped value")
    assert events.values() == [6.0, 3.0]
    events.clear()
    set_field(ca, array, "DRVH", 4.0)
    set_field(ca, array, "DRVL", 2.0)
    assert value_of(ca, array) == [2, 4, 4]
    set_field(ca, buf, "DRVH", 4.0)
    assert value_of(ca, buf) == [1.0, 5.0, 9.0]
    set_field(ca, inside, "DRVH", 3.0)
    set_field(ca, inside, "DRVL", -3.0)
    assert get(inside) == 2.0
    set_field(ca, scalar, "DRVL", 10.0)  # DRVH <= DRVL: no clipping, the value stays
    assert get(scalar) == 3.0
    # Right after a put without callback of the broker's own, which its mirror shows.
    for k in range(3):
        name = relay.name(f"newdrv{k}", "f1")
        put(name, 1.0)
        epics.caput(name, 6.0 + k, wait=False)
        set_field(ca, name, "DRVH", 3.0)
        assert get(name) == 3.0, name


def test_a_put_to_an_alarm_limit_or_severity_processes_an_output_record(relay, ca):
    """The alarm limits and their severities, like DRVH and DRVL, process an ao or
    longout record when put (pp(TRUE)): the scalar is stamped anew, and the alarm event
    the new limit brings carries that stamp, the time the PV went into alarm, not the
    time of the last value put (alarm handlers show it as the alarm's time).  An
    unchanged value makes no value event (MDEL 0); an array (a waveform, which has no
    such fields on an IOC) is not processed."""
    scalar, integer, array = (
        relay.name("ppalarm", "f1"),
        relay.name("ppalarm", "i1"),
        relay.name("ppalarm", "f3"),
    )
    for name in (scalar, integer, array):
        put(name, 5 if name != array else [5.0, 1.0])
    stamps = {name: read(ca, name, data_type="time").metadata.timestamp for name in (scalar, array)}
    alarms = Events(connect(ca, scalar), data_type="time", mask=SubscriptionType.DBE_ALARM)
    values = Events(connect(ca, scalar), data_type="time", mask=SubscriptionType.DBE_VALUE)
    alarms.wait(1, "the initial alarm event")
    values.wait(1, "the initial value event")

    set_field(ca, scalar, "HIHI", 4.0)  # with callback: complete once processed
    now = read(ca, scalar, data_type="time").metadata
    assert now.timestamp > stamps[scalar]
    assert (now.status, now.severity) == HIHI
    value, md = alarms.wait(2, "the alarm the new HIHI brings")[1]
    assert (value, md.status, md.severity) == (5.0, *HIHI)
    assert md.timestamp == now.timestamp

    set_field(ca, scalar, "HHSV", 1)  # MINOR: a severity processes the record too
    then = read(ca, scalar, data_type="time").metadata
    assert then.timestamp > now.timestamp
    value, md = alarms.wait(3, "the severity HHSV gives")[2]
    assert (md.status, md.severity) == (AlarmStatus.HIHI, AlarmSeverity.MINOR_ALARM)
    assert md.timestamp == then.timestamp
    put(scalar, 6.0)  # events come in the order posted: no value event for either field
    values.wait(2, "the put after the field puts")
    assert values.values() == [5.0, 6.0]
    alarms.clear()
    values.clear()

    before = read(ca, integer, data_type="time").metadata.timestamp
    set_field(ca, integer, "LOW", 7)
    md = read(ca, integer, data_type="time").metadata
    assert md.timestamp > before
    assert (md.status, md.severity) == (AlarmStatus.LOW, AlarmSeverity.MINOR_ALARM)

    set_field(ca, array, "HIHI", 4.0)
    md = read(ca, array, data_type="time").metadata
    assert md.timestamp == stamps[array]
    assert (md.status, md.severity) == HIHI


def test_a_longout_holds_its_limits_as_whole_numbers(relay, ca):
    """An ``i`` scalar behaves as a longout, whose limits are DBF_LONG: a put of 3.5 holds
    3, read as DBR_LONG, and the alarm and the drive limits act on 3 (an ``f`` PV's hold
    3.5)."""
    integer, double = relay.name("whole", "i1"), relay.name("whole", "f1")
    for name in (integer, double):
        put(name, 0)
        set_limits(ca, name, HIHI=3.5, DRVH=10.7)
    response = read(ca, f"{integer}.HIHI")
    assert response.data_type == ChannelType.LONG
    assert field_number(ca, integer, "HIHI") == 3
    assert field_number(ca, integer, "DRVH") == 10
    assert field_number(ca, double, "HIHI") == 3.5
    put(integer, 3)  # at the limit is past it
    assert alarm(ca, integer) == HIHI
    put(double, 3)
    assert alarm(ca, double) == OK
    put(integer, 11)
    assert get(integer) == 10


def test_mdel_deadband_holds_back_small_changes_of_a_scalar(relay, ca):
    name = relay.name("mdel", "f1")
    put(name, 0.0)
    set_field(ca, name, "MDEL", 1.0)
    # DBE_VALUE only: caproto's default mask takes DBE_PROPERTY too, which a field put posts.
    events = Events(connect(ca, name), mask=SubscriptionType.DBE_VALUE)
    events.wait(1, "the initial event")
    for v in (0.5, 0.9, 1.5, 2.0, 2.6, 2.0, 10.0):
        put(name, v)
    events.wait(4, "the puts past the deadband")
    assert events.values() == [0.0, 1.5, 2.6, 10.0]
    # A read is not held back.
    put(name, 10.5)
    assert get(name) == 10.5
    # MDEL 0: every change posts again.
    set_field(ca, name, "MDEL", 0.0)
    for v in (10.6, 10.7):
        put(name, v)
    events.wait(6, "10.7")
    assert events.values() == [0.0, 1.5, 2.6, 10.0, 10.6, 10.7]
    events.clear()


def test_adel_deadband_holds_back_archive_events(relay, ca):
    name = relay.name("adel", "f1")
    put(name, 0.0)
    set_field(ca, name, "ADEL", 2.0)
    log_events = Events(connect(ca, name), mask=SubscriptionType.DBE_LOG)
    value_events = Events(connect(ca, name), mask=SubscriptionType.DBE_VALUE)
    log_events.wait(1, "the initial DBE_LOG event")
    value_events.wait(1, "the initial DBE_VALUE event")
    for v in (0.5, 1.0, 2.5, 3.0, 5.0):
        put(name, v)
    value_events.wait(6, "every put on DBE_VALUE")
    log_events.wait(3, "2.5 and 5.0 on DBE_LOG")
    assert value_events.values() == [0.0, 0.5, 1.0, 2.5, 3.0, 5.0]
    assert log_events.values() == [0.0, 2.5, 5.0]
    log_events.clear()
    value_events.clear()


def test_deadband_does_not_apply_to_arrays(relay, ca):
    name = relay.name("mdel", "f2")
    put(name, [1.0, 1.0])
    set_field(ca, name, "MDEL", 100.0)
    events = Events(connect(ca, name), data_count=0)
    events.wait(1, "the initial event")
    put(name, [1.5, 1.0])
    put(name, [2.0, 1.0])
    events.wait(3, "every put")
    assert events.values() == [1.0, 1.5, 2.0]
    events.clear()


# -- NELM, NORD, RES ----------------------------------------------------------------------------


def test_buffer_nord_nelm_and_res(relay, ca):
    name = relay.name("buf", "F5")
    assert field_number(ca, name, "NELM") == 5
    assert field_number(ca, name, "NORD") == 0
    put(name, [1.0, 2.0])
    assert field_number(ca, name, "NORD") == 2
    put(name, [3.0, 4.0, 5.0, 6.0])
    assert field_number(ca, name, "NORD") == 5
    assert value_of(ca, name) == [2.0, 3.0, 4.0, 5.0, 6.0]

    nord_seen = []

    def on_nord(value=None, **kw):
        nord_seen.append(value)

    nord = epics.PV(f"{name}.NORD", callback=on_nord)
    assert nord.wait_for_connection(timeout=5)
    wait_for(lambda: nord_seen == [5], what="the initial NORD event")

    set_field(ca, name, "RES", 0)  # 0 does nothing
    assert field_number(ca, name, "NORD") == 5
    set_field(ca, name, "RES", 1)
    assert field_number(ca, name, "NORD") == 0
    wait_for(lambda: nord_seen[-1] == 0, what="NORD 0 on its monitor")
    assert field_number(ca, name, "RES") == 0
    put(name, [7.0])
    assert value_of(ca, name) == [7.0]
    assert field_number(ca, name, "NORD") == 1
    put(f"{name}.RES", 1)  # through pyepics
    assert field_number(ca, name, "NORD") == 0
    nord.clear_callbacks()
    nord.disconnect()

    text = relay.name("buf", "C8")
    put(text, "abcdef")
    set_field(ca, text, "RES", 1)
    put(text, "xy")
    assert get_array(text, as_string=True) == "xy"
    assert field_number(ca, text, "NELM") == 8


def test_array_nord_after_a_short_put_and_nelm(relay, ca):
    name = relay.name("arr", "f6")
    put(name, [1.0, 2.0, 3.0, 4.0])
    assert field_number(ca, name, "NELM") == 6
    assert field_number(ca, name, "NORD") == 4
    put(name, [9.0, 8.0])
    assert field_number(ca, name, "NORD") == 2
    scalar = relay.name("arr", "i1")
    put(scalar, 3)
    assert (field_number(ca, scalar, "NELM"), field_number(ca, scalar, "NORD")) == (1, 1)


def test_nelm_nord_are_read_only(relay, ca):
    name = relay.name("ro", "F4")
    put(name, [1.0])
    for field in ("NELM", "NORD"):
        assert not write_status(connect(ca, f"{name}.{field}"), [3]).success
    assert (field_number(ca, name, "NELM"), field_number(ca, name, "NORD")) == (4, 1)


# -- NAME, RTYP and FIELD$ ----------------------------------------------------------------


def text_of(chars) -> str:
    """The text of a char array as caproto gives it, up to its terminator."""
    return bytes(chars.astype(np.uint8)).split(b"\0", 1)[0].decode()


def chars_text(ca, channel):
    """A char array field (``NAME$``) read through caproto at its current length and
    through pyepics as a string (which must agree), up to its terminator."""
    text = text_of(read(ca, channel, data_count=0).data)
    assert get(channel, as_string=True) == text
    return text


@pytest.mark.parametrize(
    "type_count, rtyp",
    [
        ("f1", "ao"),
        ("i1", "longout"),
        ("s1", "stringout"),
        ("c12", "waveform"),
        ("f3", "waveform"),
        ("I4", "compress"),
        ("C8", "compress"),
    ],
)
def test_name_and_rtyp_say_what_the_record_is(relay, ca, type_count, rtyp):
    """Tools read a record's NAME and RTYP (an archiver's metadata, alarm and display
    tools): served for every PV, read-only, as an IOC serves them."""
    name = relay.name("what", type_count)
    put(name, "7" if type_count[0] in "sScC" else 7 if type_count[1:] == "1" else [7])
    assert field_text(ca, name, "RTYP") == rtyp
    assert field_text(ca, name, "NAME") == name
    assert chars_text(ca, f"{name}.NAME$") == name
    for field, data in (("RTYP", ["ai"]), ("NAME", ["other"]), ("NAME$", [ord("x"), 0])):
        assert not write_status(connect(ca, f"{name}.{field}"), data).success, field
    assert field_text(ca, name, "RTYP") == rtyp
    assert field_text(ca, name, "NAME") == name


def test_a_name_longer_than_a_dbr_string_reads_whole_as_name_dollar(relay, ca):
    """A DBR_STRING carries 39 characters: NAME of a longer name is cut there, as an
    IOC's is, and NAME$ (a char array) holds it whole, which is what an archiver reads
    first (it would take a cut NAME for the name of another record)."""
    name = relay.name("a_long_name_of_the_pv", "f1")
    assert len(name) > 40
    put(name, 1.0)
    assert field_text(ca, name, "NAME") == name[:39]
    assert chars_text(ca, f"{name}.NAME$") == name
    assert read(ca, f"{name}.NAME$").data.shape == (len(name) + 1,)


def test_desc_dollar_reads_and_writes_the_whole_desc(relay, ca):
    """DESC$ is DESC as a char array: 40 characters, one more than a DBR_STRING carries;
    a DESC$ monitor sees a put to DESC, and bad text fails and changes nothing."""
    name = relay.name("descd", "f1")
    put(name, 1.0)
    desc = connect(ca, f"{name}.DESC$")
    texts = []

    def on_event(sub, response):
        texts.append(text_of(response.data))

    sub = desc.subscribe(data_type=ChannelType.CHAR, data_count=0)
    sub.add_callback(on_event)
    wait_for(lambda: texts == [""], what="the first DESC$ event")
    forty = "0123456789" * 4
    assert write_status(desc, list(forty.encode() + b"\0"), data_type=ChannelType.CHAR).success
    assert chars_text(ca, f"{name}.DESC$") == forty
    set_field(ca, name, "DESC", "short")
    assert chars_text(ca, f"{name}.DESC$") == "short"
    for bad in (b"y" * 41, b"\xb0C"):
        assert not write_status(desc, list(bad + b"\0"), data_type=ChannelType.CHAR).success
        assert field_text(ca, name, "DESC") == "short"
    relay.wait_log(f"refused put to {name}.DESC: DESC takes UTF-8 text")
    wait_for(lambda: texts[-1:] == ["short"], what="the DESC$ monitor sees the DESC put")
    assert forty in texts
    sub.clear()


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, good, bad, data_type",
    [
        ("PREC", 2, "abc", ChannelType.STRING),  # PCAS would make it 0xabc = 2748
        ("PREC", 2, "xyz", ChannelType.STRING),
        ("PREC", 2, -1, ChannelType.LONG),
        ("PREC", 2, 18, ChannelType.LONG),
        ("HIHI", 10.0, "xyz", ChannelType.STRING),
        ("HIHI", 10.0, "not a number", ChannelType.STRING),
        ("LOLO", -10.0, float("nan"), ChannelType.DOUBLE),
        ("HOPR", 10.0, "xyz", ChannelType.STRING),
        ("MDEL", 1.0, "xyz", ChannelType.STRING),
        ("EGU", "V", "x" * 17, ChannelType.STRING),
        ("HHSV", "MINOR", 7, ChannelType.LONG),
        ("HHSV", "MINOR", "SEVERE", ChannelType.STRING),
    ],
    ids=[
        "text-to-PREC",
        "xyz-to-PREC",
        "negative-PREC",
        "PREC-18",
        "xyz-to-HIHI",
        "words-to-HIHI",
        "NaN-to-LOLO",
        "xyz-to-HOPR",
        "xyz-to-MDEL",
        "EGU-17-chars",
        "severity-7",
        "unknown-severity",
    ],
)
def test_bad_field_value_fails_and_changes_nothing(relay, ca, field, good, bad, data_type):
    name = relay.name("bad", "f1")
    put(name, 1.0)
    as_text = isinstance(good, str)
    set_field(ca, name, field, good, data_type=ChannelType.STRING if as_text else None)

    def current():
        """The field through pyepics (severities as text) and caproto (native)."""
        native = read(ca, f"{name}.{field}").data[0]
        native = native.decode() if isinstance(native, bytes) else native.item()
        return get(f"{name}.{field}", as_string=as_text), native

    before = current()
    assert before == (good, 1 if field == "HHSV" else good)
    status = write_status(connect(ca, f"{name}.{field}"), [bad], data_type=data_type)
    assert not status.success, status
    assert current() == before
    if bad == "abc":
        # Refused before PCAS converts it (to 2748), and said why.
        relay.wait_log(f"to {name}.PREC from ")
        assert "cannot convert text 'abc' to a number" in relay.log()


def test_desc_longer_than_ca_carries_fails_and_changes_nothing(relay, ca):
    """A DBR_STRING is 40 bytes with its terminator: 39 characters.  caproto cuts longer
    text to 40 bytes with no terminator (pyepics refuses it on the client side); the
    relay fails such a put rather than store a cut or overrun text."""
    name = relay.name("desc", "f1")
    put(name, 1.0)
    desc = connect(ca, f"{name}.DESC")
    longest = "0123456789" * 3 + "abcdefghi"
    assert write_status(desc, [longest]).success
    assert field_text(ca, name, "DESC") == longest
    for text in ("x" * 40, "y" * 41, "z" * 60):
        assert not write_status(desc, [text]).success, len(text)
        assert field_text(ca, name, "DESC") == longest
    relay.wait_log(f"refused put to {name}.DESC: text of 40 bytes or more")
    put(f"{name}.DESC", "p" * 39)
    assert field_text(ca, name, "DESC") == "p" * 39
    assert write_status(desc, [""]).success
    assert field_text(ca, name, "DESC") == ""


def test_field_text_that_is_not_utf8_fails_and_the_channel_takes_the_next_put(relay, ca):
    """A field travels to its shard as UTF-8 text: bytes that are not are refused, at
    once, and the next put with callback on the channel completes."""
    name = relay.name("egu8", "f1")
    put(name, 1.0)
    set_field(ca, name, "EGU", "V")
    egu = connect(ca, f"{name}.EGU")
    status = egu.write([b"\xb0C"], data_type=ChannelType.STRING, wait=True, timeout=3).status
    assert not status.success, status
    relay.wait_log(f"refused put to {name}.EGU: EGU takes UTF-8 text")
    assert field_text(ca, name, "EGU") == "V"
    degrees = "°C".encode()  # caproto would send the text as Latin-1
    assert egu.write([degrees], data_type=ChannelType.STRING, wait=True, timeout=3).status.success
    assert read(ca, f"{name}.EGU").data[0] == degrees


def test_field_put_to_a_pv_never_put_fails(relay, ca):
    name = relay.name("early", "f1")
    buf = relay.name("early", "F3")
    # The fields of a provisional PV read as their defaults...
    assert field_text(ca, name, "EGU") == ""
    assert field_number(ca, buf, "NORD") == 0
    # ...and cannot be put.
    assert not write_status(connect(ca, f"{name}.EGU"), ["V"]).success
    assert not write_status(connect(ca, f"{name}.HIHI"), [1.0]).success
    assert not write_status(connect(ca, f"{buf}.RES"), [1]).success
    assert field_text(ca, name, "EGU") == ""
    relay.wait_log(f"put to {name}.EGU failed: {name} does not exist yet")
    # Once the PV exists, they can.
    put(name, 1.0)
    set_field(ca, name, "EGU", "V")
    assert field_text(ca, name, "EGU") == "V"


def test_unknown_fields_and_fields_of_text_pvs_are_not_served(relay, ca):
    num, text, chars, arr = (
        relay.name("nf", "f1"),
        relay.name("nf", "s1"),
        relay.name("nf", "c10"),
        relay.name("nf", "f3"),
    )
    put(num, 1.0)
    put(text, "hello")
    put(chars, "hello")
    put(arr, [1.0])
    not_served(
        relay,
        ca,
        f"{num}.FOO",
        f"{num}.egu",
        f"{num}.HIHIX",
        f"{num}.RES",  # not a buffer
        f"{arr}.RES",
        f"{text}.HIHI",
        f"{text}.EGU",
        f"{text}.PREC",
        f"{chars}.HIHI",
        f"{chars}.EGU",
        f"{chars}.PREC",
        f"{chars}.RES",
        f"{num}.PREC$",  # $ is for string fields
        f"{num}.NAME$$",
        f"{text}.EGU$",
    )
    # DESC, NELM and NORD are served for every PV.
    for name in (text, chars):
        set_field(ca, name, "DESC", "about this text")
        assert field_text(ca, name, "DESC") == "about this text"
    assert (field_number(ca, text, "NELM"), field_number(ca, text, "NORD")) == (1, 1)
    assert field_number(ca, chars, "NELM") == 10
    # ...and a text PV has no alarm limits, so no alarm.
    assert alarm(ca, text) == OK
    assert get(text) == "hello"


# -- delete, shard restart --------------------------------------------------------------------


def test_deleting_a_pv_deletes_its_fields(relay, ca):
    name = relay.name("gone", "f1")
    put(name, 11.0)
    set_limits(ca, name, EGU="V", HIHI=10.0, DESC="to be deleted")
    assert alarm(ca, name) == HIHI
    egu = Events(connect(ca, f"{name}.EGU"))
    egu.wait(1, "the initial NAME.EGU event")
    delete(ca, relay, name)
    # The monitor of NAME.EGU sees it go.
    assert egu.wait(2, "EGU back to ''")[1][0] == ""
    assert field_text(ca, name, "EGU") == ""
    put(name, 11.0)
    assert field_text(ca, name, "EGU") == ""
    assert field_text(ca, name, "DESC") == ""
    assert field_number(ca, name, "HIHI") == 0
    assert alarm(ca, name) == OK
    assert read(ca, name, data_type="control").metadata.units == b""
    egu.clear()


def test_fields_survive_a_killed_shard(relay, ca):
    name = relay.name("durable", "f1")
    put(name, 11.0)
    set_limits(ca, name, EGU="K", PREC=3, HIHI=10.0, DESC="survives")
    k = shard_for(name, relay.shards)
    pid = _shard_pid(relay, k)
    sub, severities = severity_events(ca, name)
    wait_for(lambda: severities == [2], what="the first SEVR event")
    mark = len(relay.log())
    os.kill(pid, signal.SIGKILL)
    relay.wait_log(f"shard {k} in sync", start=mark)
    # While its shard was gone the PV was INVALID (COMM), then HIHI/MAJOR again.
    wait_for(lambda: severities == [2, 3, 2], what="SEVR through the restart")
    sub.clear()
    # The broker took these from the restarted shard's snapshot.
    assert field_text(ca, name, "EGU") == "K"
    assert field_text(ca, name, "DESC") == "survives"
    assert field_number(ca, name, "PREC") == 3
    assert field_number(ca, name, "HIHI") == 10.0
    wait_for(lambda: alarm(ca, name) == HIHI, what="HIHI/MAJOR again")
    wait_for(
        lambda: write_status(connect(ca, f"{name}.EGU"), ["mK"]).success,
        what="a field put to work again",
    )
    assert field_text(ca, name, "EGU") == "mK"


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def _shard_pid(relay: Relay, k: int) -> int:
    """The pid of ``relay``'s shard ``k`` (its command line says ``shard k``)."""
    for pid in relay.children():
        argv = _argv(pid)
        if "shard" in argv and argv[argv.index("shard") + 1] == str(k):
            return pid
    raise AssertionError(f"no shard {k} among {relay.children()}")


# -- configured defaults, restart -----------------------------------------------------------


@pytest.fixture(scope="module")
def config_relay(tmp_path_factory):
    """A relay with CONFIG's field defaults, for the rest of the module."""
    Relay.give_way()
    tmp = tmp_path_factory.mktemp("fields-config")
    path = tmp / "carelay.toml"
    path.write_text(CONFIG)
    relay = Relay(tmp, shards=2, extra=["--config", str(path)])
    relay.shared = True
    yield relay
    relay.stop()


@pytest.fixture
def crelay(config_relay, request):
    yield from using_shared(config_relay, request)


def temperature(relay: Relay, type_count: str = "f1") -> str:
    return f"{relay.prefix}temperature_{unique('lab')}_{type_count}"


def test_configured_defaults_apply_to_matching_names(crelay, ca):
    name = temperature(crelay)
    # Before the first put, too: the fields are known from the name.
    assert field_text(ca, name, "EGU") == "degC"
    put(name, 21.5)
    assert field_text(ca, name, "EGU") == "degC"
    assert field_text(ca, name, "DESC") == "a temperature"
    assert field_number(ca, name, "PREC") == 2
    assert field_number(ca, name, "HIHI") == 30.0
    assert get(f"{name}.HHSV", as_string=True) == "MAJOR"
    md = read(ca, name, data_type="control").metadata
    assert (md.units, md.precision, md.upper_alarm_limit) == (b"degC", 2, 30.0)
    assert alarm(ca, name) == OK
    put(name, 31.0)
    assert alarm(ca, name) == HIHI

    other = f"{crelay.prefix}pressure_{unique('lab')}_f1"
    put(other, 31.0)
    assert field_text(ca, other, "EGU") == ""
    assert alarm(ca, other) == OK
    # A text PV that matches gets the fields that make sense for it.
    note = temperature(crelay, "s1")
    put(note, "warm")
    assert field_text(ca, note, "DESC") == "a temperature"
    not_served(crelay, ca, f"{note}.EGU")


def test_a_client_put_wins_over_the_configured_default(crelay, ca):
    name = temperature(crelay)
    put(name, 25.0)
    set_field(ca, name, "EGU", "K")
    set_field(ca, name, "HIHI", 20.0)
    assert field_text(ca, name, "EGU") == "K"
    assert field_number(ca, name, "HIHI") == 20.0
    assert field_number(ca, name, "PREC") == 2  # still the configured one
    assert read(ca, name, data_type="control").metadata.units == b"K"
    assert alarm(ca, name) == HIHI
    # delpv: the client's fields go, the configured ones are back.
    delete(ca, crelay, name)
    put(name, 25.0)
    assert field_text(ca, name, "EGU") == "degC"
    assert field_number(ca, name, "HIHI") == 30.0
    assert alarm(ca, name) == OK


def test_fields_survive_a_relay_restart(crelay, ca):
    configured, plain, buf = (
        temperature(crelay),
        crelay.name("kept", "f1"),
        crelay.name("kept", "I4"),
    )
    put(configured, 25.0)
    set_field(ca, configured, "EGU", "K")
    put(plain, 11.0)
    set_limits(ca, plain, EGU="A", PREC=5, HOPR=20.0, HIHI=10.0, HYST=0.5, DESC="restart me")
    set_field(ca, plain, "HHSV", "INVALID", data_type=ChannelType.STRING)
    put(buf, [1, 2, 3])
    set_limits(ca, buf, DRVH=100.0, DRVL=-100.0, MDEL=2.0)
    assert alarm(ca, plain) == (AlarmStatus.HIHI, AlarmSeverity.INVALID_ALARM)

    crelay.stop()
    crelay.start()
    with Context() as fresh:
        # A new client context: no channel of the old server to wait out.
        assert field_text(fresh, configured, "EGU") == "K"
        assert field_number(fresh, configured, "PREC") == 2
        assert field_text(fresh, plain, "EGU") == "A"
        assert field_text(fresh, plain, "DESC") == "restart me"
        assert field_number(fresh, plain, "PREC") == 5
        assert field_number(fresh, plain, "HYST") == 0.5
        md = read(fresh, plain, data_type="control").metadata
        assert (md.units, md.precision, md.upper_disp_limit, md.upper_alarm_limit) == (
            b"A",
            5,
            20.0,
            10.0,
        )
        assert alarm(fresh, plain) == (AlarmStatus.HIHI, AlarmSeverity.INVALID_ALARM)
        assert field_number(fresh, buf, "MDEL") == 2.0
        assert write_status(connect(fresh, buf), [500]).success
        assert value_of(fresh, buf) == [1, 2, 3, 100]


def test_bad_configured_field_exits_2(tmp_path):
    for toml, words in [
        ('[fields."x*"]\nDESC = "' + "d" * 41 + '"\n', ["DESC", "40"]),
        ('[fields."x*"]\nPREC = -1\n', ["PREC"]),
        ('[fields."x*"]\nHIHI = "high"\n', ["HIHI", "number"]),
        ('[fields."x*"]\nFOO = 1\n', ["FOO"]),
        ('[fields."x*"]\nNELM = 4\n', ["NELM"]),
    ]:
        path = tmp_path / "carelay.toml"
        path.write_text(toml)
        argv = [*CARELAY, "up", "--data-dir", str(tmp_path / "data"), "--config", str(path)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        assert r.returncode == 2, f"{toml!r}: exit {r.returncode}: {r.stderr}"
        for word in words:
            assert word in r.stderr, (toml, r.stderr)
        assert not (tmp_path / "data").exists()
