"""Process plumbing shared by every carelay process: logging, signals, parent death."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from carelay.common.config import (
    GC_YOUNG_THRESHOLD,
    MALLOC_ARENAS,
    MALLOC_TRIM_MIN,
    STATUS_FAULT_LOG_WINDOW,
)
from carelay.common.logbudget import LogBudget

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
#: glibc mallopt parameter.
_M_ARENA_MAX = -8
#: Longest last error line kept for the status file.
_LAST_ERROR_CHARS = 500


class LastError(logging.Handler):
    """Keeps the process's last ERROR (or worse) log line, for its status file.

    ``carelay status`` shows it, so that a failing process says why without
    anyone searching the logs.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: dict[str, Any] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not hide the event
            message = str(record.msg)
        line = " ".join(message.split())[:_LAST_ERROR_CHARS]
        self.last = {"time": record.created, "level": record.levelname, "message": line}


#: The one LastError of this process (installed by setup_logging).
last_error = LastError()
#: The stderr handler setup_logging installed, which ``log_each`` writes through.
_lines: logging.StreamHandler | None = None


def log_each(logger: logging.Logger, level: int, msg: str, values: list) -> None:
    """``logger.log(level, msg, value)`` for each of ``values``: one line each, made from
    one record and written at once (a shard logs each of hundreds of creations a batch;
    a record and a write per line took a third of its time per creation).  Through the
    usual path, a record each, when other handlers than setup_logging's may see them."""
    if not values or not logger.isEnabledFor(level):
        return
    handler = _lines
    if handler is None or level >= last_error.level or not _plain(logger, handler):
        for value in values:
            logger.log(level, msg, value)
        return
    record = logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, (values[0],), None)
    formatter = handler.formatter
    record.asctime = formatter.formatTime(record, formatter.datefmt)
    lines = []
    for value in values:
        record.args = (value,)
        record.message = record.getMessage()
        lines.append(formatter.formatMessage(record))
    with handler.lock:
        handler.stream.write("\n".join(lines) + handler.terminator)
        handler.flush()


