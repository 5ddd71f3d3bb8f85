"""A front-end that reads nothing (hung, stopped, its host gone) costs the others nothing:
once its queue is full the shard drops it, and goes on serving the rest.

A real shard socket (ROUTER, ipc) with its send queue made small, so that the case comes
after a few large changes instead of 100,000: front-end A says HELLO and then reads no
more; B's client puts large values (plain puts, which B hears nothing of), each
published to A.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from carelay.common.config import load_config
from carelay.common.messages import (
    NOT_SERVED,
    SILENT,
    Follow,
    Hello,
    Ping,
    Pong,
    Put,
    Reject,
    Update,
    Write,
)
from carelay.common.protocol import decode_batch, encode_batch
from carelay.common.runs import UpdateRun, WriteRun
from carelay.shard import server as shard_server
from carelay.shard.server import ShardServer

PREFIX = "H:"
NAME = f"{PREFIX}big_f100000"


def test_a_front_end_that_reads_nothing_is_dropped_and_the_others_are_served(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_server, "SEND_HWM", 5)
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path), max_elements=100_000)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    shard = ShardServer(config, 0, db=None)
    shard.bind()
    ctx = zmq.Context()
    stop = threading.Event()
    served = threading.Thread(
        target=lambda: [shard.serve_once(10) for _ in iter(stop.is_set, True)]
    )

    def dealer(rcvhwm: int) -> zmq.Socket:
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.RCVHWM, rcvhwm)
        d.connect(shard.endpoint)
        return d

    hung, busy = dealer(1), dealer(1000)
    try:
        hung.send_multipart(encode_batch([Hello(1, "", "hung")]))
        busy.send_multipart(encode_batch([Hello(1, "", "busy")]))
        served.start()
        data = np.zeros(100_000)
        busy.send_multipart(encode_batch([Put(NAME, 1, 0.0, data)]))
        for k in range(1, 60):  # 800 kB each: far more than the pipes and socket buffers
            busy.send_multipart(encode_batch([Write(NAME, 0, 0.0, data + k)]))
        busy.send_multipart(encode_batch([Ping(999)]))
        deadline = time.monotonic() + 20
        pong = None
        while pong is None and time.monotonic() < deadline:
            if busy.poll(100):
                msgs = decode_batch(busy.recv_multipart())
                pong = next((m for m in msgs if type(m) is Pong and m.req == 999), None)
        assert pong is not None, "the shard stopped serving behind a front-end that reads nothing"
        assert shard.store.get(NAME)[0] == 59.0
        assert len(shard.admission) == 1  # the hung one was dropped: it must resync
    finally:
        stop.set()
        served.join(timeout=30)
        hung.close()
        busy.close()
        shard.close()
        ctx.term()
    assert not served.is_alive(), "the shard's loop is stuck in a send"


def _served_pair(tmp_path, monkeypatch, silence: float):
    """A shard (not yet serving) with PEER_SILENCE ``silence``, and two DEALERs that said
    HELLO to it."""
    monkeypatch.setattr(shard_server, "PEER_SILENCE", silence)
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path), max_elements=100_000)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    shard = ShardServer(config, 0, db=None)
    shard.bind()
    ctx = zmq.Context()
    socks = []
    for who in ("quiet", "alive"):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(shard.endpoint)
        d.send_multipart(encode_batch([Hello(1, "", who)]))
        socks.append(d)
    return shard, ctx, socks


def _received(sock, found, timeout: float = 5.0) -> list:
    """What ``sock`` receives up to a message that is ``found`` (or ``timeout``): a
    message the shard sent may still be on its way through ZeroMQ's threads."""
    got: list = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000)):
        batch = decode_batch(sock.recv_multipart())
        got += batch
        if any(found(m) for m in batch):
            break
    return got


