"""A shard serving two front-ends: every applied change goes to both, in the shard's order.

No socket: two fake peers hand batches to ``ShardServer.handle``; what the loop would
send collects in ``server._out``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zmq

from carelay.common.config import load_config
from carelay.common.messages import (
    Ack,
    Applied,
    Delete,
    Deleted,
    FieldChanged,
    Hello,
    Put,
    SetField,
    Update,
    Wanted,
    Write,
)
from carelay.common.protocol import UpdateRun, WriteRun, encode_batch
from carelay.shard.server import ShardServer
from tests.unit.recording_router import RecordingRouter
from tests.unit.shard_peers import handed

PREFIX = "U:"
A, B = b"front-end A", b"front-end B"
SCALAR = f"{PREFIX}x_f1"
BUFFER = f"{PREFIX}buf_F4"


@pytest.fixture
def server(tmp_path):
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path))
    s = ShardServer(config, 0)
    for peer, broker in ((A, "a"), (B, "b")):
        s.handle(peer, encode_batch([Hello(1, "", broker)]))
    s._out.clear()
    return s


def _send(server: ShardServer, peer: bytes, msgs: list) -> dict[bytes, list]:
    """Hand ``msgs`` from ``peer`` to the shard; what each peer would be sent."""
    return handed(server, peer, msgs, (A, B))


def test_a_put_from_one_front_end_reaches_the_other_without_its_request_number(server):
    out = _send(server, A, [Put(SCALAR, 7, 0.0, np.array([1.5]))])
    (answer,) = out[A]
    (published,) = out[B]
    assert type(answer) is Update and answer.req == 7 and answer.created
    assert type(published) is Update and published.req == 0 and published.created
    assert published.seq == answer.seq and published.data.tolist() == [1.5]


def test_writes_of_either_front_end_reach_the_other_in_sequence(server):
    _send(server, A, [Put(SCALAR, 1, 0.0, np.array([0.0]))])
    run = WriteRun(np.dtype("<f8"), [SCALAR, SCALAR], [0, 5], [0.0, 0.0], [1.0, 2.0])
    out = _send(server, B, [run])
    # Its sender hears what it asked for, and how many of its WRITEs are applied.
    assert [type(m) for m in out[B]] == [Ack, Applied]
    assert (out[B][1].writes, out[B][1].seq) == (2, server.store.seq)
    assert [(m.req, m.data.tolist()) for m in out[A]] == [(0, [1.0]), (0, [2.0])]
    assert [m.seq for m in out[A]] == sorted(m.seq for m in out[A])
    out = _send(server, A, [Write(SCALAR, 0, 0.0, np.array([3.0]))])
    assert [(type(m), m.writes) for m in out[A]] == [(Applied, 1)]
    assert [m.data.tolist() for m in out[B]] == [[3.0]]
    assert out[B][0].seq == server.store.seq


def test_a_buffer_append_is_published_as_the_appended_elements(server):
    _send(server, A, [Put(BUFFER, 1, 0.0, np.array([1.0, 2.0]))])
    run = WriteRun(np.dtype("<f8"), [BUFFER], [0], [0.0], [3.0])
    out = _send(server, A, [run])
    assert [m.data.tolist() for m in out[B]] == [[3.0]]


def test_field_changes_and_deletions_are_published(server):
    _send(server, A, [Put(SCALAR, 1, 0.0, np.array([0.0]))])
    out = _send(server, B, [SetField(SCALAR, 2, "EGU", "mm"), Delete(SCALAR, 3)])
    assert [(type(m), m.req) for m in out[B]] == [(FieldChanged, 2), (Deleted, 3)]
    assert [(type(m), m.req) for m in out[A]] == [(FieldChanged, 0), (Deleted, 0)]
    assert out[A][0].value == "mm"


def test_a_broker_that_says_hello_again_is_served_on_its_new_connection_only(server):
    again = b"front-end A, reconnected"
    server.handle(again, encode_batch([Hello(9, "", "a")]))
    server._out.clear()
    server.handle(B, encode_batch([Put(SCALAR, 1, 0.0, np.array([1.0]))]))
    server._commit()
    assert sorted(to for to, _ in server._out) == sorted([again, B])


def test_a_front_end_that_cannot_be_sent_to_is_no_longer_served(server):
    server._lost(A, 1, OSError("gone"))
    assert server.admission.peers() == [B]
    out = _send(server, B, [Put(SCALAR, 1, 0.0, np.array([1.0]))])
    # B hears that no other front-end shows its puts any longer (A followed nothing).
    assert out[A] == [] and [type(m) for m in out[B]] == [Wanted, Update]
    assert out[B][0] == Wanted("", False, server.epoch)
    # What it still sends is refused, until its broker reconnects with a HELLO.
    out = _send(server, A, [Put(SCALAR, 2, 0.0, np.array([2.0]))])
    assert [(type(m).__name__, m.req) for m in out[A]] == [("Reject", 2)]
    assert "resyncs" in out[A][0].reason and server.store.get(SCALAR).tolist() == [1.0]


def test_one_front_end_alone_is_sent_no_applied_counts(tmp_path):
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path))
    server = ShardServer(config, 0)
    _send(server, A, [Put(SCALAR, 1, 0.0, np.array([0.0]))])
    assert _send(server, A, [Write(SCALAR, 0, 0.0, np.array([1.0]))])[A] == []


def test_a_front_end_that_wrote_alone_hears_its_writes_applied_when_another_joins(tmp_path):
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path))
    server = ShardServer(config, 0)
    _send(server, A, [Hello(1, "", "a"), Put(SCALAR, 1, 0.0, np.array([0.0]))])
    _send(
        server, A, [Write(SCALAR, 0, 0.0, np.array([1.0])), Write(SCALAR, 0, 0.0, np.array([2.0]))]
    )
    out = _send(server, B, [Hello(1, "", "b"), Write(SCALAR, 0, 0.0, np.array([3.0]))])
    # Before the newcomer's change: A's two WRITEs are applied (else A skips the change).
    kinds = [type(m) for m in out[A]]
    applied, update = kinds.index(Applied), kinds.index(Update)
    assert applied < update and out[A][applied].writes == 2
    assert out[A][update].data.tolist() == [3.0]


def test_the_other_front_ends_are_sent_a_change_before_its_sender_is_answered(server):
    # A put with callback from A completes when A has the answer; by then B must have
    # been handed the change, so that a read through B at once finds the new value.
    server.handle(A, encode_batch([Put(SCALAR, 7, 0.0, np.array([2.5]), callback=True)]))
    server._commit()
    sock = RecordingRouter()
    server.outbox.send(sock)
    peers = [peer for peer, _ in sock.sent]
    assert peers.index(B) < peers.index(A)
    assert [m.req for m in sock.sent[peers.index(A)][1]] == [7]


def test_a_run_of_writes_reaches_the_other_front_end_as_one_run_in_order(server):
    # The commonest traffic: another front-end's stream of scalar puts.  What the other
    # peer is sent decodes as one UpdateRun that says what the single Updates would.
    names = [f"{PREFIX}r{k}_f1" for k in range(3)]
    for k, name in enumerate(names):
        _send(server, A, [Put(name, k + 1, 0.0, np.array([0.0]))])
    values = [1.5, 2.5, 3.5, 4.5]
    run = WriteRun(np.dtype("<f8"), [*names, names[0]], [0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0], values)
    server.handle(B, encode_batch([run]))
    server._commit()
    sock = RecordingRouter()
    server.outbox.send(sock)
    (published,) = sock.to(A)
    assert type(published) is UpdateRun and published.names == [*names, names[0]]
    assert published.values.tolist() == values and published.stamps == [1.0, 2.0, 3.0, 4.0]
    assert published.seqs == sorted(published.seqs) and published.seqs[-1] == server.store.seq
    assert server.store.get(names[0]).tolist() == [4.5]


def test_a_broker_gone_is_said_and_one_that_reads_nothing_warned_of(server, caplog):
    """A clean stop ended with a warning per shard: the brokers stop first, and the
    shard's last replies find their connections closed.  A broker whose queue is full
    (it reads nothing) is still warned of."""

    def said(peer, error) -> logging.LogRecord:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="carelay.shard.server"):
            server._lost(peer, 1, error)
        (record,) = caplog.records
        return record

    gone = said(A, zmq.ZMQError(zmq.EHOSTUNREACH))
    assert gone.levelno == logging.INFO and "gone" in gone.getMessage()
    assert server.admission.peers() == [B]
    full = said(B, zmq.ZMQError(zmq.EAGAIN))
    assert full.levelno == logging.WARNING and "must resync" in full.getMessage()
    assert server.admission.peers() == []


def test_on_a_stop_any_broker_lost_is_said(server, caplog):
    server.stopping = True
    with caplog.at_level(logging.INFO, logger="carelay.shard.server"):
        server._lost(A, 1, zmq.ZMQError(zmq.EAGAIN))
    assert [r.levelno for r in caplog.records] == [logging.INFO]
