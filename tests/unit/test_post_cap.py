"""The cap on the events one PV posts in one turn of the broker's loop (TurnPosts).

A RelayPV runs here without a CA server: its ``postEvent`` is replaced by a recorder,
and a stand-in broker holds what ``post`` reads.  The events past TURN_POST_CAP wait
for the turn's end and go as one: the latest value, its stamp, the masks OR'ed.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pcaspy import cas

from carelay.broker.mirror import DBE_ALARM, DBE_PROPERTY, VALUE_MASK
from carelay.broker.pvs import RelayPV
from carelay.broker.table import Channels
from carelay.broker.turnposts import TURN_POST_CAP, TurnPosts
from carelay.common.fields import FieldResolver
from carelay.common.naming import parse_pv_name

PREFIX = "P:"
T0 = 1.7e9  # a stamp after the EPICS epoch
EPICS_EPOCH = 631152000  # 1990-01-01 in POSIX seconds


class _Broker:
    """What a RelayPV reads of its broker while it posts."""

    access_group = None

    def __init__(self) -> None:
        self.resolver = FieldResolver(PREFIX, {})
        self.table = SimpleNamespace(channels=Channels())
        self.turn_posts = TurnPosts()
        self.health = SimpleNamespace(events_merged=0)
        self.requests = SimpleNamespace(in_flight=lambda pv: 0)
        self.sync = SimpleNamespace(others=False)
        self.store_errors = [""]
        self.field_pvs: dict = {}
        self.live = True

    def shard_live(self, index: int) -> bool:
        return self.live

    def post_field(self, name: str, field: str) -> None:
        pass

    def post_later(self, pv) -> None:
        raise AssertionError("a scalar's events are never paced")


def _stamp(gdd) -> float:
    """A gdd's stamp, in POSIX seconds."""
    ts = cas.epicsTimeStamp()
    gdd.getTimeStamp(ts)
    return EPICS_EPOCH + ts.secPastEpoch + ts.nsec * 1e-9


@pytest.fixture
def monitored():
    """A real, monitored ``f1`` RelayPV; its events as (mask, value, stamp, alarm)."""
    broker = _Broker()
    pv = RelayPV(broker, parse_pv_name(PREFIX + "x_f1", PREFIX, 1000, 128), 0)
    events: list = []

    def post_event(mask, gdd):
        value = gdd[11] if gdd.isContainer() else gdd
        events.append((mask, value.getConvertNumeric(), _stamp(value), value.getStat()))

    pv.postEvent = post_event
    pv.interest = True
    pv.apply(np.array([0.0]), T0, False, owned=True)
    broker.turn_posts.flush()
    events.clear()
    return pv, broker, events


def _burst(pv, n: int, first: float = 1.0) -> None:
    for i in range(n):
        pv.apply(np.array([first + i]), T0 + first + i, False, owned=True)


class _Posted:
    """A PV as TurnPosts sees it: what ``post_held`` was given."""

    def __init__(self) -> None:
        self.held: list[int] = []

    def post_held(self, mask: int) -> None:
        self.held.append(mask)


def test_the_first_posts_of_a_turn_go_and_the_rest_wait_merged():
    posts, a, b = TurnPosts(), _Posted(), _Posted()
    assert [posts.admit(a, VALUE_MASK) for _ in range(TURN_POST_CAP)] == [VALUE_MASK] * 16
    assert posts.admit(b, DBE_ALARM) == DBE_ALARM  # each PV has its own count
    assert posts.admit(a, VALUE_MASK) == 0
    assert posts.admit(a, DBE_ALARM) == 0
    posts.flush()
    assert (a.held, b.held) == ([VALUE_MASK | DBE_ALARM], [])
    # A new turn posts at once again; nothing is held twice.
    assert posts.admit(a, DBE_PROPERTY) == DBE_PROPERTY
    posts.flush()
    assert a.held == [VALUE_MASK | DBE_ALARM]


def test_a_burst_posts_the_cap_then_its_last_value_with_its_own_stamp(monitored):
    pv, broker, events = monitored
    _burst(pv, 1000)
    assert [v for _, v, _, _ in events] == [float(i) for i in range(1, TURN_POST_CAP + 1)]
    broker.turn_posts.flush()
    assert len(events) == TURN_POST_CAP + 1
    mask, value, stamp, _ = events[-1]
    assert (mask, value) == (VALUE_MASK, 1000.0)
    assert stamp == pytest.approx(T0 + 1000.0, abs=1e-6)
    assert broker.health.events_merged == 1000 - TURN_POST_CAP
    # Values and stamps in order; the next turn's first put posts at once.
    assert [v for _, v, _, _ in events] == sorted(v for _, v, _, _ in events)
    _burst(pv, 1, 2000.0)
    assert events[-1][1] == 2000.0 and len(events) == TURN_POST_CAP + 2


def test_one_past_the_cap_is_posted_and_none_when_the_cap_is_not_reached(monitored):
    pv, broker, events = monitored
    _burst(pv, TURN_POST_CAP)
    broker.turn_posts.flush()
    assert len(events) == TURN_POST_CAP  # nothing held, nothing more
    _burst(pv, TURN_POST_CAP + 1, 100.0)
    assert events[-1][1] == 100.0 + TURN_POST_CAP - 1
    broker.turn_posts.flush()
    assert events[-1][1] == 100.0 + TURN_POST_CAP
    assert len(events) == 2 * TURN_POST_CAP + 1


def test_the_merged_event_ors_the_masks_and_carries_the_last_alarm(monitored):
    pv, broker, events = monitored
    _burst(pv, TURN_POST_CAP)
    broker.live = False  # the shard went away: the next post adds DBE_ALARM
    pv.field_changed("EGU", "mm")  # held: DBE_PROPERTY (and the COMM alarm)
    _burst(pv, 3, 50.0)  # held: values
    assert len(events) == TURN_POST_CAP
    broker.turn_posts.flush()
    mask, value, _, alarm = events[-1]
    assert mask == VALUE_MASK | DBE_ALARM | DBE_PROPERTY
    assert value == 52.0
    assert alarm == 9  # COMM_ALARM


def test_a_monitor_gone_before_the_turn_ends_gets_nothing(monitored):
    pv, broker, events = monitored
    _burst(pv, TURN_POST_CAP + 5)
    pv.interest = False
    broker.turn_posts.flush()
    assert len(events) == TURN_POST_CAP
    assert not broker.turn_posts.held  # taken, not left for a later turn
