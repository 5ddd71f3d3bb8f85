"""OffLoop: work that may block for seconds, run on a thread of its own while the loop
goes on, its result handed back on the loop thread.

An access security reload looks up the host names of the file's HAGs: with a name
server that does not answer, each look-up waits out the resolver's timeout, and a loop
that waited with it would serve no client meanwhile, and look hung to its shards.  Only
the look-ups and the reading of the file run here; what the result changes (asLib's
rules, which PCAS reads; the PVA rules) is changed on the loop thread, by ``then``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class OffLoop:
    """One piece of work at a time, off the loop; ``poll`` (on the loop) ends it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._result: list = []
        self._then: Callable[[Any], None] | None = None
        #: Asked for while one ran: it runs once more after it, as what it reads may have
        #: changed since that one read it.
        self._again: tuple[Callable[[], Any], Callable[[Any], None]] | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def submit(self, work: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Run ``work()`` on a thread of its own, and ``then(result)`` on the loop thread
        at the next ``poll`` after it ends (result None if it raised)."""
        if self._thread is not None:
            self._again = (work, then)
            return
        result: list = []

        def run() -> None:
            try:
                result.append(work())
            except Exception:
                log.exception("%s failed", self.name)

        self._result, self._then = result, then
        # A daemon: a look-up that hangs does not hold up the process's exit.
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """On the loop thread: if the work has ended, hand its result on."""
        thread = self._thread
        if thread is None or thread.is_alive():
            return
        self._thread = None
        then, result = self._then, self._result
        self._then, self._result = None, []
        then(result[0] if result else None)
        if self._again is not None:
            work, then = self._again
            self._again = None
            self.submit(work, then)
