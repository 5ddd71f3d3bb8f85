"""A CA broker with no CA channel attached takes another front-end's stream of changes in
batches, at most every tick, instead of waking for each one; with a channel attached, or
after a quiet tick, it watches the shard sockets again and wakes at once.

A real Broker on a scripted ``cas`` and a real shard in a thread; the other front-end is
a bare DEALER socket, and a stand-in for the select hook records what it is told to
watch (the real hook adds those sockets to CA's select).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from carelay.common.messages import Write
from carelay.common.protocol import encode_batch
from tests.unit.scripted_cas import beside_another_front_end, join

PREFIX = "L:"
NAME = f"{PREFIX}x_f1"


class RecordingHook:
    """The SelectHook as the loop uses it: ``watch`` records the shard sockets named, and
    ``woken`` says whether one of them has a message, as the real hook's select would."""

    def __init__(self) -> None:
        self.watched: list[int] = []
        self.sockets: tuple = ()

    def watch(self, sockets: tuple, others: tuple = ()) -> bool:
        self.sockets = sockets
        self.watched.append(len(sockets))
        return True

    def arm(self, on: bool) -> None:
        pass

    @property
    def woken(self) -> bool:
        return any(s.get(zmq.EVENTS) & zmq.POLLIN for s in self.sockets)

    @woken.setter
    def woken(self, value: bool) -> None:
        pass


@pytest.fixture
def pair(tmp_path):
    """(broker, its script, shard, the other front-end's socket, the hook)."""
    with beside_another_front_end(tmp_path, PREFIX) as (broker, script, shard, other):
        hook = broker.loop.wait = RecordingHook()
        yield broker, script, shard, other, hook


def test_with_a_channel_attached_every_turn_watches_the_shards(pair):
    broker, script, shard, other, hook = pair
    box = {"value": 1.0}

    def create() -> bool:
        pv = box["pv"] = broker.attach(NAME)
        assert broker.forward_put(pv, np.array([1.0]), None)
        return True

    def created_and_let_go() -> bool:
        pv = box["pv"]
        if not pv.real or broker.requests.in_flight(pv):
            return False
        pv.attached = False  # the CA client let go: no channel attached
        return True

    def other_puts() -> bool:
        if box["pv"].value.tolist() != [box["value"]]:
            return False  # the last one is not mirrored yet
        if box["value"] >= 20.0:
            return True
        box["value"] += 1.0
        other.send_multipart(encode_batch([Write(NAME, 0, 0.0, np.array([box["value"]]))]))
        return False

    def attach_again() -> bool:
        hook.watched.clear()
        broker.attach(NAME)
        return True

    def a_few_turns() -> bool:
        return len(hook.watched) > 5

    script.steps = [
        lambda: broker.links[0].live,
        create,
        created_and_let_go,
        lambda: join(other, shard),
        other_puts,
        attach_again,
        a_few_turns,
    ]
    broker.run(script.stop)
    # Attached again: every turn watches the shard socket.
    assert 0 not in hook.watched[1:]


def test_streamed_changes_are_polled_without_watching_the_shards(pair):
    """While another front-end streams changes and no channel is attached, the loop
    stops watching the shard sockets (it polls them each tick) and still mirrors every
    change; once the stream stops, it watches them again (an idle broker sleeps long)."""
    broker, script, shard, other, hook = pair
    box = {"value": 1.0, "unwatched": 0}

    def create() -> bool:
        pv = box["pv"] = broker.attach(NAME)
        assert broker.forward_put(pv, np.array([1.0]), None)
        return True

    def created_and_let_go() -> bool:
        pv = box["pv"]
        if not pv.real or broker.requests.in_flight(pv):
            return False
        pv.attached = False
        hook.watched.clear()
        return True

    def stream() -> bool:
        box["value"] += 1.0
        other.send_multipart(encode_batch([Write(NAME, 0, 0.0, np.array([box["value"]]))]))
        return box["value"] >= 200.0

    def mirrored() -> bool:
        if box["pv"].value.tolist() != [box["value"]]:
            return False
        box["streamed"] = list(hook.watched)
        box["quiet_from"] = time.monotonic()
        return True

    def quiet() -> bool:
        return time.monotonic() > box["quiet_from"] + 0.05

    script.steps = [
        lambda: broker.links[0].live,
        create,
        created_and_let_go,
        lambda: join(other, shard),
        stream,
        mirrored,
        quiet,
    ]
    broker.run(script.stop)
    assert 0 in box["streamed"]  # some turns left the shard sockets to the tick's poll
    assert hook.watched[-1] == 1  # quiet again: watched
