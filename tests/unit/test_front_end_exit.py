"""A front-end ends with os._exit once it has stopped (supervisor/cli.py ``_exit_now``),
skipping the interpreter's teardown: what it sent last, still in ZeroMQ's I/O thread
when its sockets were closed with a linger, must reach the shard all the same (its last
plain puts)."""

from __future__ import annotations

import subprocess
import sys

import zmq

_SENDER = """
import sys, zmq
from carelay.supervisor.cli import _exit_now
ctx = zmq.Context.instance()
s = ctx.socket(zmq.DEALER)
s.connect(sys.argv[1])
payload = b"x" * 8_000_000
for _ in range(8):
    s.send_multipart([b"m", payload])
s.close(linger=5000)
other = ctx.socket(zmq.DEALER)  # one left open: it must not hold the exit up
_exit_now(0)
"""


def test_what_a_front_end_sent_last_reaches_the_shard(tmp_path):
    endpoint = f"ipc://{tmp_path}/shard.sock"
    ctx = zmq.Context()
    shard = ctx.socket(zmq.ROUTER)
    shard.setsockopt(zmq.LINGER, 0)
    shard.bind(endpoint)
    try:
        sender = subprocess.run(
            [sys.executable, "-c", _SENDER, endpoint], capture_output=True, timeout=60
        )
        assert sender.returncode == 0, sender.stderr
        got = 0
        while shard.poll(2000):
            shard.recv_multipart()
            got += 1
        assert got == 8
    finally:
        shard.close(linger=0)
        ctx.term()
