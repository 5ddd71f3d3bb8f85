"""The shard's loop: batched messages on a real socket, and the autosave thread."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from carelay.common.config import REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW, load_config
from carelay.common.messages import (
    Ack,
    Delete,
    Deleted,
    Message,
    Put,
    Reject,
    SetField,
    Update,
    Write,
)
from carelay.common.protocol import BATCH_TAG, decode_batch, encode_batch
from carelay.shard.persist import ShardDatabase
from carelay.shard.server import ShardServer

PREFIX = "U:"


def _server(data_dir: Path, with_db: bool = True) -> ShardServer:
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(data_dir))
    db = ShardDatabase(config.store_path(0)) if with_db else None
    server = ShardServer(config, 0, db=db)
    server.load()
    return server


def _put(server: ShardServer, name: str, value, req: int = 1) -> None:
    server.handle(b"b", encode_batch([Put(name, req, 0.0, np.asarray(value))]))
    server._commit()
    server._out.clear()


def _saved(server: ShardServer) -> dict:
    again = ShardDatabase(server.db.path)
    try:
        return {row.name: row.value.tolist() for row in again.open()}
    finally:
        again.close()


@pytest.fixture
def server(tmp_path):
    s = _server(tmp_path)
    yield s
    s.autosave.close()
    s.db.close()


# -- batches ---------------------------------------------------------------------


def test_a_batch_is_applied_in_order_and_answered_in_one_batch(tmp_path):
    server = _server(tmp_path, with_db=False)
    server.bind()
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    try:
        puts = [Put(f"{PREFIX}a_F5", k, 0.0, np.array([float(k)])) for k in range(1, 8)]
        puts.append(Put(f"{PREFIX}b_f1", 8, 0.0, np.zeros(3)))  # too many
        dealer.send_multipart(encode_batch(puts))
        assert server.serve_once(timeout_ms=5000) >= len(puts)
        assert dealer.poll(5000)
        frames = dealer.recv_multipart()
        assert len(frames) == 1 and frames[0].startswith(BATCH_TAG)
        replies = decode_batch(frames)
        assert [m.req for m in replies] == list(range(1, 9))
        assert [type(m) for m in replies] == [Update] * 7 + [Reject]
        assert [m.seq for m in replies[:7]] == sorted(m.seq for m in replies[:7])
        # A buffer of 5 keeps the newest five appends, in order.
        assert server.store.get(f"{PREFIX}a_F5").tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    finally:
        dealer.close()
        server.close()


def test_a_malformed_batch_changes_nothing(tmp_path, caplog):
    server = _server(tmp_path, with_db=False)
    _put(server, f"{PREFIX}a_f1", [1.0])
    good = Put(f"{PREFIX}a_f1", 2, 0.0, np.array([2.0]))
    frames = [bytes(f) for f in encode_batch([good, good])]
    frames[0] = frames[0][:-3]  # a torn header
    assert server.handle(b"b", frames) == 0
    assert server.handle(b"b", [*encode_batch([good]), b"extra frame"]) == 0
    assert server._out == []
    assert server.store.get(f"{PREFIX}a_f1").tolist() == [1.0]
    assert "malformed" in caplog.text


# -- the autosave thread -----------------------------------------------------------


def test_flush_soon_writes_in_the_background(server):
    _put(server, f"{PREFIX}a_f1", [1.0])
    _put(server, f"{PREFIX}a_f1", [2.0])
    assert server.autosave.flush_soon() == 1
    assert not server.store.dirty
    _put(server, f"{PREFIX}a_f1", [3.0])  # the loop goes on meanwhile
    assert server.autosave.collect(wait=True)
    assert _saved(server) == {f"{PREFIX}a_f1": [2.0]}
    assert server.autosave.flush() == 1
    assert _saved(server) == {f"{PREFIX}a_f1": [3.0]}


def _held(server, monkeypatch) -> threading.Event:
    """Make the autosave thread (only) wait for the returned event before it writes."""
    go = threading.Event()
    real = server.db.save

    def save(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            assert go.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(server.db, "save", save)
    return go


def test_a_buffer_row_is_the_buffer_as_it_was_when_the_flush_began(server, monkeypatch):
    name = f"{PREFIX}log_F4"
    _put(server, name, [1.0, 2.0])
    server.autosave.flush()
    _put(server, name, [3.0])
    go = _held(server, monkeypatch)
    assert server.autosave.flush_soon() == 1
    _put(server, name, [4.0, 5.0])  # wraps the ring while the write waits
    go.set()
    server.autosave.collect(wait=True)
    assert _saved(server) == {name: [1.0, 2.0, 3.0]}
    server.autosave.flush()
    assert _saved(server) == {name: [2.0, 3.0, 4.0, 5.0]}


def test_a_deletion_after_a_flush_in_flight_stays_deleted(server, monkeypatch):
    name = f"{PREFIX}gone_f1"
    _put(server, name, [1.0])
    _put(server, name, [2.0])
    go = _held(server, monkeypatch)
    assert server.autosave.flush_soon() == 1
    server.handle(b"b", encode_batch([Delete(name, 5)]))
    threading.Timer(0.2, go.set).start()
    server._commit()  # waits for the older write, then deletes
    assert [type(m) for _, m in server._out] == [Deleted]
    server.autosave.collect(wait=True)
    assert _saved(server) == {}


def test_a_failed_background_write_is_made_again(server, monkeypatch, caplog):
    name = f"{PREFIX}a_f1"
    _put(server, name, [1.0])
    _put(server, name, [7.0])
    real = server.db.save

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(server.db, "save", broken)
    assert server.autosave.flush_soon() == 1
    server.autosave.collect(wait=True)
    assert "autosave of 1 values failed" in caplog.text
    assert name in server.store.dirty
    monkeypatch.setattr(server.db, "save", real)
    assert server.autosave.flush_soon() == 1
    server.autosave.collect(wait=True)
    assert _saved(server) == {name: [7.0]}


# -- WRITE: puts the broker has already mirrored --------------------------------------


def _handle(server: ShardServer, *msgs: Message) -> list[Message]:
    server.handle(b"b", encode_batch(list(msgs)))
    server._commit()
    out = [msg for _, msg in server._out]
    server._out.clear()
    return out


def test_a_write_is_applied_silently_with_the_brokers_stamp(server):
    name = f"{PREFIX}a_f1"
    _put(server, name, [1.0])
    seq = server.store.seq
    assert _handle(server, Write(name, 0, 1234.5, np.array([2.5]))) == []
    assert server.store.get(name).tolist() == [2.5]
    assert server.store.stamp(name) == 1234.5
    assert server.store.seq == seq + 1
    assert name in server.store.dirty  # the autosave takes it like any put


def test_a_write_with_a_request_number_is_acknowledged(server):
    name = f"{PREFIX}a_F3"
    _put(server, name, [1.0])
    out = _handle(server, Write(name, 7, 1.0, np.array([2.0, 3.0])))
    assert [(type(m), m.name, m.req, m.seq) for m in out] == [(Ack, name, 7, server.store.seq)]
    assert server.store.get(name).tolist() == [1.0, 2.0, 3.0]


def test_a_write_is_clipped_as_a_put_is(server):
    name = f"{PREFIX}a_f1"
    _put(server, name, [1.0])
    _handle(server, SetField(name, 2, "DRVH", 5.0))
    _handle(server, Write(name, 0, 1.0, np.array([9.0])))
    assert server.store.get(name).tolist() == [5.0]


def test_a_write_never_creates_a_pv(server, caplog):
    name = f"{PREFIX}gone_f1"
    out = _handle(server, Write(name, 3, 1.0, np.array([1.0])))
    assert [type(m) for m in out] == [Reject, Deleted]
    assert out[0].req == 3 and "no PV named" in out[0].reason
    # The DELETED restates that the PV does not exist, for the broker's mirror: no change.
    assert out[1].name == name and out[1].restate
    assert out[1].seq == server.store.seq
    assert name not in server.store
    assert "refused put" in caplog.text


def test_a_refused_write_restates_the_pv_as_it_is(server):
    name = f"{PREFIX}a_f2"
    _put(server, name, [1.0, 2.0])
    seq = server.store.seq
    stamp = server.store.stamp(name)
    # Three elements for a PV of two: refused, and the value the shard holds goes back.
    out = _handle(server, Write(name, 0, 99.0, np.zeros(3)))
    assert [type(m) for m in out] == [Reject, Update]
    update = out[1]
    assert update.req == 0 and update.seq == seq
    assert update.reset and update.req == 0 and not update.created
    assert update.data.tolist() == [1.0, 2.0] and update.stamp == stamp
    assert server.store.get(name).tolist() == [1.0, 2.0]


def test_a_put_keeps_the_stamp_the_broker_gave_it(server):
    name = f"{PREFIX}a_f1"
    out = _handle(server, Put(name, 1, 4321.0, np.array([1.0])))
    assert type(out[0]) is Update and out[0].stamp == 4321.0
    assert server.store.stamp(name) == 4321.0
    # A stamp of 0 (or one that is not a time) leaves it to the shard's clock.
    out = _handle(server, Put(name, 2, float("inf"), np.array([2.0])))
    assert 0 < out[0].stamp < float("inf") and out[0].stamp != 4321.0


def test_malformed_messages_are_logged_within_a_budget(tmp_path, caplog):
    """Any peer that reaches the socket can send garbage as fast as it likes: the first
    lines of a window say what it was, one line counts the rest when the window is over."""
    server = _server(tmp_path, with_db=False)
    now = [time.monotonic()]
    server.malformed_log.clock = lambda: now[0]
    for _ in range(500):
        assert server.handle(b"b", [b"\x00\x01garbage"]) == 0
    lines = caplog.text.count("dropped a malformed message")
    assert lines == REFUSAL_LOG_LINES
    now[0] += REFUSAL_LOG_WINDOW + 1
    server.malformed_log.tick()
    assert f"dropped {500 - lines} more malformed messages" in caplog.text
