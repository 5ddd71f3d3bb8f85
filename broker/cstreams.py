"""The broker's stderr, owned: what PCAS's C code writes there becomes relay log lines.

PCAS reports bad client input (a malformed UDP datagram, an empty name, a failed
beacon) on stderr, a few lines each time, as often as a client cares to send it.
Here fd 2 becomes a pipe that a thread drains: each line becomes one log line,
at most C_LINE_CHARS long, and above C_LOG_LINES lines per C_LOG_WINDOW the rest
are counted in one summary line.  The write end does not block: when the pipe is
full, what C writes is dropped, and the broker never waits on its own log.  The
relay's own log lines go to the original stderr.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time

from carelay.common.config import C_LINE_CHARS, C_LOG_LINES, C_LOG_WINDOW
from carelay.common.logbudget import LogBudget, shorten

log = logging.getLogger(__name__)

#: Bytes of a line without its end kept at most; the rest of it is dropped.
_PARTIAL_MAX = 4096


class LineLimiter:
    """Logs lines one by one up to ``lines`` per ``window`` seconds, then counts them."""

    def __init__(
        self, lines: int = C_LOG_LINES, window: float = C_LOG_WINDOW, clock=time.monotonic
    ):
        self.budget = LogBudget(
            lines,
            window,
            "stderr: {count} more lines in the last {window:.0f} s, not logged one by one",
            log,
            clock,
        )

    def line(self, text: str) -> None:
        if self.budget.allow():
            log.warning("stderr: %s", shorten(text, C_LINE_CHARS))

    def tick(self) -> None:
        self.budget.tick()


def split_lines(partial: bytearray, data: bytes) -> list[str]:
    """The whole lines of ``partial`` + ``data``; what follows the last line end stays in
    ``partial``, cut at _PARTIAL_MAX bytes."""
    partial += data
    *lines, rest = bytes(partial).split(b"\n")
    partial[:] = rest[:_PARTIAL_MAX]
    return [text for raw in lines if (text := raw.decode("utf-8", "backslashreplace").strip())]


def own_stderr() -> None:
    """Make fd 2 a pipe drained into the log; the logging handlers keep the real stderr."""
    real = os.fdopen(os.dup(2), "w", buffering=1, errors="backslashreplace")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (
            sys.stderr,
            sys.__stderr__,
        ):
            handler.setStream(real)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_drain, args=(read_end,), name="stderr", daemon=True).start()


def _drain(fd: int) -> None:
    limiter = LineLimiter()
    partial = bytearray()
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], 1.0)
            data = os.read(fd, 65536) if ready else None
        except OSError:
            return
        if data is None:
            limiter.tick()  # the summary of a window comes without waiting for a next line
            continue
        if not data:
            return
        try:
            for text in split_lines(partial, data):
                limiter.line(text)
        except Exception:
            log.exception("cannot log what was written to stderr")
