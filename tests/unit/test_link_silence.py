"""When a front-end takes its link to a shard down: after HEARTBEAT_INTERVAL x
HEARTBEAT_LIVENESS of silence, but not while what the shard said waits unread (a loop
held up by a large snapshot of another shard read nothing for seconds, and then dropped
the shards it had just synced, their PONGs waiting on their sockets, and took their
snapshots again); and at once when the shard says it no longer serves the connection."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import zmq

from carelay.broker.link import ShardLink
from carelay.broker.linkstate import _SILENCE, LinkState
from carelay.broker.requests import Requests
from carelay.broker.sync import ShardSync
from carelay.common.messages import SILENT, Ping, Reject
from carelay.common.protocol import encode_batch, send_frames
from tests.unit.test_requests import PV, Health, Notify, Table


@pytest.fixture
def linked(tmp_path):
    """A link in sync with a shard's socket: (shard socket, link, the link's identity)."""
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/shard.sock"
    shard = ctx.socket(zmq.ROUTER)
    shard.setsockopt(zmq.LINGER, 0)
    shard.bind(endpoint)
    link = ShardLink(ctx, 0, endpoint)
    link.open()
    link.hello_sent()
    link.synced(1, 0)
    # The shard learns the link's identity from a message, and answers on it; the link
    # sends only once it is connected (IMMEDIATE).
    link.queue(Ping(1))
    deadline = time.monotonic() + 10
    while not shard.poll(10):
        assert time.monotonic() < deadline, "the link never connected"
        link.send_queued()
    peer, *_ = shard.recv_multipart()
    yield shard, link, peer
    link.close(park=False)
    shard.close(linger=0)
    ctx.destroy(linger=0)


def test_a_shard_asked_nothing_is_not_silent(linked):
    """The loop asked nothing for seconds (a large snapshot of another shard held it up):
    the shard, which answers PINGs, rightly said nothing meanwhile."""
    shard, link, peer = linked
    now = time.monotonic()
    link.timers.heard(now - 4 * _SILENCE)  # its last PING answered long ago
    link.timers.last_ping = now - 4 * _SILENCE
    assert link.tick(now, in_flight=False) == "ping"  # asked now
    assert link.state is LinkState.LIVE
    # Asked, and silent for _SILENCE: gone.
    assert link.tick(now + _SILENCE + 0.1, in_flight=False) == "down"
    assert link.state is LinkState.DOWN


def test_a_shard_whose_answer_waits_unread_is_not_taken_for_gone(linked):
    shard, link, peer = linked
    now = time.monotonic()
    link.timers.asked_at = now - 2 * _SILENCE  # asked; the loop read nothing since
    send_frames(shard, [peer, *encode_batch([Ping(2)])])
    deadline = time.monotonic() + 5
    while not link.sock.get(zmq.EVENTS) & zmq.POLLIN and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.tick(now, in_flight=False) is None
    assert link.state is LinkState.LIVE
    # Read, it counts as heard; asked again and silent for good, the shard is gone.
    assert link.recv() is not None and link.recv() is None
    assert link.timers.asked_at is None
    link.timers.asked(now)
    assert link.tick(now + 2 * _SILENCE, in_flight=False) == "down"
    assert link.state is LinkState.DOWN


def test_a_link_the_shard_no_longer_serves_goes_down(linked):
    """A REJECT that says the shard no longer serves this connection (it was silent too
    long, or missed a change) marks the link for the loop to take down and reconnect;
    another refusal does not."""
    shard, link, peer = linked
    errors = []
    broker = SimpleNamespace(
        links=[link],
        table=SimpleNamespace(),
        config=SimpleNamespace(front_ends=2),
        error=lambda *args: errors.append(args) and False,
    )
    broker.requests = SimpleNamespace(
        waiter=lambda k, req: None, finish=lambda k, req, ok: None, repark=lambda k, req: False
    )
    sync = ShardSync(broker)
    sync._reject(link, Reject(5, "a_f1", "a_f1 holds 1 element", 1))
    assert link.not_served == ""
    sync._reject(link, Reject(6, "", SILENT, 1))
    assert link.not_served == SILENT
    assert len(errors) == 2
    link.went_down(f"it no longer serves this connection: {link.not_served}", park=False)
    assert link.not_served == "" and link.state is LinkState.DOWN


def _refused_on_the_old_socket(linked, reopen: bool):
    """A put with callback in flight when the heartbeat's REJECT (SILENT) made the loop take
    the connection down, parked; the put's own REJECT comes after, on that socket (``reopen``:
    once a new connection was opened).  (notify, the parked puts, the errors)."""
    shard, link, peer = linked
    errors = []
    broker = SimpleNamespace(
        links=[link],
        table=Table(),
        config=SimpleNamespace(front_ends=1),
        error=lambda *args: errors.append(args) or True,
    )
    broker.requests = requests = Requests([link], broker.table, Health(), broker.error)
    sync = ShardSync(broker)
    pv, notify = PV("a_f1"), Notify()
    req, _ = requests.expect(0, pv, pv.name, notify, None, put=True, retry=(pv, [2.5]))
    sync._reject(link, Reject(requests.number(), "", SILENT, 1))
    link.went_down(f"it no longer serves this connection: {link.not_served}", park=True)
    requests.link_down(0, gone=False)
    if reopen:
        link.open()
    send_frames(shard, [peer, *encode_batch([Reject(req, pv.name, SILENT, 1)])])
    deadline = time.monotonic() + 10
    while requests.orphans[0]:
        assert time.monotonic() < deadline, "the REJECT never came"
        sync.poll(10)
    return notify, requests.parked, errors


def test_a_put_refused_on_the_connection_just_taken_down_goes_again(linked):
    """Its refusal says no more than the heartbeat's did: it waits for the new connection,
    as it would have had both come in one read (seen: a PVA put right after the front-end
    hung was failed, its REJECT read 3 ms after the heartbeat's)."""
    notify, parked, errors = _refused_on_the_old_socket(linked, reopen=False)
    assert notify.results == [] and [p.payload for p in parked] == [[2.5]]
    assert len(errors) == 1  # the heartbeat's refusal, said once


def test_a_put_refused_on_a_connection_older_than_the_newest_fails(linked):
    """A new connection may have carried later puts: going again, it would undo them."""
    notify, parked, errors = _refused_on_the_old_socket(linked, reopen=True)
    assert notify.results == [False] and parked == []
    assert [e[2] for e in errors] == ["", "a_f1"]


def test_a_receive_told_the_socket_is_readable_reads_without_asking_and_finds_nothing_too(linked):
    """``ready`` (a poll found the socket readable) spares the first receive the question;
    should nothing be there after all, it says so, as an asked one does."""
    shard, link, peer = linked
    assert link.recv(ready=True) is None
    send_frames(shard, [peer, *encode_batch([Reject(7, "x_f1", "no")])])
    deadline = time.monotonic() + 10
    while not link.sock.poll(10):
        assert time.monotonic() < deadline, "the batch never came"
    msgs = link.recv(ready=True)
    assert msgs is not None and [type(m) for m in msgs] == [Reject] and msgs[0].req == 7
    assert link.recv() is None and link.recv(ready=True) is None
