"""Process plumbing shared by every carelay process: logging, signals, parent death."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def setup_logging(level: str, role: str) -> logging.Logger:
    """One line per event on stderr, each naming the process role."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)s {role}: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(f"carelay.{role.split()[0]}")


#: Set by the supervisor in its children's environment: its own pid.
PARENT_PID_ENV = "CARELAY_SUPERVISOR_PID"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` when the parent process dies (Linux only).

    A supervisor that died before this call cannot signal us any more: if the
    parent is no longer the supervisor that started us, we go at once.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os.kill(os.getpid(), sig)


class StopFlag:
    """Set by SIGINT/SIGTERM; the main loop polls it.  Handlers only set the flag."""

    def __init__(self) -> None:
        self.stopping = False
        self.signal: int | None = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        self.signal = signum


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``status`` as JSON."""
    status = {**status, "pid": os.getpid(), "written": time.time()}
    text = json.dumps(status)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # On a full disk the status must still tell (a store that cannot be written).
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and _rewrite_in_place(path, text):
            return
        logging.getLogger("carelay").warning("cannot write status file %s: %s", path, e)


def _rewrite_in_place(path: Path, text: str) -> bool:
    """Overwrite ``path`` with ``text``, padded with spaces to its old length: the space
    the file already has holds it, where a new file gets none.  Not atomic: a reader may
    meet a torn file, and then reads again at the next write."""
    data = text.encode()
    try:
        with open(path, "r+b") as f:
            f.write(data.ljust(os.fstat(f.fileno()).st_size))
    except OSError:
        return False
    return True
