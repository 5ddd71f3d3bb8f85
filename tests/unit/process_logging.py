"""``setup_logging`` as a relay process does it, inside a test, and undone after."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator

from carelay.common import lifecycle

#: The logging module's switches that setup_logging turns off (cheaper records).
_KNOBS = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")


@contextlib.contextmanager
def process_logging(role: str = "shard 3") -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """(the role's logger, what its lines wrote): ``setup_logging("INFO", role)`` with its
    stderr in a string; the root logger, the excepthook, the logging switches and the
    process's last error and line handler are put back after."""
    root = logging.getLogger()
    handlers, level, hook = root.handlers[:], root.level, sys.excepthook
    knobs = {k: getattr(logging, k) for k in _KNOBS}
    lines = lifecycle._lines
    lifecycle.last_error.last = None
    out = io.StringIO()
    stderr, sys.stderr = sys.stderr, out
    try:
        log = lifecycle.setup_logging("INFO", role)
    finally:
        sys.stderr = stderr
    try:
        yield log, out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.excepthook = hook
        lifecycle._lines = lines
        lifecycle.last_error.last = None
        for k, v in knobs.items():
            setattr(logging, k, v)
