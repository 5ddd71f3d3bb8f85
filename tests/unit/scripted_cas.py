"""A stand-in for pcaspy's ``cas`` module that drives a real Broker's loop step by step,
for the unit tests that run a broker against a real shard in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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
