"""ShardTimers: while nothing changes, only the clocks that have work wake the shard."""

from __future__ import annotations

import math

from carelay.common.config import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    STATUS_INTERVAL,
    STATUS_TOUCH_INTERVAL,
)
from carelay.shard.timers import ShardTimers


def _started(now: float = 100.0, good_copy: bool = False) -> ShardTimers:
    timers = ShardTimers(autosave_period=1.0, good_copy=good_copy)
    timers.start(now)
    assert timers.status_due(now, changed=False)  # the first status file, at once
    return timers


def test_the_flush_wakes_the_shard_only_while_values_wait_to_be_saved():
    timers = _started()
    assert timers.due(unsaved=True) == 101.0  # the autosave period
    assert timers.due(unsaved=False) > 101.0
    assert timers.due(unsaved=False) == 100.0 + STATUS_TOUCH_INTERVAL


def test_a_status_that_would_say_the_same_is_only_touched_every_touch_interval():
    timers = _started()
    later = 100.0 + STATUS_INTERVAL
    assert timers.status_due(later, changed=False, moved=True)  # a wake that came anyway
    assert not timers.status_due(later + STATUS_INTERVAL, changed=False, moved=False)
    touch = later + STATUS_TOUCH_INTERVAL
    assert timers.due(unsaved=False) == touch  # the loop wakes for it by itself
    assert timers.status_due(touch, changed=False, moved=False)


def test_a_changed_store_state_writes_the_status_at_once():
    timers = _started()
    assert timers.status_due(100.1, changed=True, moved=False)


def test_a_connected_broker_s_silence_is_a_timer():
    timers = _started()
    timers.heard(100.0)
    silence = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
    assert timers.due(unsaved=False) == min(100.0 + silence, 100.0 + STATUS_TOUCH_INTERVAL)
    assert not timers.went_quiet(100.0 + silence)
    assert timers.went_quiet(100.0 + silence + 0.01)


def test_without_a_database_there_is_no_good_copy_timer():
    assert _started(good_copy=False).next_copy == math.inf
    assert _started(good_copy=True).next_copy < math.inf
