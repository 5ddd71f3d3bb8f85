"""The broker's mirror of a relay PV (carelay.broker.mirror), without pcaspy or a CA
server: alarm status at each limit, the value events the deadbands let through, the
coalescing of large buffers' events, and what a buffer holds after appends."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from carelay.broker.mirror import (
    BUFFER_EVENT_RATE,
    BUFFER_POST_INTERVAL,
    COALESCE_BYTES,
    COMM_ALARM,
    DBE_ALARM,
    DBE_LOG,
    DBE_PROPERTY,
    DBE_VALUE,
    UDF_ALARM,
    VALUE_MASK,
    WRITE_ALARM,
    PvMirror,
)
from carelay.common import fields
from carelay.common.fields import (
    HIGH_ALARM,
    HIHI_ALARM,
    INVALID,
    LOLO_ALARM,
    LOW_ALARM,
    MAJOR,
    MINOR,
    NO_ALARM,
    NO_SEVERITY,
    FieldResolver,
)
from carelay.common.naming import PvSpec

PREFIX = "M:"
LIMITS = {"HIHI": 10.0, "HIGH": 5.0, "LOW": -5.0, "LOLO": -10.0}
OK = (NO_ALARM, NO_SEVERITY)


def mirror(type_code: str = "f", count: int = 1, stored=None, defaults=None) -> PvMirror:
    """A mirror of ``M:x_<type_code><count>`` with ``stored`` fields."""
    spec = PvSpec(f"{PREFIX}x_{type_code}{count}", type_code, count)
    m = PvMirror(spec, FieldResolver(PREFIX, defaults or {}))
    if stored:
        m.set_fields(stored)
    return m


def put(
    m: PvMirror, *values, append: bool | None = None, reset: bool = False, stamp: float = 1000.0
) -> int:
    """A put of ``values`` mirrored (appended to a buffer unless ``append`` says); its mask."""
    if append is None:
        append = m.ring is not None
    return m.apply(np.array(values, dtype=m.spec.dtype), stamp, append=append, reset=reset)


def fill(m: PvMirror, n: int) -> None:
    """Append ``n`` elements to the buffer of ``m``."""
    m.apply(np.ones(n, dtype=m.spec.dtype), 1000.0, append=True)


def limit_status(m: PvMirror) -> tuple[int, int]:
    return m.status(live=True, store_fault="")


# -- alarm status ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (11.0, (HIHI_ALARM, MAJOR)),
        (10.0, (HIHI_ALARM, MAJOR)),  # at the limit is in alarm, as in an ai record
        (9.9, (HIGH_ALARM, MINOR)),
        (5.0, (HIGH_ALARM, MINOR)),
        (4.9, OK),
        (0.0, OK),
        (-4.9, OK),
        (-5.0, (LOW_ALARM, MINOR)),
        (-9.9, (LOW_ALARM, MINOR)),
        (-10.0, (LOLO_ALARM, MAJOR)),
        (-11.0, (LOLO_ALARM, MAJOR)),
        (math.nan, OK),
    ],
)
def test_alarm_at_each_limit(value, expected):
    m = mirror(stored=LIMITS)
    put(m, value)
    assert limit_status(m) == expected


@pytest.mark.parametrize(
    ("stored", "value", "expected"),
    [
        ({"HIGH": 5.0, "HSV": MAJOR}, 6.0, (HIGH_ALARM, MAJOR)),
        ({"HIHI": 10.0, "HHSV": NO_SEVERITY}, 11.0, OK),  # a limit with no severity
        # The first limit hit decides, HIHI before HIGH, as in an ai record.
        ({"HIHI": 10.0, "HHSV": MINOR, "HIGH": 5.0, "HSV": MAJOR}, 11.0, (HIHI_ALARM, MINOR)),
        ({"LOLO": -10.0, "LLSV": INVALID}, -20.0, (LOLO_ALARM, INVALID)),
        ({"MDEL": 1.0}, 1e9, OK),  # no alarm limit: never in alarm
    ],
)
def test_alarm_severity_fields(stored, value, expected):
    m = mirror(stored=stored)
    put(m, value)
    assert limit_status(m) == expected


def test_hysteresis_holds_an_alarm_until_the_value_is_hyst_past_the_limit():
    m = mirror(stored={"HIGH": 5.0, "HYST": 1.0})
    seen = []
    for v in (6.0, 4.5, 3.9, 4.5):
        put(m, v)
        seen.append(limit_status(m))
    assert seen == [(HIGH_ALARM, MINOR), (HIGH_ALARM, MINOR), OK, OK]


@pytest.mark.parametrize(
    ("real", "live", "store_fault", "expected"),
    [
        (False, True, "", (UDF_ALARM, INVALID)),
        (False, False, "disk full", (UDF_ALARM, INVALID)),
        (True, False, "disk full", (COMM_ALARM, INVALID)),
        (True, True, "disk full", (WRITE_ALARM, MAJOR)),
        (True, True, "", (HIHI_ALARM, MAJOR)),
    ],
)
def test_status_provisional_then_link_then_store_then_limits(real, live, store_fault, expected):
    m = mirror(stored=LIMITS)
    if real:
        put(m, 20.0)
    assert m.status(live, store_fault) == expected


def test_a_field_change_judges_the_last_put_again():
    m = mirror("f", 3)  # a waveform: no field processes it
    put(m, 7.0, 1.0)
    assert limit_status(m) == OK
    m.field_changed("HIGH", 5.0)
    assert limit_status(m) == (HIGH_ALARM, MINOR)
    m.field_changed("HIGH", 8.0)
    assert limit_status(m) == OK


@pytest.mark.parametrize("type_code", ["f", "i"])
def test_a_field_that_processes_a_scalar_is_judged_by_the_processing(type_code):
    """An ao or longout record processes when an alarm limit or severity is put: the
    alarm that brings is judged by the put the shard sends after it, at its stamp."""
    m = mirror(type_code)
    put(m, 7)
    m.field_changed("HIGH", 5)
    assert limit_status(m) == OK  # not until the shard processed the PV
    put(m, 7, reset=True, stamp=2000.0)  # the processing
    assert limit_status(m) == (HIGH_ALARM, MINOR)
    assert m.stamp == 2000.0
    m.field_changed("HSV", fields.MAJOR)
    assert limit_status(m) == (HIGH_ALARM, MINOR)
    put(m, 7, reset=True, stamp=2001.0)
    assert limit_status(m) == (HIGH_ALARM, MAJOR)


def test_an_alarm_held_by_hyst_stays_held_unless_a_limit_moves():
    m = mirror(stored={"HIGH": 5.0, "HYST": 2.0})
    put(m, 6.0)
    put(m, 4.0)  # within HYST of the limit: held
    assert limit_status(m) == (HIGH_ALARM, MINOR)
    m.field_changed("EGU", "mm")  # processes nothing: judged at once, still held
    assert limit_status(m) == (HIGH_ALARM, MINOR)
    m.field_changed("HIGH", 4.5)
    put(m, 4.0, reset=True)  # the processing: judged afresh, 4 is below the new limit
    assert limit_status(m) == OK


def test_a_moved_limit_ends_the_hold_of_an_array_at_once():
    m = mirror("f", 2, stored={"HIGH": 5.0, "HYST": 2.0})
    put(m, 6.0, 0.0)
    put(m, 4.0, 0.0)
    assert limit_status(m) == (HIGH_ALARM, MINOR)
    m.field_changed("HIGH", 4.5)
    assert limit_status(m) == OK


@pytest.mark.parametrize(
    ("type_code", "count", "values", "expected"),
    [
        # A NaN among the elements hides no limit: the numbers are judged.
        ("f", 3, (math.nan, 11.0, 0.0), (HIHI_ALARM, MAJOR)),
        ("f", 3, (0.0, -11.0, math.nan), (LOLO_ALARM, MAJOR)),
        ("F", 4, (math.nan, 6.0), (HIGH_ALARM, MINOR)),
        ("F", 4, (-6.0, math.nan, math.nan), (LOW_ALARM, MINOR)),
        # No numbers at all: no alarm, as a NaN scalar.
        ("f", 3, (math.nan, math.nan, math.nan), OK),
        ("F", 4, (math.nan, math.nan), OK),
    ],
)
def test_a_nan_in_an_array_or_buffer_put_hides_no_limit(type_code, count, values, expected):
    m = mirror(type_code, count, stored=LIMITS)
    put(m, *values)
    assert limit_status(m) == expected
    # Judged again after a field change, from what the put left.
    m.field_changed("EGU", "mm")
    assert limit_status(m) == expected


def test_a_buffer_is_judged_by_its_last_put_not_its_whole_contents():
    m = mirror("F", 4, stored={"HIHI": 10.0})
    put(m, 20.0)
    assert limit_status(m) == (HIHI_ALARM, MAJOR)
    put(m, 1.0, 2.0)  # 20 is still held, but the last put is within limits
    assert m.contents().tolist() == [20.0, 1.0, 2.0]
    assert limit_status(m) == OK
    # An append longer than the buffer is judged by what the buffer took.
    put(m, 50.0, 1.0, 2.0, 3.0, 4.0)
    assert limit_status(m) == OK
    put(m, 50.0)
    m.field_changed("HIHI", 60.0)
    assert limit_status(m) == OK
    # An emptied buffer has no value to be in alarm.
    m.field_changed("HIHI", 10.0)
    assert limit_status(m) == (HIHI_ALARM, MAJOR)
    put(m, reset=True, append=False)
    assert limit_status(m) == OK and m.length() == 0


# -- value events: deadbands -------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "values", "masks"),
    [
        # Deadbands of 0 (unset): a change is a value and an archive event, the same
        # value none (as an ai/ao record; test_record_rules has the rest of the rules).
        ({"HIGH": 100.0}, [0.0, 0.0, 0.1], [VALUE_MASK, 0, VALUE_MASK]),
        (
            {"MDEL": 1.0, "ADEL": 2.0},
            [0.0, 0.5, 1.5, 2.5, 2.6, 4.0],
            [VALUE_MASK, 0, DBE_VALUE, DBE_LOG, DBE_VALUE, DBE_VALUE],
        ),
        # A deadband is "more than": a change of exactly MDEL posts nothing.
        ({"MDEL": 1.0}, [0.0, 1.0, 2.0, 2.5], [VALUE_MASK, DBE_LOG, DBE_VALUE | DBE_LOG, DBE_LOG]),
        ({"ADEL": 1.0}, [0.0, 1.0, 1.5], [VALUE_MASK, DBE_VALUE, DBE_VALUE | DBE_LOG]),
        ({"MDEL": -1.0}, [0.0, 0.0], [VALUE_MASK, DBE_VALUE]),  # negative: every put
    ],
)
def test_value_mask_of_each_put(stored, values, masks):
    m = mirror(stored=stored)
    assert [put(m, v) for v in values] == masks


@pytest.mark.parametrize(("type_code", "count"), [("f", 3), ("F", 1), ("F", 4), ("c", 8)])
def test_arrays_and_buffers_post_every_put(type_code, count):
    m = mirror(type_code, count, stored={"MDEL": 5.0} if type_code in "fF" else None)
    assert [put(m, 1), put(m, 1)] == [VALUE_MASK, VALUE_MASK]


def test_a_plain_pv_posts_changes_and_hands_its_value_to_a_deadband():
    m = mirror()
    assert m.plain
    assert [put(m, 1.0), put(m, 1.0)] == [VALUE_MASK, 0]
    m.field_changed("MDEL", 1.0)
    assert not m.plain
    # The value last posted was 1.0: a put within MDEL of it posts no value event.
    assert put(m, 1.5) == DBE_LOG
    m.set_fields({})
    assert m.plain


def test_configured_defaults_are_in_effect():
    m = mirror(defaults={"x_*": {"HIGH": 5.0}})
    assert not m.plain and m.eff == {"HIGH": 5.0} and m.fields == {}
    put(m, 6.0)
    assert limit_status(m) == (HIGH_ALARM, MINOR)


# -- events: alarm changes, display, coalescing ----------------------------------------


def test_alarm_event_once_per_change():
    m = mirror()
    # Monitors start out told UDF/INVALID, as a provisional PV is.
    assert m.alarm_event(*m.status(True, "")) == 0
    put(m, 1.0)
    assert [m.alarm_event(*m.status(True, "")) for _ in range(2)] == [DBE_ALARM, 0]
    assert m.alarm_event(*m.status(False, "")) == DBE_ALARM


@pytest.mark.parametrize(
    ("type_code", "stored", "mask", "shows"),
    [
        ("f", None, VALUE_MASK, False),
        ("f", None, DBE_PROPERTY, True),
        ("f", {"EGU": "mm"}, VALUE_MASK, True),
        ("i", {"HOPR": 3.0}, VALUE_MASK, True),
        ("f", {"DESC": "a"}, VALUE_MASK, False),
        ("f", {"MDEL": 1.0}, VALUE_MASK, False),
        ("c", None, DBE_PROPERTY, False),
    ],
)
def test_which_events_carry_display_fields(type_code, stored, mask, shows):
    assert mirror(type_code, 4 if type_code == "c" else 1, stored).shows_display(mask) is shows


@pytest.mark.parametrize(
    ("type_code", "count", "held", "interval"),
    [
        ("F", 1, 1, 0.0),
        ("F", 100, 100, 0.0),
        ("F", 2 * COALESCE_BYTES // 8, COALESCE_BYTES // 8, 0.0),  # exactly COALESCE_BYTES
        ("F", 2 * COALESCE_BYTES // 8, COALESCE_BYTES // 8 + 1, BUFFER_POST_INTERVAL),
        ("F", 1_000_000, 1_000_000, 8e6 / BUFFER_EVENT_RATE),  # 8 MB: 0.2 s
        ("C", 4_000_000, 4_000_000, 4e6 / BUFFER_EVENT_RATE),
        ("I", 1_000_000, 10, 0.0),  # by what is held, not capacity
    ],
)
def test_post_interval_by_bytes_held(type_code, count, held, interval):
    m = mirror(type_code, count)
    fill(m, held)
    assert m.length() == held
    assert m.post_interval() == pytest.approx(interval)


def test_coalescing_holds_events_back_within_the_interval_and_sends_them_after():
    m = mirror("F", 1_000_000)
    fill(m, 1_000_000)
    assert m.post_interval() == pytest.approx(0.2)
    assert m.coalesce(VALUE_MASK, 500.0) == VALUE_MASK  # the first event: at once
    assert m.take_due(500.0) == 0  # nothing waits
    assert m.coalesce(DBE_VALUE, 500.05) == 0
    assert m.coalesce(DBE_ALARM, 500.1) == 0
    assert m.take_due(500.15) is None  # not yet
    assert m.take_due(500.25) == DBE_VALUE | DBE_ALARM  # all that waited, once
    assert m.take_due(501.0) == 0
    # The interval runs from the last event sent, 500.25.
    assert m.coalesce(DBE_LOG, 500.35) == 0
    assert m.coalesce(DBE_VALUE, 500.5) == DBE_VALUE | DBE_LOG


def test_small_buffers_and_scalars_are_never_coalesced():
    for m in (mirror("F", 8), mirror()):
        put(m, 1.0)
        assert [m.coalesce(VALUE_MASK, 1.0) for _ in range(3)] == [VALUE_MASK] * 3
        assert m.take_due(1.0) == 0


# -- what is held ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("puts", "held"),
    [
        ([[1, 2]], [1, 2]),
        ([[1, 2], [3]], [1, 2, 3]),
        ([[1, 2], [3, 4, 5]], [2, 3, 4, 5]),
        ([[1, 2, 3, 4, 5, 6]], [3, 4, 5, 6]),
        ([[1, 2, 3], [4, 5, 6, 7, 8, 9]], [6, 7, 8, 9]),
    ],
)
def test_buffer_appends_keep_the_newest(puts, held):
    m = mirror("I", 4)
    for values in puts:
        put(m, *values)
    assert m.contents().tolist() == held and m.length() == len(held)


def test_buffer_replace_and_reset():
    m = mirror("F", 4)
    put(m, 1.0, 2.0, 3.0)
    put(m, 9.0, append=False)
    assert m.contents().tolist() == [9.0]
    put(m, 5.0, reset=True)
    assert m.contents().tolist() == [5.0]


def test_a_value_is_kept_without_a_copy_only_when_owned():
    m = mirror("f", 3)
    data = np.array([1.0, 2.0, 3.0])
    m.apply(data, 1.0, append=False)
    data[0] = 99.0
    assert m.contents().tolist() == [1.0, 2.0, 3.0]
    m.apply(data, 2.0, append=False, owned=True)
    assert m.value is data and m.stamp == 2.0


@pytest.mark.parametrize(
    ("type_code", "count", "stored", "data", "settled"),
    [
        ("f", 1, None, np.array([7.0]), [7.0]),
        ("f", 1, {"DRVH": 5.0, "DRVL": -5.0}, np.array([7.0]), [5.0]),
        ("f", 3, {"DRVH": 5.0, "DRVL": -5.0}, np.array([-9.0, 0.0, 9.0]), [-5.0, 0.0, 5.0]),
        ("i", 1, {"DRVH": 5.0, "DRVL": 0.0}, np.array([-3], dtype=np.int32), [0]),
        ("f", 1, {"DRVH": -5.0, "DRVL": 5.0}, np.array([7.0]), [7.0]),  # DRVH <= DRVL: none
        ("f", 1, None, np.array([1.0, 2.0]), None),  # longer than the PV: the shard refuses
        ("f", 1, None, np.array([], dtype=np.float64), None),
        ("f", 1, None, np.array([1], dtype=np.int32), None),  # not the PV's type
        ("F", 2, None, np.array([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0]),  # a buffer takes any length
    ],
)
def test_settled_put(type_code, count, stored, data, settled):
    m = mirror(type_code, count, stored)
    put(m, *([0] * count))
    out = m.settled_put(data)
    assert (None if out is None else out.tolist()) == settled


def test_provisional_then_real_then_forgotten():
    m = mirror("F", 4, stored={"HIGH": 1.0})
    assert not m.real and m.length() == 0 and m.contents().tolist() == [0.0]
    put(m, 2.0, 3.0)
    assert m.real and m.length() == 2 and limit_status(m) == (HIGH_ALARM, MINOR)
    m.forget()
    assert not m.real and m.length() == 0 and m.stamp == 0.0
    assert m.fields == fields.NO_FIELDS and m.status(True, "") == (UDF_ALARM, INVALID)
    put(m, 2.0)
    assert limit_status(m) == OK  # its fields went with it


def test_display_fields_with_their_defaults():
    m = mirror(stored={"EGU": "mm", "PREC": 3})
    assert [m.display(n) for n in ("EGU", "PREC", "HOPR")] == ["mm", 3, 0]
    assert mirror().display("EGU") == ""


# -- no CA server ------------------------------------------------------------------------


def test_the_mirror_imports_no_pcaspy():
    code = "import sys, carelay.broker.mirror; sys.exit('pcaspy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_event_and_alarm_codes_are_those_of_pcaspy():
    cas = pytest.importorskip("pcaspy.cas")
    alarm = pytest.importorskip("pcaspy.alarm")
    assert (DBE_VALUE, DBE_LOG, DBE_ALARM, DBE_PROPERTY) == (
        cas.DBE_VALUE,
        cas.DBE_LOG,
        cas.DBE_ALARM,
        cas.DBE_PROPERTY,
    )
    a, s = alarm.Alarm, alarm.Severity
    assert (UDF_ALARM, COMM_ALARM, WRITE_ALARM) == (a.UDF_ALARM, a.COMM_ALARM, a.WRITE_ALARM)
    assert (HIHI_ALARM, HIGH_ALARM, LOW_ALARM, LOLO_ALARM) == (
        a.HIHI_ALARM,
        a.HIGH_ALARM,
        a.LOW_ALARM,
        a.LOLO_ALARM,
    )
    assert (MINOR, MAJOR, INVALID) == (s.MINOR_ALARM, s.MAJOR_ALARM, s.INVALID_ALARM)
