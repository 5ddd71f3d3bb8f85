"""A shard reads its signal pipe when a signal wrote to it, not on every batch."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import zmq

from carelay.common.config import load_config
from carelay.common.messages import Put
from carelay.common.protocol import encode_batch
from carelay.shard import server as shard_server
from carelay.shard.server import ShardServer

PREFIX = "W:"


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A bound shard that wakes on signals, a DEALER to it, and the count of pipe reads."""
    reads = []

    def counted(fd: int) -> bool:
        reads.append(fd)
        return drain(fd)

    drain = shard_server.drain_wakeup_fd
    monkeypatch.setattr(shard_server, "drain_wakeup_fd", counted)
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    server = ShardServer(load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path)), 0)
    server.load()
    server.bind()
    server.wake_on_signals()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    try:
        yield server, dealer, reads
    finally:
        dealer.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR1, old)
        server.close()


def test_a_batch_without_a_signal_does_not_read_the_pipe(served):
    server, dealer, reads = served
    for k in range(1, 4):
        dealer.send_multipart(encode_batch([Put(f"{PREFIX}a_f1", k, 0.0, np.array([1.0 * k]))]))
        assert server.serve_once(timeout_ms=5000) >= 1
    assert reads == []


def test_a_signal_is_read_once_and_emptied(served):
    server, _dealer, reads = served
    os.kill(os.getpid(), signal.SIGUSR1)
    server.serve_once(timeout_ms=5000)
    assert len(reads) == 1
    server.serve_once(timeout_ms=0)  # the pipe is empty again: nothing more to read
    assert len(reads) == 1
