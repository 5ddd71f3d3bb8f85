"""A broker that follows: its shard sends it other front-ends' puts only to the PVs its
clients hold, a PV it attaches is read as its shard holds it, and one it lets go is no
longer sent (broker/sync.py ``follow``, shard/follow.py).

A real Broker on a scripted ``cas`` and a real shard in a thread; the other front-end is
a bare DEALER socket that speaks the protocol.
"""

from __future__ import annotations

import numpy as np
import pytest

from carelay.common.messages import Follow, Hello, Put, Write
from carelay.common.protocol import encode_batch
from tests.unit.scripted_cas import beside_another_front_end, join

PREFIX = "G:"
HELD, OTHER = f"{PREFIX}held_f1", f"{PREFIX}other_f1"


@pytest.fixture
def pair(tmp_path):
    with beside_another_front_end(tmp_path, PREFIX) as pair:
        pair[0].sync.follows = True  # as with a second CA broker or PVA configured
        yield pair


def _value(broker, name: str):
    pv = broker.pvs.get(name)
    return pv.value.tolist() if pv is not None and pv.real else None


def test_only_what_its_clients_hold_is_sent_and_an_attach_reads_it_as_it_stands(pair):
    broker, script, shard, other = pair
    box = {}

    def create_held() -> bool:
        pv = box["held"] = broker.attach(HELD)
        assert broker.forward_put(pv, np.array([1.0]), None)
        return True

    def other_creates() -> bool:
        other.send_multipart(encode_batch([Put(OTHER, 1, 0.0, np.array([2.0]))]))
        return True

    def other_writes(value: float):
        def step() -> bool:
            # OTHER first, then HELD: once HELD shows ``value``, whatever the shard sent
            # of OTHER's put has come before it.
            other.send_multipart(
                encode_batch(
                    [
                        Write(OTHER, 0, 0.0, np.array([value])),
                        Write(HELD, 0, 0.0, np.array([value])),
                    ]
                )
            )
            return True

        return step

    def held_shows(value: float):
        return lambda: _value(broker, HELD) == [value]

    def attach_other() -> bool:
        box["other"] = broker.attach(OTHER)
        box["in flight"] = broker.requests.in_flight(box["other"])
        return True

    def let_go() -> bool:
        pv = box["other"]
        pv.attached = False
        broker.detached(pv)
        return True

    script.steps = [
        lambda: broker.links[0].live,
        create_held,
        lambda: _value(broker, HELD) == [1.0] and not broker.requests.in_flight(box["held"]),
        lambda: join(other, shard),
        other_creates,
        lambda: _value(broker, OTHER) == [2.0],  # a creation reaches every front-end
        other_writes(3.0),
        held_shows(3.0),
        lambda: box.setdefault("unheld", _value(broker, OTHER)) is not None,
        attach_other,
        lambda: not broker.requests.in_flight(box["other"]),
        lambda: box.setdefault("attached", _value(broker, OTHER)) is not None,
        other_writes(4.0),
        held_shows(4.0),
        lambda: box.setdefault("followed", _value(broker, OTHER)) is not None,
        let_go,
        other_writes(5.0),
        held_shows(5.0),
    ]
    broker.run(script.stop)
    assert box["unheld"] == [2.0]  # OTHER's put of 3.0 was not sent: no client held it
    assert box["in flight"] == 1  # a read of it waits for the shard's answer
    assert box["attached"] == [3.0]  # as the shard held it when it was attached
    assert box["followed"] == [4.0]
    assert _value(broker, OTHER) == [4.0]  # let go: 5.0 was not sent
    assert shard.store.get(OTHER).tolist() == [5.0]
    assert HELD in broker.sync.followed and OTHER not in broker.sync.followed
    assert shard.admission.follows.count == 1


def test_a_broker_hears_which_pvs_the_other_front_end_follows(tmp_path):
    """WANTED from a real shard: the broker's plain puts to a PV that the other
    front-end follows go at once (ShardLink.wanted), the others in batches."""
    with beside_another_front_end(tmp_path, PREFIX) as (broker, script, shard, other):
        broker.sync.follows = True
        link = broker.links[0]
        seen = {}

        def other_joins_following() -> bool:
            other.send_multipart(encode_batch([Hello(1, "", "other", True)]))
            return True

        def other_follows(on: bool):
            def step() -> bool:
                other.send_multipart(encode_batch([Follow(0, HELD, on)]))
                return True

            return step

        def note(key: str) -> bool:
            seen[key] = (HELD in link.wanted, OTHER in link.wanted)
            return True

        script.steps = [
            lambda: link.live,
            other_joins_following,
            lambda: len(shard.admission) == 2,
            lambda: note("joined"),
            other_follows(True),
            lambda: HELD in link.wanted,
            lambda: note("followed"),
            other_follows(False),
            lambda: HELD not in link.wanted,
        ]
        broker.run(script.stop)
    assert seen == {"joined": (False, False), "followed": (True, False)}