def _plain(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Whether ``logger``'s records go to setup_logging's handlers alone, unfiltered."""
    root = logging.getLogger()
    while logger is not root:
        if logger.handlers or logger.filters or not logger.propagate:
            return False
        logger = logger.parent
    return root.handlers == [handler, last_error] and not (root.filters or handler.filters)


def setup_logging(level: str, role: str) -> logging.Logger:
    """One line per event on stderr, each naming the process role.

    Also keeps the last error line (``last_error``), which every status file
    carries, and logs an uncaught exception as one such error before the
    process dies of it.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)s {role}: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    global _lines
    _lines = handler
    root = logging.getLogger()
    root.handlers[:] = [handler, last_error]
    root.setLevel(level)
    # What the format never shows is not gathered for each line either (the logging
    # HOWTO's "Optimization"): a shard logs every creation, 20,000 lines in a burst.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False

    def crashed(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        log.critical("%s crashed: %s: %s", role, kind.__name__, exc, exc_info=(kind, exc, tb))

    sys.excepthook = crashed
    return log


#: Set by the supervisor in its children's environment: its own pid.
PARENT_PID_ENV = "CARELAY_SUPERVISOR_PID"
#: Set by the supervisor in its children's environment: how often it restarted this one.
RESTARTS_ENV = "CARELAY_RESTARTS"


def first_start_under_supervisor() -> bool:
    """Whether this process is a child of ``carelay up`` started with the relay (not a
    restart): its start-up is then news for DEBUG, as the relay's ready line says it."""
    return bool(os.environ.get(PARENT_PID_ENV)) and os.environ.get(RESTARTS_ENV) == "0"


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


def fit_fd_limit(target: int) -> int:
    """Set this process's soft RLIMIT_NOFILE to ``target`` (or the hard limit, if lower),
    raised where it is lower and lowered where it is higher; returns the soft limit now
    (as it was, with a warning, if it cannot be set)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot set RLIMIT_NOFILE to %d: %s", target, e)
            return soft
    return target


def bound_malloc() -> None:
    """Keep threads from holding freed memory of their own (glibc only; elsewhere a
    no-op): see MALLOC_ARENAS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _libc_function(name: str, restype=ctypes.c_int):
    """The C library's function ``name``, looked up once; None where there is none."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.restype = restype
    return fn


_malloc_trim = _libc_function("malloc_trim")
_mallinfo2 = _libc_function("mallinfo2", _MallInfo2)


def settle_gc(young: int = GC_YOUNG_THRESHOLD) -> None:
    """Once start-up is done: what the process made so far (modules, the loaded PVs) lives
    as long as it does, so the garbage collector stops walking it (``gc.freeze``), and young
    collections come every ``young`` allocations instead of every 700."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


class FreedMemory:
    """``return_freed_memory`` after work only: a look at a large heap takes a fraction
    of a millisecond, which an idle process should not spend each second."""

    def __init__(self) -> None:
        self._work: object = None

    def after(self, work: object) -> None:
        """Return freed memory if ``work`` (counters of what frees memory) moved."""
        if work != self._work:
            self._work = work
            return_freed_memory()


def return_freed_memory(min_free: int = MALLOC_TRIM_MIN) -> bool:
    """Give the memory malloc holds free back to the system (glibc's malloc_trim; elsewhere
    a no-op): the transient copies of large values (CA reads and events, autosave rows,
    ZeroMQ frames, snapshots) are freed into the heap, which keeps them otherwise.  Only
    when malloc holds ``min_free`` bytes free or more: below that there is next to nothing
    to give back.  Returns whether it trimmed."""
    if _malloc_trim is None:
        return False
    if _mallinfo2 is not None and _mallinfo2().fordblks < min_free:
        return False
    _malloc_trim(0)
    return True


#: Signals a child of ``carelay up`` starts with blocked (Watcher.start): one that comes
#: before the child has its handler waits for it, rather than killing the child by the
#: default action (a stop during start-up read as a crash, a reload as a death).  The
#: child releases each once it handles it: SIGTERM and SIGINT with its StopFlag, SIGHUP
#: where a front-end takes reloads (``release_signals``); a shard never takes SIGHUP.
CHILD_HELD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def release_signals(*signums: int) -> None:
    """Unblock ``signums`` (held since the process started, see CHILD_HELD_SIGNALS): one
    that came meanwhile is handled now, as its handler says."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


class StopFlag:
    """Set by SIGINT/SIGTERM; the main loop polls it.  Handlers only set the flag."""

    def __init__(self) -> None:
        self.stopping = False
        self.signal: int | None = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        release_signals(signal.SIGTERM, signal.SIGINT)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        self.signal = signum


def broker_role(index: int) -> str:
    """The name of CA broker ``index`` (``[[ca]]`` entry): "broker", then "broker 1"..."""
    return f"broker {index}" if index else "broker"


def signal_wakeup_fd() -> int:
    """The read end of a pipe that each signal caught by a Python handler writes to
    (``signal.set_wakeup_fd``): a loop that waits on it too wakes for the signal at once,
    even when the signal came just before it went to sleep.  Main thread only."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    return r


def drain_wakeup_fd(fd: int) -> bool:
    """Empty the pipe of ``signal_wakeup_fd``; whether a signal had written to it."""
    woke = False
    try:
        while os.read(fd, 512):
            woke = True
    except BlockingIOError:
        pass
    return woke


def pid_alive(pid: Any) -> bool:
    """Whether ``pid`` names a live process (one of another user's counts too)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_path(run_dir: Path, role: str) -> Path:
    """The status file of ``role`` ("supervisor", "broker", "shard 0", ...) in ``run_dir``."""
    return run_dir / f"{role.replace(' ', '-')}.json"


def read_status(path: Path) -> dict | None:
    """The status file at ``path`` (see write_status), or None if it is missing, torn or
    not a status."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


#: What this process last wrote to each status file, less the time and the uptimes: a
#: status that says the same again only touches the file (``carelay status`` takes its
#: mtime as its age, and works the uptimes out from ``written``).
_said: dict[Path, str] = {}
#: Per status file, the lines that say it cannot be written: one a minute, and a count.
_unwritable: dict[Path, LogBudget] = {}


def _timeless(value: Any) -> Any:
    """``value`` without its ``uptime`` keys, at any depth: what a status says."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "uptime"}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``status`` as JSON, with this process's pid, the
    time, and its last error line; when that says what the last write said (uptimes
    aside: a reader adds the time since ``written``), only touch it."""
    status = {**status, "pid": os.getpid(), "last_error": last_error.last}
    said = json.dumps(_timeless(status))
    if _said.get(path) == said:
        try:
            os.utime(path)
            return
        except OSError:
            pass  # gone or not writable: written in full, which says why if it fails
    _said.pop(path, None)
    status["written"] = time.time()
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
            _said[path] = said
            return
        budget = _unwritable.get(path)
        if budget is None:
            budget = _unwritable[path] = LogBudget(
                1,
                STATUS_FAULT_LOG_WINDOW,
                f"status file {path} could not be written {{count}} more times in the last "
                "{window:.0f} s, e.g. {example}",
                log,
            )
        if budget.allow(str(e)):
            log.warning("cannot write status file %s: %s", path, e)
        return
    _said[path] = said


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


def write_last_words(path: Path, role: str, code: int) -> None:
    """A process that exits with status ``code`` (not 0) leaves its last error in its
    status file: it may never have written one, and ``carelay status`` shows it."""
    write_status(path, {"role": role, "exit": code})
