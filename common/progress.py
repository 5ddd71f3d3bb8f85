"""Progress lines for long work (a resharding, an import): one every few seconds, with counts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from carelay.common.config import PROGRESS_INTERVAL


class Progress:
    """Counts work done and logs ``<what>: <done> of <total> <unit>`` at most once per
    ``interval``; work that ends before the first interval logs nothing."""

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        total: int,
        unit: str = "PVs",
        interval: float = PROGRESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._what = what
        self._unit = unit
        self.total = total
        self.done = 0
        self._interval = interval
        self._clock = clock
        self._next = clock() + interval

    def step(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now >= self._next:
            self._next = now + self._interval
            self._log.info("%s: %d of %d %s", self._what, self.done, self.total, self._unit)
