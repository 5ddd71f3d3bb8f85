"""The broker's side of the hop to a shard, without CA: a Broker whose ``cas.process``
is a script, against a real ShardServer on its socket in a thread.

What is checked here is hard to see from a CA client: a plain put to a PV in
sync with its shard is mirrored and posted at once, with no request waiting
for an answer, and reaches the shard as a WRITE with the same value and stamp;
a put with callback completes only on the shard's ACK; a WRITE the shard
refuses puts the mirror back to what the shard holds; a stopping broker sends
the WRITEs it still had queued; the short way a number takes to a plain PV
ends where the long way ends.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from pcaspy import cas

from carelay.broker.app import Broker
from carelay.broker.link import OWN_WRITES_MIN, ShardLink
from carelay.broker.pvs import BasePV
from carelay.broker.sync import ShardSync
from carelay.common.config import load_config
from carelay.common.messages import Applied
from carelay.shard.server import ShardServer
from tests.unit.scripted_cas import Script, serve_in_thread

PREFIX = "H:"


class Notify:
    """What writeNotify hands the broker: told once whether the put was applied."""

    def __init__(self) -> None:
        self.result: bool | None = None

    def complete(self, ok: bool) -> None:
        assert self.result is None, "completed twice"
        self.result = ok


@pytest.fixture
def make_hop(tmp_path):
    """A Broker on a script and a real shard serving in a thread, with the configuration
    ``overrides`` (e.g. field defaults); both are taken down after the test."""
    made = []

    def make(**overrides):
        config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path), **overrides)
        shard = ShardServer(config, 0, db=None)
        shard.bind()
        stop_shard = serve_in_thread(shard)
        script = Script()
        broker = Broker(config, script)
        made.append((broker, shard, stop_shard))
        return broker, shard, script

    yield make
    for broker, shard, stop_shard in made:
        for link in broker.links:
            link.close(linger=1000)
        # The shard takes what is still on its socket before it is looked at.
        time.sleep(0.2)
        stop_shard()
        shard.close()


@pytest.fixture
def hop(make_hop):
    return make_hop()


def run(broker: Broker, script: Script, *steps) -> None:
    script.steps = [lambda: broker.links[0].live, *steps]
    broker.run(script.stop)


def created(broker: Broker, name: str, value: float):
    """A step pair: the first put (a round trip that creates the PV), then its answer."""
    box = {}

    def put() -> bool:
        pv = box["pv"] = broker.attach(name)
        assert broker.forward_put(pv, np.array([value], dtype=pv.spec.dtype), None)
        return True

    def answered() -> bool:
        return box["pv"].real and not broker.requests.in_flight(box["pv"])

    return box, put, answered


def test_a_plain_put_is_mirrored_at_once_and_reaches_the_shard_as_sent(hop):
    broker, shard, script = hop
    name = f"{PREFIX}a_f1"
    box, put, answered = created(broker, name, 1.0)
    seen = {}

    def write() -> bool:
        pv = box["pv"]
        before = time.time()
        assert broker.forward_put(pv, np.array([2.5]), None)
        # Mirrored and stamped now, with nothing waiting for the shard.
        assert pv.value.tolist() == [2.5] and pv.stamp >= before
        assert not broker.requests.in_flight(pv) and not broker.requests.unanswered[0]
        seen["stamp"] = pv.stamp
        return True

    def settled() -> bool:
        return name in shard.store and shard.store.get(name).tolist() == [2.5]

    run(broker, script, put, answered, write, settled)
    assert shard.store.stamp(name) == seen["stamp"]


def test_a_put_with_callback_completes_on_the_shards_ack(hop):
    broker, shard, script = hop
    box, put, answered = created(broker, f"{PREFIX}b_F3", 1.0)
    notify = Notify()

    def write() -> bool:
        pv = box["pv"]
        assert broker.forward_put(pv, np.array([2.0, 3.0]), notify)
        assert pv.contents().tolist() == [1.0, 2.0, 3.0]
        assert notify.result is None  # not before the shard has it
        return True

    run(broker, script, put, answered, write, lambda: notify.result is not None)
    assert notify.result is True
    assert shard.store.get(f"{PREFIX}b_F3").tolist() == [1.0, 2.0, 3.0]


def test_a_plain_put_is_clipped_as_the_shard_clips_it(make_hop):
    broker, shard, script = make_hop(fields={"c_*": {"DRVH": 5.0}})
    box, put, answered = created(broker, f"{PREFIX}c_f1", 1.0)

    def write() -> bool:
        assert broker.forward_put(box["pv"], np.array([9.0]), None)
        assert box["pv"].value.tolist() == [5.0]
        return True

    run(
        broker,
        script,
        put,
        answered,
        write,
        lambda: shard.store.get(f"{PREFIX}c_f1").tolist() == [5.0],
    )


def test_a_refused_write_puts_the_mirror_back_as_the_shard_holds_it(hop):
    broker, shard, script = hop
    name = f"{PREFIX}ghost_f1"
    notify = Notify()
    box = {}

    def mirror_only() -> bool:
        # A PV that the broker takes as real but the shard does not hold.
        pv = box["pv"] = broker.attach(name)
        broker.table.set_real(pv, True)
        pv.apply(np.array([1.0]), time.time(), append=False)
        assert broker.forward_put(pv, np.array([2.0]), notify)
        assert pv.value.tolist() == [2.0]
        return True

    def restated() -> bool:
        return notify.result is not None and not box["pv"].real

    run(broker, script, mirror_only, restated)
    assert notify.result is False
    assert name not in shard.store
    assert name not in set(broker.real_names())


def test_a_stopping_broker_sends_the_writes_it_queued(hop):
    broker, shard, script = hop
    box, put, answered = created(broker, f"{PREFIX}d_f1", 1.0)

    def writes_then_stop() -> bool:
        for k in range(2, 201):
            assert broker.forward_put(box["pv"], np.array([float(k)]), None)
        # Queued for the next batch (or tick); the stop must not drop them.
        assert broker.links[0].queued
        return True

    run(broker, script, put, answered, writes_then_stop)
    # The fixture closes the link with a linger and lets the shard drain.
    broker.links[0].close(linger=1000)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if shard.store.get(f"{PREFIX}d_f1").tolist() == [200.0]:
            break
        time.sleep(0.02)
    assert shard.store.get(f"{PREFIX}d_f1").tolist() == [200.0]


def gdd(ait, value):
    g = cas.gdd(16, ait)  # 16: gddAppType_value, as PCAS hands a put to write()
    g.put(value)
    return g


def queued_writes(broker: Broker) -> list:
    """(name, value) of the WRITEs queued for the shard, taken off the queue."""
    link = broker.links[0]
    out = [
        (m.name, m.data.tolist())
        for entry in link.outbox
        for m in (entry.messages() if hasattr(entry, "messages") else [entry])
    ]
    link.outbox.clear()
    link.queued = 0
    return out


#: Puts to plain PVs, and what each must come to: (status, mirrored value).  The short way
#: takes the numbers; text and what does not convert go the long way.
REFUSED = (cas.S_cas_noConvert, [1])
PUTS = [
    ("e_f1", cas.aitEnumFloat64, 2.5, (cas.S_casApp_success, [2.5])),
    ("e_f1", cas.aitEnumInt32, 7, (cas.S_casApp_success, [7.0])),
    ("e_f1", cas.aitEnumString, "abc", REFUSED),
    ("e_i1", cas.aitEnumFloat64, 7.9, (cas.S_casApp_success, [7])),
    ("e_i1", cas.aitEnumFloat64, -7.9, (cas.S_casApp_success, [-7])),
    ("e_i1", cas.aitEnumFloat64, 1e12, REFUSED),
    ("e_i1", cas.aitEnumFloat64, float("nan"), REFUSED),
    ("e_i1", cas.aitEnumString, "12", (cas.S_casApp_success, [12])),
]


def test_a_number_put_to_a_plain_pv_ends_where_the_long_way_ends(hop):
    broker, shard, script = hop
    f1, put_f, answered_f = created(broker, f"{PREFIX}e_f1", 1.0)
    i1, put_i, answered_i = created(broker, f"{PREFIX}e_i1", 1.0)

    def compare() -> bool:
        pvs = {"e_f1": f1["pv"], "e_i1": i1["pv"]}
        assert all(pv.plain for pv in pvs.values())
        for stem, ait, value, expected in PUTS:
            pv = pvs[stem]
            seen = []
            for way in (pv.write, lambda ctx, g, pv=pv: BasePV.write(pv, ctx, g)):
                pv.apply(np.array([1], dtype=pv.spec.dtype), 1.0, append=False)
                status = way(None, gdd(ait, value))
                seen.append((status, pv.value.tolist(), pv.value.dtype, queued_writes(broker)))
            assert seen[0] == seen[1], (stem, value)
            assert seen[0][:2] == expected, (stem, value)
            # A put that is taken goes on to the shard as it was mirrored; a refused one not.
            sent = [] if expected == REFUSED else [(pv.name, expected[1])]
            assert seen[0][3] == sent, (stem, value)
        return True

    run(broker, script, put_f, answered_f, put_i, answered_i, compare)


def test_deadbands_set_after_short_puts_count_from_the_last_value(hop):
    broker, shard, script = hop
    box, put, answered = created(broker, f"{PREFIX}g_f1", 0.0)
    masks = []

    def puts() -> bool:
        pv = box["pv"]
        pv.interest = True
        pv._post_now = lambda mask, alarm, severity: masks.append(mask)
        pv.write(None, gdd(cas.aitEnumFloat64, 5.0))
        pv.field_changed("MDEL", 1.0)
        assert not pv.plain
        masks.clear()
        for v in (5.5, 6.5, 6.0):
            pv.write(None, gdd(cas.aitEnumFloat64, v))
        return True

    run(broker, script, put, answered, puts)
    value = [m & cas.DBE_VALUE for m in masks]
    # 5.5 is within 1.0 of 5.0, the last value posted; 6.5 is not; 6.0 is within 1.0 of it.
    assert value == [0, cas.DBE_VALUE, 0]


def test_a_large_buffer_posts_at_its_event_rate_and_ends_on_its_last_state(hop):
    broker, shard, script = hop
    box, put, answered = created(broker, f"{PREFIX}big_F1000000", 0.0)
    posts: list = []
    appended: list = []

    def fill() -> bool:
        pv = box["pv"]
        assert broker.forward_put(pv, np.zeros(999_999), None)
        pv.interest = True
        pv._post_now = lambda mask, alarm, severity: posts.append(
            (time.monotonic(), len(pv.contents()), pv.contents()[-1])
        )
        return True

    def appends() -> bool:
        # 1000 elements per turn for 0.7 s: far more puts than events.
        k = len(appended) + 1
        assert broker.forward_put(box["pv"], np.full(1000, float(k)), None)
        appended.append(time.monotonic())
        return appended[-1] - appended[0] > 0.7

    def last_state_posted() -> bool:
        return bool(posts) and posts[-1][2] == float(len(appended))

    run(broker, script, put, answered, fill, appends, last_state_posted)
    # 8 MB at BUFFER_EVENT_RATE (40 MB/s): one event per 0.2 s at most.
    assert box["pv"].post_interval() == pytest.approx(0.2)
    times = [t for t, _, _ in posts]
    assert all(b - a >= 0.2 for a, b in zip(times, times[1:], strict=False)), times
    assert 3 <= len(posts) < len(appended) / 10
    assert all(n == 1_000_000 for _, n, _ in posts)


def test_a_broker_alone_forgets_its_writes_to_pvs_it_deleted(hop):
    """The record of this broker's own WRITEs per PV (which a change of another front-end
    is judged against) must not keep every name ever written: a script that writes and
    deletes PVs of new names for months grew it, and the broker, by a name each, while
    no other front-end was served and the shard never said which WRITEs it had applied."""
    broker, shard, script = hop
    names = [f"{PREFIX}gone{k}_f1" for k in range(20)]
    pvs = {}
    link = broker.links[0]

    def create_write_delete() -> bool:
        for name in names:
            if name not in pvs:
                pv = pvs[name] = broker.attach(name)
                assert broker.forward_put(pv, np.array([1.0]), None)  # creates it
                return False
        for pv in pvs.values():
            if not pv.real or broker.requests.in_flight(pv):
                return False
        for name, pv in pvs.items():
            assert broker.forward_put(pv, np.array([2.0]), None)  # written through
            assert broker.forward_delete(name, None)
        return True

    def deleted() -> bool:  # provisional again, while the test holds them
        return not any(pv.real for pv in pvs.values())

    run(broker, script, create_write_delete, deleted, lambda: not link.own_writes)
    assert not any(name in shard.store for name in names)


def test_an_applied_past_the_bound_keeps_only_the_writes_not_yet_applied():
    """Under a steady load some WRITE is always in flight when an APPLIED comes, so the
    record is never cleared whole: once it has grown past its bound, an APPLIED drops
    the names whose last WRITE is applied, and keeps the later ones."""
    link = ShardLink(zmq.Context.instance(), 0, "inproc://none")
    link.own_writes_bound = 4
    for k in range(10):
        link.queue_write(f"{PREFIX}w{k}_f1", 0, 0.0, np.array([1.0]))
    link.queue_write(f"{PREFIX}w0_f1", 0, 0.0, np.array([2.0]))  # its 11th WRITE
    ShardSync._applied(None, link, Applied(8, 0))
    assert link.own_writes == {f"{PREFIX}w8_f1": 9, f"{PREFIX}w9_f1": 10, f"{PREFIX}w0_f1": 11}
    assert link.own_writes_bound == OWN_WRITES_MIN
    ShardSync._applied(None, link, Applied(11, 0))
    assert link.own_writes == {}
