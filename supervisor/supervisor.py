"""Supervisor: starts the shards and the broker, watches them, stops them cleanly.

Signal handlers only set a flag; one loop notices exits, restarts children
with back-off, writes the status file and, on SIGINT/SIGTERM, stops every
child within the grace period (SIGTERM, then SIGKILL).

The loop sleeps until something happens: a signal (a child exits: SIGCHLD; stop;
reload) wakes it through ``signal.set_wakeup_fd``, and a clock only where one does
work: a restart that is due, and the touch that keeps the status file fresh
(STATUS_TOUCH_INTERVAL).  The status file is rewritten only when what it says changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import threading
import time

from carelay.common import exits
from carelay.common.config import (
    STATUS_TOUCH_INTERVAL,
    STOP_GRACE,
    STOP_LIMIT,
    Config,
    config_to_dict,
    configured_ca_port,
)
from carelay.common.lifecycle import (
    StopFlag,
    read_status,
    status_path,
    write_status,
)
from carelay.common.runlock import RUN_TOKEN_ENV, DataDirInUse, lock_run
from carelay.shard.reshard import ReshardError, reshard
from carelay.supervisor.watcher import Watcher, describe_exit, self_argv

log = logging.getLogger(__name__)

#: How often the brokers' status files are read until every broker is ready (s).
_READY_POLL = 0.1
#: Exit status of ``carelay up`` when a shard did not stop cleanly (values not saved).
EXIT_UNCLEAN_STOP = exits.FAILED


class Supervisor:
    """One Watcher per shard and one per broker (per ``[[ca]]`` entry, else one)."""

    def __init__(self, config: Config, flags: list[str]) -> None:
        self.config = config
        base = self_argv()
        # Made per run: a shard serves only a broker that presents it (see common/runlock.py).
        env = {RUN_TOKEN_ENV: secrets.token_hex(16)}
        self.watchers = [
            Watcher(f"shard {k}", [*base, "shard", str(k), *flags], env)
            for k in range(config.shards)
        ]
        #: The brokers, after the shards in ``watchers``: broker 0 first.
        self.brokers = [
            Watcher(
                f"broker {k}" if k else "broker",
                [*base, "broker", *(["--index", str(k)] if k else []), *flags],
                env,
            )
            for k in range(config.brokers)
        ]
        if config.pva:
            # The PV Access front-end: one more front-end, stopped before the shards.
            self.brokers.append(Watcher("pva", [*base, "pva", *flags], env))
        self.watchers.extend(self.brokers)
        self.status_path = config.run_dir / "supervisor.json"
        self.started = time.monotonic()
        # systemd's readiness socket (Type=notify): the supervisor alone speaks for the
        # unit, so its children do not inherit it.
        self.notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
        # Readiness is watched for systemd, and for the line that several brokers get;
        # one broker without systemd says it itself.
        self._told_ready = not (self.notify_socket or len(self.brokers) > 1)

    @contextlib.contextmanager
    def _resharding(self):
        """For the move of PVs between stores before the children start: a callable that
        says it in the status file, which a thread of its own then touches until the move
        ends (the supervisor's loop, which touches it otherwise, waits for the move)."""
        done = threading.Event()
        thread: threading.Thread | None = None

        def keep_fresh() -> None:
            while not done.wait(STATUS_TOUCH_INTERVAL):
                # Unchanged but for its uptime: touched, as the loop touches it.
                self._write_status(time.monotonic(), resharding=True)

        def moving() -> None:
            nonlocal thread
            self._write_status(time.monotonic(), resharding=True)
            thread = threading.Thread(target=keep_fresh, name="resharding", daemon=True)
            thread.start()

        try:
            yield moving
        finally:
            done.set()
            if thread is not None:
                thread.join()

    def _write_status(self, now: float, stopping: bool = False, resharding: bool = False) -> None:
        write_status(
            self.status_path,
            {
                "role": "supervisor",
                # Its children go now, and none is restarted: `carelay status` says so.
                **({"stopping": True} if stopping else {}),
                # Its children start once the stores' PVs are where the shard count says.
                **({"resharding": True} if resharding else {}),
                "config": config_to_dict(self.config),
                "data_dir": str(self.config.data_dir.resolve()),
                # As the broker reads it; the broker's own status has the port it got.
                "ca_port": configured_ca_port(),
                "uptime": round(now - self.started, 1),
                "processes": [w.info(now) for w in self.watchers],
            },
        )

    def _sleep_for(self, now: float, next_touch: float) -> float:
        """Seconds until the loop has work that no signal announces."""
        due = [next_touch]
        due += [w.restart_at for w in self.watchers if w.restart_at is not None]
        if not self._told_ready:
            due.append(now + _READY_POLL)
        return max(0.0, min(due) - now)

    def _brokers_ready(self) -> list[dict] | None:
        """Every running broker's status once each says every shard is in sync, else None."""
        statuses = []
        for broker in self.brokers:
            if broker.proc is None:
                return None
            status = read_status(status_path(self.config.run_dir, broker.name))
            # A file left by an earlier broker does not count.
            if status is None or status.get("pid") != broker.proc.pid:
                return None
            if status.get("ready") is not True:
                return None
            statuses.append(status)
        return statuses

    def _tell_when_ready(self) -> None:
        """Once every broker is ready: a log line (with several brokers; one says it
        itself), and READY=1 to $NOTIFY_SOCKET under systemd (sd_notify)."""
        statuses = self._brokers_ready()
        if statuses is None:
            return
        self._told_ready = True
        ca = [s for s in statuses if s.get("role") != "pva"]
        ports = ", ".join(str(s.get("ca_port")) for s in ca)
        pva = [s.get("pva_port") for s in statuses if s.get("role") == "pva"]
        plural = "s" if len(ca) > 1 else ""
        if pva:
            log.info("all front-ends ready: CA port%s %s, PVA port %s", plural, ports, pva[0])
        elif len(statuses) > 1:
            log.info("all %d CA brokers ready, CA ports %s", len(statuses), ports)
        if not self.notify_socket:
            return
        text = f"READY=1\nSTATUS=serving {ca[0].get('pvs', 0)} PVs on CA port{plural} {ports}"
        if not sd_notify(self.notify_socket, text):
            return
        log.info("told systemd the relay is ready")

    def run(self) -> int:
        stop = StopFlag()
        # A reload (SIGHUP) asked before the brokers run reaches them once they do: it must
        # not end the supervisor (its default action), in the middle of a reshard too.
        reload_asked: list = []
        signal.signal(signal.SIGHUP, lambda *_: reload_asked.append(True))
        # The run lock comes first: a second relay on this data directory leaves before it
        # touches anything (stores, sockets, status files) of the one that runs.
        try:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run(self.config.data_dir)
        except DataDirInUse as e:
            log.error("%s", e)
            return exits.REFUSED
        except OSError as e:
            log.error("cannot lock data directory %s: %s", self.config.data_dir, e)
            return exits.REFUSED
        try:
            if self.config.pva and not pva_installed():
                log.error("cannot start: pva = true needs p4p: pip install 'carelay[pva]'")
                return exits.CANNOT_START
            return self._run(stop, reload_asked)
        finally:
            os.close(lock)

    def _run(self, stop: StopFlag, reload_asked: list) -> int:
        try:
            self.config.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("cannot create data directory %s: %s", self.config.run_dir, e)
            return exits.REFUSED
        log.info(
            "carelay up (pid %d): %d shards, prefix %s, data directory %s",
            os.getpid(),
            self.config.shards,
            self.config.prefix,
            self.config.data_dir.resolve(),
        )
        try:
            # It logs what it moved, once.  Meanwhile `carelay status` says so.
            with self._resharding() as moving:
                reshard(self.config.data_dir, self.config.shards, self.config.store_path, moving)
        except ReshardError as e:
            log.error("cannot start: %s", e)
            return exits.FAILED
        wakeup = SignalWakeup()
        for w in self.watchers:
            w.start()
        next_touch = 0.0
        try:
            while not stop.stopping:
                now = time.monotonic()
                if reload_asked:
                    # SIGHUP (systemctl reload): the broker reads its access security again.
                    reload_asked.clear()
                    for w in self.brokers:
                        w.signal(signal.SIGHUP)
                for w in self.watchers:
                    w.check(now)
                if not self._told_ready:
                    self._tell_when_ready()
                # Rewritten when what it says changed, else touched (write_status).
                self._write_status(now)
                next_touch = now + STATUS_TOUCH_INTERVAL
                if not stop.stopping:
                    wakeup.wait(self._sleep_for(now, next_touch))
        finally:
            wakeup.close()
            clean = self.stop(stop.signal)
        return exits.OK if clean else EXIT_UNCLEAN_STOP

    def stop(self, signum: int | None) -> bool:
        """Stop every child; False when a shard's stop failed (it could not save values)."""
        name = signal.Signals(signum).name if signum else "exit"
        log.info("stopping on %s", name)
        self._write_status(time.monotonic(), stopping=True)
        if self.notify_socket:
            sd_notify(self.notify_socket, "STOPPING=1")
        # The broker first, and the shards once it is gone: clients see the relay go away
        # before the data does, and the broker's last puts reach shards still serving.
        # A broker that hangs gets half the grace period; a shard gets the whole from its
        # own SIGTERM, and more while it is still saving (Watcher.wait_while_working): a
        # large last flush killed half way would lose values its clients were told of.
        brokers, shards = self.brokers, self.watchers[: -len(self.brokers)]
        for group, grace, limit in (
            (brokers, STOP_GRACE / 2, STOP_GRACE / 2),
            (shards, STOP_GRACE, STOP_LIMIT),
        ):
            start = time.monotonic()
            for w in group:
                w.signal(signal.SIGTERM)
            seen = [w.progress() for w in group]
            for w, since in zip(group, seen, strict=True):
                if not w.wait_while_working(since, start, grace, limit):
                    took = time.monotonic() - start
                    log.warning("%s did not stop in %.1f s; killing it", w.name, took)
                    w.kill()
        failed = [w for w in shards if w.proc is not None and w.proc.returncode]
        for w in failed:
            log.error("%s stopped with %s", w.name, describe_exit(w.proc.returncode))
        self.status_path.unlink(missing_ok=True)
        log.info("stopped")
        return not failed


def pva_installed() -> bool:
    """Whether p4p, which `carelay pva` serves PV Access with, can be imported."""
    import importlib.util

    return importlib.util.find_spec("p4p") is not None


class SignalWakeup:
    """Wakes the loop when a signal arrives: a child's exit (SIGCHLD), stop or reload.

    Python runs signal handlers between bytecodes and resumes an interrupted select(),
    so a handler that sets a flag would not end the wait; ``signal.set_wakeup_fd``
    makes every signal readable on a socket that the wait watches.
    """

    def __init__(self) -> None:
        self._recv, self._send = socket.socketpair()
        self._recv.setblocking(False)
        self._send.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._send.fileno(), warn_on_full_buffer=False)
        # SIGCHLD is ignored by default: a handler of its own makes it wake the loop.
        self._old_chld = signal.signal(signal.SIGCHLD, lambda *_: None)

    def wait(self, timeout: float) -> None:
        """Until a signal came (since the last wait) or ``timeout`` seconds passed."""
        select.select([self._recv], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while self._recv.recv(4096):
                pass

    def close(self) -> None:
        signal.signal(signal.SIGCHLD, self._old_chld)
        signal.set_wakeup_fd(self._old_fd)
        self._recv.close()
        self._send.close()


def sd_notify(address: str, text: str) -> bool:
    """Send ``text`` to systemd's notification socket ``address`` (a path, or an abstract
    name starting with '@'); False, and one log line, if it cannot go."""
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(text.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", address, e)
        return False
    return True
