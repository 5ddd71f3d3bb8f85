"""A stand-in for pcaspy's ``cas`` module that drives a real Broker's loop step by step,
for the unit tests that run a broker against a real shard in a thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import zmq

from carelay.broker.app import Broker
from carelay.common.config import load_config
from carelay.common.messages import Hello
from carelay.common.protocol import encode_batch
from carelay.shard.server import ShardServer

#: How long a script may take over one step before the test fails.
DEADLINE = 20.0


class Stop:
    stopping = False


class Script:
    """Each ``process`` call runs the first step still to do (a step returns True when
    done); when none is left, the broker stops."""

    def __init__(self, steps: list | None = None) -> None:
        self.steps: list = [] if steps is None else steps
        self.stop = Stop()
        self.deadline = time.monotonic() + DEADLINE

    def process(self, delay: float) -> None:
        time.sleep(min(delay, 0.001))
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"step {self.steps[0].__name__} not done in {DEADLINE} s")
        if self.steps and self.steps[0]():
            self.steps.pop(0)
        if not self.steps:
            self.stop.stopping = True


def serve_in_thread(shard) -> Callable[[], None]:
    """Run ``shard`` (a bound ShardServer) in a daemon thread; returns what stops it."""
    halt = threading.Event()

    def serve() -> None:
        while not halt.is_set():
            shard.serve_once(timeout_ms=10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        halt.set()
        thread.join(timeout=10)

    return stop


@contextlib.contextmanager
def beside_another_front_end(tmp_path, prefix: str) -> Iterator[tuple]:
    """(broker, its script, shard, socket): a Broker on a Script and a real shard in a
    thread, with a bare DEALER socket connected to the shard as another front-end."""
    config = load_config(prefix=prefix, shards=1, data_dir=str(tmp_path))
    shard = ShardServer(config, 0, db=None)
    shard.bind()
    stop_shard = serve_in_thread(shard)
    other = zmq.Context.instance().socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.connect(shard.endpoint)
    script = Script([])
    broker = Broker(config, script)
    try:
        yield broker, script, shard, other
    finally:
        for link in broker.links:
            link.close(linger=0)
        stop_shard()
        other.close()
        shard.close()


def join(other, shard) -> bool:
    """The other front-end says HELLO; returns (True) once the shard serves it too."""
    other.send_multipart(encode_batch([Hello(1, "", "other")]))
    wait = time.monotonic() + 5
    while len(shard.admission) < 2 and time.monotonic() < wait:
        time.sleep(0.005)
    return True