def _serve_for(shard, seconds: float, each=lambda: None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        each()
        shard.serve_once(10)
        shard.drop_silent_peers()


def test_a_front_end_that_sends_nothing_is_dropped_before_its_queue_fills(tmp_path, monkeypatch):
    """A stopped front-end reads nothing and sends nothing: everything published to it
    waited in the shard's memory until its queue of 100,000 messages was full (a stopped
    PVA front-end following an 800 kB array grew its shard by 1 GB in 20 s).  One that
    sent not even a PING for PEER_SILENCE is no longer served; the others are."""
    shard, ctx, (quiet, alive) = _served_pair(tmp_path, monkeypatch, 0.3)
    try:
        ping = iter(range(1000, 10**6))
        _serve_for(shard, 0.2)
        assert len(shard.admission) == 2
        _serve_for(shard, 1.0, lambda: alive.send_multipart(encode_batch([Ping(next(ping))])))
        assert len(shard.admission) == 1  # the quiet one was dropped
        assert not shard.requests.fanout
        alive.send_multipart(encode_batch([Ping(1)]))
        _serve_for(shard, 0.1)
        got = _received(alive, lambda m: type(m) is Pong and m.req == 1)
        assert any(type(m) is Pong and m.req == 1 for m in got)
    finally:
        quiet.close()
        alive.close()
        shard.close()
        ctx.term()


def test_a_stall_of_the_shards_own_drops_no_front_end(tmp_path, monkeypatch):
    """The shard itself stopped (a slow disk, SIGSTOP) longer than PEER_SILENCE: the
    front-ends' PINGs wait on its socket, and say they are alive."""
    shard, ctx, socks = _served_pair(tmp_path, monkeypatch, 0.3)
    try:
        _serve_for(shard, 0.1)
        for k in range(6):  # the front-ends ping on while the shard does not read
            for s in socks:
                s.send_multipart(encode_batch([Ping(100 + k)]))
            time.sleep(0.1)
        # A look before the backlog is read: measured to the last read that emptied the
        # socket, nobody is silent (measured to now, both would be).
        shard.drop_silent_peers()
        assert len(shard.admission) == 2
        _serve_for(shard, 0.05)
        assert len(shard.admission) == 2
    finally:
        for s in socks:
            s.close()
        shard.close()
        ctx.term()


def test_a_dropped_front_end_hears_so_from_its_heartbeat(tmp_path, monkeypatch):
    """A front-end dropped for its silence (SIGSTOPped for longer than PEER_SILENCE) that
    comes back is told at its next PING that it is no longer served, and reconnects
    (see tests/unit/test_link_silence.py); else only its puts' REJECTs told it, and they
    kept its link looking alive while every put through it failed."""
    shard, ctx, (quiet, alive) = _served_pair(tmp_path, monkeypatch, 0.3)
    try:
        ping = iter(range(1000, 10**6))
        _serve_for(shard, 1.0, lambda: alive.send_multipart(encode_batch([Ping(next(ping))])))
        assert len(shard.admission) == 1
        quiet.send_multipart(encode_batch([Ping(7)]))
        _serve_for(shard, 0.1)
        got = _received(quiet, lambda m: type(m) is Reject)
        refusals = [m for m in got if type(m) is Reject and m.req == 7]
        assert [m.reason for m in refusals] == [SILENT]
        assert SILENT in NOT_SERVED
    finally:
        quiet.close()
        alive.close()
        shard.close()
        ctx.term()


def test_a_dropped_front_ends_last_plain_puts_are_applied(tmp_path, monkeypatch):
    """A broker hung for longer than PEER_SILENCE (SIGSTOP) takes, once it goes on, the CA
    puts that waited for it and sends them before it learns it was dropped: its clients'
    latest puts.  The plain ones (no client waits for them) are applied and published
    to the other front-ends; those that wait are refused, so their clients know.  Before,
    the plain ones were dropped, and the broker's resync then showed the older value."""
    shard, ctx, (quiet, alive) = _served_pair(tmp_path, monkeypatch, 0.3)
    name = f"{PREFIX}late_f1"
    try:
        alive.send_multipart(encode_batch([Put(name, 1, 0.0, np.array([1.0]))]))
        alive.send_multipart(encode_batch([Follow(2, name, True)]))
        ping = iter(range(1000, 10**6))
        _serve_for(shard, 1.0, lambda: alive.send_multipart(encode_batch([Ping(next(ping))])))
        assert len(shard.admission) == 1  # the quiet one was dropped
        run = WriteRun(np.dtype("<f8"))
        run.add(name, 0, 5.0, np.array([2.0]))  # plain
        run.add(name, 7, 6.0, np.array([3.0]))  # with callback
        quiet.send_multipart(encode_batch([run]))
        _serve_for(shard, 0.2)
        assert shard.store.get(name)[0] == 2.0
        got = _received(quiet, lambda m: type(m) is Reject)
        assert [(m.req, m.reason) for m in got if type(m) is Reject] == [(7, SILENT)]

        def values(msgs) -> list[float]:
            runs = [m for m in msgs if type(m) is UpdateRun]
            out = [float(m.value(k)[0]) for m in runs for k in range(len(m))]
            return out + [float(m.data[0]) for m in msgs if type(m) is Update and m.name == name]

        seen = _received(alive, lambda m: 2.0 in values([m]))
        assert 2.0 in values(seen), seen
    finally:
        quiet.close()
        alive.close()
        shard.close()
        ctx.term()
