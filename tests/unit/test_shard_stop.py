"""A shard told to stop takes its last flush though a front-end goes on sending.

On a clean stop the shard applies what front-ends sent before they stopped (the
supervisor stops its own first), and then saves.  A front-end that does not stop (a
broker on another host, which this supervisor does not stop) kept the shard reading
for as long as it sent: the shard was killed after STOP_GRACE, and every value changed
since the last flush was lost.
"""

from __future__ import annotations

import sqlite3
import threading
from types import SimpleNamespace

import numpy as np
import zmq

from carelay.common.messages import Hello, Put
from carelay.common.protocol import encode_batch
from tests.unit.driven_shard import PREFIX, shard_with_store

NAME = f"{PREFIX}x_f1"


def _saved(path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT count(*) FROM pvs WHERE name = ?", (NAME,)).fetchone()
    return row[0]


def test_a_stop_ends_though_a_front_end_goes_on_sending(tmp_path):
    server = shard_with_store(tmp_path)
    server.bind()
    stop = SimpleNamespace(stopping=False)
    answered = threading.Event()
    done = threading.Event()

    def front_end() -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(server.endpoint)
        sock.send_multipart(encode_batch([Hello(1)]))
        k = 0
        while not done.is_set():
            k += 1
            sock.send_multipart(encode_batch([Put(NAME, k, 0.0, np.array([float(k)]))]))
            if sock.poll(20):
                while sock.poll(0):
                    sock.recv_multipart()
                answered.set()
        sock.close(0)

    sender = threading.Thread(target=front_end)
    result: list = []
    serving = threading.Thread(target=lambda: result.append(server.serve(stop)))
    sender.start()
    serving.start()
    try:
        assert answered.wait(10), "the shard never answered"
        stop.stopping = True
        serving.join(10)
        assert not serving.is_alive(), "the shard is still reading what comes"
    finally:
        done.set()
        sender.join()
        serving.join()
        server.close()
        server.db.close()
    assert result == [True]  # its last flush saved every value
    assert _saved(server.db.path) == 1
