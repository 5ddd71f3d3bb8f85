"""ShardClock: a shard's clock offset from heartbeats, and expiries said in its time."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carelay.broker.clock import MAX_RTT, WINDOW, ShardClock
from carelay.common.config import EXPIRY_MARGIN, PUT_TIMEOUT
from carelay.common.messages import Pong
from carelay.common.protocol import decode_batch, encode_batch
from tests.unit.test_requests import setup  # noqa: F401 - the fixture


def test_no_heartbeat_yet_means_the_same_clock():
    clock = ShardClock()
    assert clock.offset == 0.0
    assert clock.to_shard(100.0) == 100.0 == clock.from_shard(100.0)


def test_a_pong_to_the_ping_in_flight_says_the_offset():
    clock = ShardClock()
    clock.pinged(7, 1000.0)
    clock.ponged(7, 1030.002, 1000.004)  # 30 s ahead, answered half way
    assert clock.offset == pytest.approx(30.0)
    assert clock.to_shard(1001.0) == pytest.approx(1031.0)
    assert clock.from_shard(1031.0) == pytest.approx(1001.0)


def test_pongs_that_say_nothing_or_answer_another_ping_are_left_out():
    clock = ShardClock()
    clock.ponged(1, 5000.0, 1000.0)  # no ping went
    clock.pinged(2, 1000.0)
    clock.ponged(1, 5000.0, 1000.01)  # an older ping's answer
    clock.pinged(3, 1001.0)
    clock.ponged(3, 0.0, 1001.01)  # a shard that does not say its time
    clock.pinged(4, 1002.0)
    clock.ponged(4, 5000.0, 1002.0 + MAX_RTT + 0.1)  # too late to say much
    for k, nonsense in enumerate((math.nan, math.inf, -5.0), start=5):
        clock.pinged(k, 1003.0)
        clock.ponged(k, nonsense, 1003.001)
    assert clock.offset == 0.0


def test_a_pong_of_the_shards_own_leaves_the_ping_in_flight():
    clock = ShardClock()
    clock.pinged(5, 1000.0)
    clock.ponged(0, 1030.0, 1000.001)  # unasked: its store's state changed
    clock.ponged(5, 1030.002, 1000.004)
    assert clock.offset == pytest.approx(30.0)


def test_the_shortest_round_trip_of_the_window_is_believed():
    clock = ShardClock()
    clock.sample(0.0, 10.2, 0.4)  # rtt 0.4: offset 10.0 +- 0.2
    clock.sample(1.0, 11.0, 1.02)  # rtt 0.02: offset 9.99
    clock.sample(2.0, 12.3, 2.3)  # rtt 0.3
    assert clock.offset == pytest.approx(9.99)


def test_a_stepped_clock_is_followed_within_the_window():
    clock = ShardClock()
    clock.sample(0.0, 5.001, 0.002)  # the best sample there will be, 5 s ahead
    for k in range(1, WINDOW):
        clock.sample(k, k - 2.0 + 0.005, k + 0.01)  # stepped: 2 s behind
        assert clock.offset == pytest.approx(5.0)
    clock.sample(WINDOW, WINDOW - 2.0 + 0.005, WINDOW + 0.01)
    assert clock.offset == pytest.approx(-2.0)


@given(
    skew=st.floats(-3600, 3600),
    out=st.floats(0, MAX_RTT / 2),
    back=st.floats(0, MAX_RTT / 2),
)
def test_the_offset_is_within_half_the_round_trip(skew, out, back):
    """Whatever the two legs of the round trip took, the error is at most half of it."""
    clock = ShardClock()
    sent = 1e9
    clock.sample(sent, sent + out + skew, sent + out + back)
    assert abs(clock.offset - skew) <= (out + back) / 2 + 1e-6


def test_requests_say_their_expiry_in_the_shards_time(setup):  # noqa: F811
    requests, _, _ = setup
    requests.clocks[1].sample(1000.0, 1030.0, 1000.0)  # shard 1 is 30 s ahead
    before = time.time()
    _, mine = requests.expect(0, None, "P:a_f1", None, None)
    _, ahead = requests.expect(1, None, "P:b_f1", None, None)
    after = time.time()
    lead = PUT_TIMEOUT - EXPIRY_MARGIN
    assert before + lead <= mine <= after + lead
    assert before + lead + 30.0 <= ahead <= after + lead + 30.0


def test_a_pong_carries_the_shards_time():
    pong = Pong(3, 10, 2, "", 123, 5, 1.5, {}, None, 4, now=1700000000.25)
    frames = encode_batch([pong])
    (back,) = decode_batch(frames, to_shard=False)
    assert back == pong and back.now == 1700000000.25
