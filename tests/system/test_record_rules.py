"""Monitor events follow the rules of EPICS records, seen through real CA clients.

A scalar number posts as an ai/ao record does: DBE_VALUE when the value moved past MDEL
(0, the default: any change; negative: every put), DBE_LOG likewise past ADEL, and
DBE_ALARM whenever the alarm changes; NaN as recGblCheckDeadband judges it.  A string
posts on change, as a stringout does.  Events on one CA circuit arrive in the order the
server posted them, so an event that must not come is shown missing by a later one that
must (no fixed waits).
"""

from __future__ import annotations

import math

import pytest
from caproto import AlarmSeverity, AlarmStatus, SubscriptionType

from tests.system.clients import connect, put, write_status
from tests.system.conftest import wait_for

OK = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
HIGH = (AlarmStatus.HIGH, AlarmSeverity.MINOR_ALARM)

#: A relay whose ``every_*`` PVs post every put, as a site configures it.
EVERY_PUT_CONFIG = """\
[fields."every_*"]
MDEL = -1
"""


class Events:
    """A caproto subscription's events as (value, (status, severity)), in order."""

    def __init__(self, pv, **kw):
        self.seen: list = []
        self.sub = pv.subscribe(**kw)
        self.sub.add_callback(self.on_event)  # caproto keeps a weak reference: self keeps it

    def on_event(self, sub, response):
        value = response.data[0]
        value = value.decode() if isinstance(value, bytes) else value.item()
        md = response.metadata
        alarm = (md.status, md.severity) if hasattr(md, "severity") else None
        self.seen.append((value, alarm))

    def wait(self, n: int, what: str) -> list:
        wait_for(lambda: len(self.seen) >= n, what=f"{n} events: {what}")
        return self.values()

    def values(self) -> list:
        return [v for v, _ in self.seen]


def put_ok(ca, name, value) -> None:
    """A put with callback through caproto, which must succeed."""
    assert write_status(connect(ca, name), [value]).success, f"put {name} = {value!r}"


@pytest.mark.parametrize(
    ("type_count", "same", "other"), [("f1", 2.0, 3.0), ("i1", 2, 3), ("s1", "two", "three")]
)
def test_a_put_of_the_same_value_posts_no_event(relay, ca, type_count, same, other):
    name = relay.name("same", type_count)
    put(name, same)
    events = Events(connect(ca, name))
    events.wait(1, "the initial event")
    put(name, same)
    put(name, same)
    put(name, other)  # must come: the two puts before it posted nothing
    assert events.wait(2, "the changed value") == [same, other]


def test_mdel_minus_one_by_glob_posts_every_put(make_relay, ca, tmp_path):
    config = tmp_path / "carelay.toml"
    config.write_text(EVERY_PUT_CONFIG)
    relay = make_relay(extra=["--config", str(config)])
    every, changes = relay.name("every_", "f1"), relay.name("changes_", "f1")
    for name in (every, changes):
        put(name, 2.0)
    each = Events(connect(ca, every))
    only = Events(connect(ca, changes))
    each.wait(1, "the initial event")
    only.wait(1, "the initial event")
    for name in (every, changes):
        for value in (2.0, 2.0, 5.0):
            put(name, value)
    assert each.wait(4, "one event per put") == [2.0, 2.0, 2.0, 5.0]
    assert only.wait(2, "the change") == [2.0, 5.0]


def test_mdel_deadband_and_nan(relay, ca):
    name = relay.name("mdel", "f1")
    put(name, 0.0)
    put_ok(ca, f"{name}.MDEL", 0.5)
    events = Events(connect(ca, name), mask=SubscriptionType.DBE_VALUE)
    events.wait(1, "the initial event")
    # 0.3 and a second 0.6 are within 0.5 of the value last posted, 1.0 too (of 0.6);
    # NaN after a number is an infinite change, NaN after NaN none.
    for value in (0.3, 0.6, 0.6, 1.0, math.nan, math.nan, 1.0, 2.0):
        put_ok(ca, name, value)
    seen = events.wait(5, "the puts past the deadband")
    assert seen[:2] == [0.0, 0.6] and math.isnan(seen[2]) and seen[3:] == [1.0, 2.0], seen


def test_adel_deadband_on_dbe_log(relay, ca):
    name = relay.name("adel", "f1")
    put(name, 0.0)
    put_ok(ca, f"{name}.MDEL", -1.0)  # DBE_VALUE: every put
    log = Events(connect(ca, name), mask=SubscriptionType.DBE_LOG)
    value = Events(connect(ca, name), mask=SubscriptionType.DBE_VALUE)
    log.wait(1, "the initial DBE_LOG event")
    value.wait(1, "the initial DBE_VALUE event")
    put(name, 0.0)  # ADEL 0 (unset): DBE_LOG on change only
    put(name, 0.2)
    put_ok(ca, f"{name}.ADEL", 0.5)
    for v in (0.4, 0.8, 0.8, 5.0):
        put(name, v)
    assert value.wait(7, "every put") == [0.0, 0.0, 0.2, 0.4, 0.8, 0.8, 5.0]
    assert log.wait(4, "the changes past ADEL") == [0.0, 0.2, 0.8, 5.0]


def test_an_alarm_change_posts_within_the_deadband(relay, ca):
    name = relay.name("alarm", "f1")
    put(name, 1.0)
    for field, value in (("MDEL", 0.5), ("HIGH", 1.1)):
        put_ok(ca, f"{name}.{field}", value)
    both = Events(connect(ca, name), data_type="time")  # DBE_VALUE | DBE_ALARM
    value_only = Events(connect(ca, name), data_type="time", mask=SubscriptionType.DBE_VALUE)
    both.wait(1, "the initial event")
    value_only.wait(1, "the initial event")
    # 1.2 is within MDEL of 1.0 but crosses HIGH: DBE_ALARM only.  Then back, and past MDEL.
    for v in (1.2, 1.2, 1.0, 1.0, 5.0):
        put(name, v)
    both.wait(4, "the alarm changes and the put past MDEL")
    assert both.seen == [(1.0, OK), (1.2, HIGH), (1.0, OK), (5.0, HIGH)]
    assert value_only.wait(2, "the put past MDEL") == [1.0, 5.0]
