"""Watcher: one child process slot, restarted with back-off when it exits."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from carelay.common.config import (
    RESTART_BACKOFF_INITIAL,
    RESTART_BACKOFF_MAX,
    RESTART_RESET_AFTER,
)
from carelay.common.lifecycle import CHILD_HELD_SIGNALS, PARENT_PID_ENV, RESTARTS_ENV
from carelay.common.procstat import read_stat

log = logging.getLogger(__name__)


def _progress(pid: int) -> tuple[int, int, str] | None:
    """What /proc says process ``pid`` has done so far: the bytes it wrote (wchar) and its
    CPU ticks; and its state ("D": waiting on its disk).  None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/io") as f:
            wrote = next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    stat = read_stat(pid)
    return None if stat is None else (wrote, stat.cpu_ticks, stat.state)


def _working(before: tuple | None, now: tuple | None) -> bool:
    """Whether a process did something between two looks at its progress."""
    if before is None or now is None:
        return False
    return now[0] > before[0] or now[1] > before[1] or now[2] == "D"


#: A child that died this often within FLAPPING_WINDOW seconds is failing.
FLAPPING_DEATHS = 3
FLAPPING_WINDOW = 60.0


class Watcher:
    """Keeps one child (the broker or one shard) running."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.last_exit: int | None = None
        self._backoff = RESTART_BACKOFF_INITIAL
        self._restart_at: float | None = None
        self._deaths: collections.deque[float] = collections.deque(maxlen=FLAPPING_DEATHS)

    @property
    def failing(self) -> bool:
        """Died FLAPPING_DEATHS times within FLAPPING_WINDOW seconds."""
        return (
            len(self._deaths) == FLAPPING_DEATHS
            and time.monotonic() - self._deaths[0] < FLAPPING_WINDOW
        )

    @property
    def restart_at(self) -> float | None:
        """When (time.monotonic) the child is due to be started again, if it is down."""
        return self._restart_at

    @property
    def state(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "running"
        if self._restart_at is not None:
            return "failing" if self.failing else "restarting"
        return "stopped"

    def start(self) -> None:
        env = {
            **os.environ,
            **self.env,
            PARENT_PID_ENV: str(os.getpid()),
            RESTARTS_ENV: str(self.restarts),
        }
        # A process group of its own: Ctrl-C at a terminal signals the foreground group,
        # and the supervisor alone is to act on it, stopping the broker before the shards
        # (Supervisor.stop).  A child whose supervisor dies follows it (die_with_parent).
        # It starts with the signals the supervisor sends held (CHILD_HELD_SIGNALS): a stop
        # or a reload before it has its handlers waits for them.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_HELD_SIGNALS)
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, env=env, process_group=0
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self.started_at = time.monotonic()
        self._restart_at = None
        # A restart has its own line (check); the first start is in the ready line.
        log.debug("started %s (pid %d)", self.name, self.proc.pid)

    def check(self, now: float) -> None:
        """Notice an exit and restart after the back-off."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                if now - self.started_at > RESTART_RESET_AFTER:
                    self._backoff = RESTART_BACKOFF_INITIAL
                return
            self.last_exit = code
            self.proc = None
            if now - self.started_at > RESTART_RESET_AFTER:
                self._backoff = RESTART_BACKOFF_INITIAL
            self._restart_at = now + self._backoff
            self._deaths.append(now)
            if self.failing:
                log.error(
                    "%s is failing: died %d times within %.0f s (%s); restarting in %.2f s",
                    self.name,
                    FLAPPING_DEATHS,
                    FLAPPING_WINDOW,
                    describe_exit(code),
                    self._backoff,
                )
            else:
                log.warning(
                    "%s died (%s); restarting in %.2f s",
                    self.name,
                    describe_exit(code),
                    self._backoff,
                )
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX)
        elif self._restart_at is not None and now >= self._restart_at:
            self.restarts += 1
            self.start()
            log.info("restarted %s (restart %d)", self.name, self.restarts)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, deadline: float) -> bool:
        """Wait until the child exited or ``deadline``; True if it exited."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    def progress(self) -> tuple[int, int, str] | None:
        """What the child has done so far (see ``wait_while_working``); None if none runs."""
        return None if self.proc is None else _progress(self.proc.pid)

    def wait_while_working(self, since, start: float, grace: float, limit: float) -> bool:
        """Wait for the child to exit, ``grace`` from ``start``, and ``grace`` more each time
        it is seen at work since the last look (``since``: its progress at ``start``):
        writing, computing, or waiting on its disk; up to ``limit`` from ``start`` in all.
        True if it exited.  A child that is hung (stopped, or waiting on nothing it does)
        is given ``grace`` alone."""
        deadline, end = start + grace, start + limit
        while not self.wait(min(deadline, end)):
            now = time.monotonic()
            current = self.progress()
            if now >= end or not _working(since, current):
                return False
            since, deadline = current, now + grace
        return True

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def info(self, now: float) -> dict:
        running = self.proc is not None and self.proc.poll() is None
        return {
            "name": self.name,
            "pid": self.proc.pid if running else None,
            "state": self.state,
            # ``now`` may predate a restart made in the same pass of the loop.
            "uptime": round(max(0.0, now - self.started_at), 1) if running else 0.0,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            # Started again after dying FLAPPING_DEATHS times within FLAPPING_WINDOW:
            # while it has not answered yet, it is failing, not starting.
            "failing": self.failing,
        }


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def self_argv() -> list[str]:
    """How to run carelay again, so that ``ps`` shows ``carelay broker``, ``carelay shard 0``."""
    script = sys.argv[0]
    if os.path.basename(script) == "carelay" and os.access(script, os.X_OK):
        return [sys.executable, os.path.abspath(script)]
    return [sys.executable, "-m", "carelay.supervisor.cli"]
