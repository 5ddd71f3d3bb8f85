"""Inbox: calls handed to the front-end's loop thread by other threads.

A pipe wakes the loop, which polls its read end beside the shard sockets; the calls
themselves wait in a queue, in the order they came, and run on the loop thread.  One
wake serves every call queued before the loop takes them: a call queued while a wake
is pending writes nothing (``_woken``), so a burst of puts costs one pipe write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Bytes read from the wake-up pipe at once: every wake written since the last read.
_READ = 4096


class Inbox:
    """Calls queued by any thread, run by the loop (``run``)."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        #: A wake is pending: the loop has not started taking the calls since the last
        #: write.  Cleared by ``run`` after it read the pipe and before it takes any
        #: call, so a call queued after that writes again, and one queued before it is
        #: taken by that run.
        self._woken = False
        self.fd, self._wake = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake, False)

    def push(self, call: Callable, *args) -> None:
        """Queue ``call(*args)`` for the loop thread and wake it.  Any thread."""
        self._calls.put((call, args))
        if self._woken:
            return
        self._woken = True
        # A full pipe already wakes the loop.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake, b"\0")

    def run(self, limit: int = 2000) -> int:
        """Run the queued calls (up to about ``limit``); returns how many ran."""
        with contextlib.suppress(BlockingIOError):
            while len(os.read(self.fd, _READ)) == _READ:
                pass  # a pipe as full as that: read on (one read is the rule)
        # After the pipe is read: a wake written from here on stays for the next turn.
        self._woken = False
        n = 0
        while n < limit:
            try:
                call, args = self._calls.get_nowait()
            except queue.Empty:
                break
            n += 1
            try:
                call(*args)
            except Exception:
                log.exception("a queued PVA call failed")
        if n >= limit:
            self._woken = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake, b"\0")  # more wait: the next turn runs them
        return n

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._wake)
