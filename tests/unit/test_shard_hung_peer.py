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
from carelay.common.messages import Hello, Ping, Pong, Put, Write
from carelay.common.protocol import decode_batch, encode_batch
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
