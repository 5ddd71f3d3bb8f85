"""Supervisor: starts the shards and the broker, watches them, stops them cleanly.

Signal handlers only set a flag; one loop notices exits, restarts children
with back-off, writes the status file and, on SIGINT/SIGTERM, stops every
child within the grace period (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time

from carelay.common.config import STATUS_INTERVAL, STOP_GRACE, Config, config_to_dict
from carelay.common.lifecycle import StopFlag, write_status
from carelay.common.runlock import RUN_TOKEN_ENV, DataDirInUse, lock_run
from carelay.shard.reshard import ReshardError, reshard
from carelay.supervisor.watcher import Watcher, self_argv

log = logging.getLogger("carelay.supervisor")

_LOOP_INTERVAL = 0.1


class Supervisor:
    """One Watcher per shard and one for the broker."""

    def __init__(self, config: Config, flags: list[str]) -> None:
        self.config = config
        base = self_argv()
        # Made per run: a shard serves only a broker that presents it (see common/runlock.py).
        env = {RUN_TOKEN_ENV: secrets.token_hex(16)}
        self.watchers = [
            Watcher(f"shard {k}", [*base, "shard", str(k), *flags], env)
            for k in range(config.shards)
        ]
        self.watchers.append(Watcher("broker", [*base, "broker", *flags], env))
        self.status_path = config.run_dir / "supervisor.json"
        self.started = time.monotonic()

    def _write_status(self, now: float) -> None:
        write_status(
            self.status_path,
            {
                "role": "supervisor",
                "config": config_to_dict(self.config),
                "uptime": round(now - self.started, 1),
                "processes": [w.info(now) for w in self.watchers],
            },
        )

    def run(self) -> int:
        stop = StopFlag()
        # The run lock comes first: a second relay on this data directory leaves before it
        # touches anything (stores, sockets, status files) of the one that runs.
        try:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run(self.config.data_dir)
        except DataDirInUse as e:
            log.error("%s", e)
            return 2
        except OSError as e:
            log.error("cannot lock data directory %s: %s", self.config.data_dir, e)
            return 2
        try:
            return self._run(stop)
        finally:
            os.close(lock)

    def _run(self, stop: StopFlag) -> int:
        try:
            self.config.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("cannot create data directory %s: %s", self.config.run_dir, e)
            return 2
        log.info(
            "carelay up (pid %d): %d shards, prefix %s, data in %s",
            os.getpid(),
            self.config.shards,
            self.config.prefix,
            self.config.data_dir,
        )
        try:
            report = reshard(self.config.data_dir, self.config.shards, self.config.store_path)
        except ReshardError as e:
            log.error("cannot start: %s", e)
            return 1
        if report.moved or report.removed_stores:
            log.info(
                "resharding to %d shards moved %d of %d PVs",
                self.config.shards,
                report.moved,
                report.total,
            )
        for w in self.watchers:
            w.start()
        next_status = 0.0
        try:
            while not stop.stopping:
                now = time.monotonic()
                for w in self.watchers:
                    w.check(now)
                if now >= next_status:
                    self._write_status(now)
                    next_status = now + STATUS_INTERVAL
                time.sleep(_LOOP_INTERVAL)
        finally:
            self.stop(stop.signal)
        return 0

    def stop(self, signum: int | None) -> None:
        name = signal.Signals(signum).name if signum else "exit"
        log.info("stopping on %s", name)
        # The broker first, and the shards once it is gone: clients see the relay go away
        # before the data does, and the broker's last puts reach shards still serving.
        # A broker that hangs gets half the grace period, so the shards keep time to save.
        broker, shards = self.watchers[-1], self.watchers[:-1]
        start = time.monotonic()
        for group, grace in (([broker], STOP_GRACE / 2), (shards, STOP_GRACE)):
            for w in group:
                w.signal(signal.SIGTERM)
            for w in group:
                if not w.wait(start + grace):
                    log.warning("%s did not stop in %.1f s; killing it", w.name, grace)
                    w.kill()
        self.status_path.unlink(missing_ok=True)
        log.info("stopped")
