"""A broker beside another front-end: it mirrors the other's changes, and a change of the
other that the shard applied before this broker's own later WRITE does not move the
mirror back.

A real Broker on a scripted ``cas`` and a real shard in a thread; the other front-end is
a bare DEALER socket that speaks the protocol.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from carelay.broker.sync import catch_up
from carelay.common.messages import Put, Update, Write
from carelay.common.protocol import WriteRun, decode_batch, encode_batch
from tests.unit.scripted_cas import beside_another_front_end, join

PREFIX = "O:"
NAME = f"{PREFIX}x_f1"


@pytest.fixture
def pair(tmp_path):
    """(broker, its script, shard, the other front-end's socket)."""
    with beside_another_front_end(tmp_path, PREFIX) as pair:
        yield pair


def _drain(sock: zmq.Socket) -> list:
    out = []
    while sock.poll(50):
        out += decode_batch(sock.recv_multipart())
    return out


def _created(broker, box: dict, name: str = NAME) -> list:
    """Script steps: this broker creates ``name`` (its RelayPV in ``box["pv"]``)."""

    def create() -> bool:
        pv = box["pv"] = broker.attach(name)
        assert broker.forward_put(pv, np.array([1.0]), None)
        return True

    def created() -> bool:
        return box["pv"].real and not broker.requests.in_flight(box["pv"])

    return [create, created]


def _until_applied(shard, name: str, held: list) -> None:
    """Wait (at most 5 s) until the shard holds ``held`` for ``name``: the other
    front-end's change is applied there before this broker's next WRITE."""
    wait = time.monotonic() + 5
    while shard.store.get(name).tolist() != held and time.monotonic() < wait:
        time.sleep(0.005)


def test_the_other_front_ends_put_is_mirrored_and_a_later_own_write_is_not_undone(pair):
    broker, script, shard, other = pair
    box = {}

    def other_puts() -> bool:
        other.send_multipart(encode_batch([Write(NAME, 0, 0.0, np.array([2.0]))]))
        return True

    def mirrored() -> bool:
        return box["pv"].value.tolist() == [2.0]

    def both_put() -> bool:
        # The other's WRITE is applied first and its change sent to this broker; this
        # broker's own WRITE follows it at the shard, before the broker reads the change.
        other.send_multipart(encode_batch([Write(NAME, 0, 0.0, np.array([3.0]))]))
        _until_applied(shard, NAME, [3.0])
        assert broker.forward_put(box["pv"], np.array([4.0]), None)
        return True

    def settled() -> bool:
        link = broker.links[0]
        return shard.store.get(NAME).tolist() == [4.0] and link.writes_applied >= link.writes

    script.steps = [
        lambda: broker.links[0].live,
        *_created(broker, box),
        lambda: join(other, shard),
        other_puts,
        mirrored,
        both_put,
        settled,
    ]
    broker.run(script.stop)
    assert box["pv"].value.tolist() == [4.0]  # as the shard holds it
    # The other front-end heard this broker's WRITE, last.
    published = [m for m in _drain(other) if type(m) is Update and m.name == NAME]
    assert published[-1].data.tolist() == [4.0]


def test_writes_made_alone_do_not_hide_the_next_front_ends_change(pair):
    """This broker writes while it is the shard's only front-end (no APPLIED counts are
    sent then); another joins and puts: its change reaches the mirror, not skipped as
    older than this broker's own write."""
    broker, script, shard, other = pair
    box = {}

    def own_write_alone() -> bool:
        assert broker.forward_put(box["pv"], np.array([2.0]), None)
        return True

    def other_puts() -> bool:
        other.send_multipart(encode_batch([Write(NAME, 0, 0.0, np.array([3.0]))]))
        return True

    script.steps = [
        lambda: broker.links[0].live,
        *_created(broker, box),
        own_write_alone,
        lambda: shard.store.get(NAME).tolist() == [2.0],
        lambda: join(other, shard),
        other_puts,
        lambda: box["pv"].value.tolist() == [3.0],
    ]
    broker.run(script.stop)
    assert box["pv"].value.tolist() == shard.store.get(NAME).tolist() == [3.0]


def test_appends_of_two_front_ends_to_one_buffer_keep_the_shards_order(pair):
    """The other front-end's append reaches the shard first; this broker writes its own
    through before it has read the other's.  The shard holds [1, 10, 20]; the mirror must
    too, not [1, 20, 10], and later appends keep that order."""
    broker, script, shard, other = pair
    box = {}
    buf = f"{PREFIX}buf_F6"

    def both_append() -> bool:
        other.send_multipart(encode_batch([Write(buf, 0, 0.0, np.array([10.0]))]))
        _until_applied(shard, buf, [1.0, 10.0])
        assert broker.forward_put(box["pv"], np.array([20.0]), None)
        return True

    def in_order() -> bool:
        return box["pv"].contents().tolist() == shard.store.get(buf).tolist() == [1, 10, 20]

    def again() -> bool:  # once shared, each append follows the shard's order
        other.send_multipart(encode_batch([Write(buf, 0, 0.0, np.array([30.0]))]))
        assert broker.forward_put(box["pv"], np.array([40.0]), None)
        return True

    def settled() -> bool:
        return len(shard.store.get(buf)) == 5 and not broker.requests.in_flight(box["pv"])

    script.steps = [
        lambda: broker.links[0].live,
        *_created(broker, box, buf),
        lambda: join(other, shard),
        both_append,
        in_order,
        again,
        settled,
        lambda: box["pv"].contents().tolist() == shard.store.get(buf).tolist(),
    ]
    broker.run(script.stop)
    assert box["pv"].contents().tolist() == shard.store.get(buf).tolist()


class _DrainRecorder:
    def __init__(self) -> None:
        self.drained: list = []

    def drain(self, link) -> int:
        self.drained.append(link)
        while link.sock.poll(0):
            link.sock.recv_multipart()
        return 1


def test_a_read_first_takes_what_its_shard_has_sent_already():
    # Another front-end's put completes only after its shard has sent this front-end
    # the change: a read here must take it before it answers.
    ctx = zmq.Context.instance()
    shard = ctx.socket(zmq.ROUTER)
    shard.bind("inproc://catch-up")
    front = ctx.socket(zmq.DEALER)
    front.setsockopt(zmq.IDENTITY, b"f")
    front.connect("inproc://catch-up")
    link = SimpleNamespace(sock=front)
    sync = _DrainRecorder()
    try:
        catch_up(sync, link)
        assert sync.drained == []  # nothing sent: nothing to take, no wait
        front.send(b"hello")
        shard.recv_multipart()
        shard.send_multipart([b"f", b"change"])
        catch_up(sync, link)
        assert sync.drained == [link]
        catch_up(sync, SimpleNamespace(sock=None))  # a link without a socket: nothing
        assert sync.drained == [link]
    finally:
        front.close(0)
        shard.close(0)


def test_the_other_front_ends_run_of_puts_is_mirrored_put_by_put(pair):
    # A stream of the other's scalar puts reaches the broker as one UPDATE_RUN: each PV
    # it names is mirrored, the last put to a PV wins, and a change the shard applied
    # before this broker's own later WRITE is not taken back.
    broker, script, shard, other = pair
    names = [f"{PREFIX}r{k}_f1" for k in range(3)]
    box = {}

    def other_creates() -> bool:
        puts = [Put(name, k + 1, 0.0, np.array([0.0])) for k, name in enumerate(names)]
        other.send_multipart(encode_batch(puts))
        return True

    def mirrored() -> bool:
        return all(name in broker.pvs and broker.pvs[name].real for name in names)

    def other_puts_a_run() -> bool:
        run = WriteRun(np.dtype("<f8"))
        for k, name in enumerate([*names, names[0], NAME]):
            run.add(name, 0, 100.0 + k, np.array([10.0 + k]))
        other.send_multipart(encode_batch([run]))
        _until_applied(shard, NAME, [14.0])
        # Applied at the shard before this WRITE, which the mirror shows already.
        assert broker.forward_put(box["pv"], np.array([5.0]), None)
        return True

    def settled() -> bool:
        link = broker.links[0]
        return (
            broker.pvs[names[1]].value.tolist() == [11.0]
            and shard.store.get(NAME).tolist() == [5.0]
            and link.writes_applied >= link.writes
        )

    script.steps = [
        lambda: broker.links[0].live,
        *_created(broker, box),
        lambda: join(other, shard),
        other_creates,
        mirrored,
        other_puts_a_run,
        settled,
    ]
    broker.run(script.stop)
    assert [broker.pvs[name].value.tolist() for name in names] == [[13.0], [11.0], [12.0]]
    assert broker.pvs[names[0]].mirror.stamp == 103.0
    assert box["pv"].value.tolist() == [5.0]  # as the shard holds it
